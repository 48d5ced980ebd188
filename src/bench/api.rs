//! `flotilla bench-api`: load against a Kubernetes API server (Flotilla's or any other),
//! with the credentials of a kubeconfig: create, get and list pods, and watch delivery.
//!
//! Requests go over `--conns` HTTP/2 connections shared by `--clients` clients (as
//! client-go multiplexes). Each operation's latency goes into an HDR histogram; a run with
//! failed requests reports no throughput and exits non-zero.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use serde_json::{json, Value};
use tokio_rustls::rustls;

use super::report::Outcome;

#[derive(Args, Debug, Clone)]
pub struct ApiBenchArgs {
    /// What to measure.
    #[arg(long, value_enum)]
    pub op: Op,
    /// Kubeconfig with the server, its CA and a bearer token (the one `flotilla up` writes).
    #[arg(long)]
    pub kubeconfig: std::path::PathBuf,
    /// HTTP/2 connections shared by the clients.
    #[arg(long, default_value_t = 4)]
    pub conns: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Requests in all (create: pods to create).
    #[arg(long, default_value_t = 1000)]
    pub total: u64,
    /// The first pod number create uses (to add to pods made by an earlier run).
    #[arg(long, default_value_t = 0)]
    pub first: u64,
    /// Namespaces the pods are spread over (bench-0, bench-1, ...).
    #[arg(long, default_value_t = 10)]
    pub namespaces: u64,
    /// Pods per namespace assumed present (get picks among them).
    #[arg(long, default_value_t = 100)]
    pub pods_per_namespace: u64,
    /// List page size (0: one unpaged list).
    #[arg(long, default_value_t = 500)]
    pub page: u64,
    /// Watchers (op watch), each on one namespace.
    #[arg(long, default_value_t = 100)]
    pub watchers: usize,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq)]
pub enum Op {
    /// Create pods (bench-<n> in namespace bench-<n mod namespaces>); namespaces first.
    Create,
    /// Get pods at random.
    Get,
    /// List one namespace's pods (all pages; latency is the whole list).
    List,
    /// List every pod in the cluster (all pages).
    ListAll,
    /// Watchers on namespaces while pods there are updated: latency from the update's
    /// send to its receipt by a watcher.
    Watch,
}

struct Kubeconfig {
    server: String,
    host: String,
    port: u16,
    ca_pem: Vec<u8>,
    token: String,
}

/// The fields of a kubeconfig this tool needs: the first cluster's server and CA data and
/// the first user's token (the layout `flotilla up` writes; a line-based read).
fn read_kubeconfig(path: &std::path::Path) -> anyhow::Result<Kubeconfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let server = field("server:").context("the kubeconfig names no server")?;
    let token = field("token:").context("the kubeconfig has no bearer token")?;
    let ca = field("certificate-authority-data:")
        .context("the kubeconfig has no certificate-authority-data")?;
    let ca_pem = base64::engine::general_purpose::STANDARD
        .decode(ca.as_bytes())
        .context("certificate-authority-data is not base64")?;
    let rest = server
        .strip_prefix("https://")
        .context("the server is not an https:// URL")?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().context("the server's port")?),
        None => (hostport.to_string(), 443),
    };
    Ok(Kubeconfig {
        server,
        host,
        port,
        ca_pem,
        token,
    })
}

type Sender = SendRequest<Full<Bytes>>;

/// Deliveries queued for counting at most.
const DELIVERY_QUEUE: usize = 1 << 16;
/// Watches per HTTP/2 connection.
const WATCHES_PER_CONN: usize = 200;

async fn connect(k: &Kubeconfig) -> anyhow::Result<Sender> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut k.ca_pem.as_slice()) {
        roots.add(c.context("the kubeconfig's CA")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect((k.host.as_str(), k.port))
        .await
        .with_context(|| format!("connecting to {}", k.server))?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(k.host.clone())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS with {}", k.server))?;
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .context("HTTP/2 handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

struct Client {
    sender: Sender,
    token: String,
}

impl Client {
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Bytes), String> {
        self.sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let bytes = body
            .map(|b| serde_json::to_vec(b).unwrap_or_default())
            .unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .header("user-agent", "flotilla-bench")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| e.to_string())?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("response body: {e}"))?
            .to_bytes();
        Ok((status, body))
    }

    /// A call that must answer `want`; anything else is an error named by status.
    async fn expect(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        want: &[u16],
    ) -> Result<Bytes, String> {
        let (status, bytes) = self.call(method, path, body).await?;
        if want.contains(&status.as_u16()) {
            Ok(bytes)
        } else {
            let reason = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["reason"].as_str().map(str::to_string))
                .unwrap_or_default();
            Err(format!("HTTP {} {reason}", status.as_u16()))
        }
    }
}

fn pod(name: &str, namespace: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "bench", "tier": "load"}},
        "spec": {"containers": [{
            "name": "app", "image": "registry.local/bench:1.0",
            "command": ["/bin/sleep", "3600"],
            "ports": [{"containerPort": 8080, "name": "http"}],
            "env": [{"name": "MODE", "value": "bench"}],
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}},
        }]},
    })
}

/// Every page of a list; the number of items.
async fn list_all(c: &mut Client, base: &str, page: u64) -> Result<usize, String> {
    let mut count = 0;
    let mut cont = String::new();
    loop {
        let mut path = base.to_string();
        if page > 0 {
            path.push_str(&format!("?limit={page}"));
            if !cont.is_empty() {
                path.push_str(&format!("&continue={cont}"));
            }
        }
        let bytes = c.expect(Method::GET, &path, None, &[200]).await?;
        // Only the count and the continue token: the items are skipped, not built.
        #[derive(serde::Deserialize)]
        struct Meta {
            #[serde(default, rename = "continue")]
            cont: String,
        }
        #[derive(serde::Deserialize)]
        struct Page {
            metadata: Meta,
            #[serde(default)]
            items: Vec<serde::de::IgnoredAny>,
        }
        let page_read: Page =
            serde_json::from_slice(&bytes).map_err(|e| format!("list body: {e}"))?;
        count += page_read.items.len();
        cont = page_read.metadata.cont;
        if cont.is_empty() || page == 0 {
            return Ok(count);
        }
    }
}

pub async fn run(args: ApiBenchArgs) -> anyhow::Result<()> {
    let k = read_kubeconfig(&args.kubeconfig)?;
    let mut senders = Vec::new();
    for _ in 0..args.conns.max(1) {
        senders.push(connect(&k).await?);
    }
    let client = |i: usize| Client {
        sender: senders[i % senders.len()].clone(),
        token: k.token.clone(),
    };
    // The namespaces exist before anything is timed.
    if args.op == Op::Create {
        let mut c = client(0);
        for n in 0..args.namespaces {
            let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("bench-{n}")}});
            c.expect(Method::POST, "/api/v1/namespaces", Some(&ns), &[201, 409])
                .await
                .map_err(|e| anyhow::anyhow!("creating namespace bench-{n}: {e}"))?;
        }
    }
    let outcome = if args.op == Op::Watch {
        watch(&args, &k, &client).await?
    } else {
        let next = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..args.clients.max(1) {
            let (mut c, next, args) = (client(i), next.clone(), args.clone());
            tasks.push(tokio::spawn(async move {
                let mut out = Outcome::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= args.total {
                        return out;
                    }
                    let ns = format!("bench-{}", n % args.namespaces.max(1));
                    let t = Instant::now();
                    let result = match args.op {
                        Op::Create => {
                            let n = n + args.first;
                            let ns = format!("bench-{}", n % args.namespaces.max(1));
                            let name = format!("bench-{n}");
                            let path = format!("/api/v1/namespaces/{ns}/pods");
                            c.expect(Method::POST, &path, Some(&pod(&name, &ns)), &[201])
                                .await
                                .map(|_| ())
                        }
                        Op::Get => {
                            let which = rand::random::<u64>() % args.pods_per_namespace.max(1);
                            let index = which * args.namespaces.max(1) + n % args.namespaces.max(1);
                            let path = format!("/api/v1/namespaces/{ns}/pods/bench-{index}");
                            c.expect(Method::GET, &path, None, &[200]).await.map(|_| ())
                        }
                        Op::List => {
                            list_all(&mut c, &format!("/api/v1/namespaces/{ns}/pods"), args.page)
                                .await
                                .map(|_| ())
                        }
                        Op::ListAll => list_all(&mut c, "/api/v1/pods", args.page)
                            .await
                            .map(|_| ()),
                        Op::Watch => Ok(()),
                    };
                    match result {
                        Ok(()) => {
                            let _ = out.latency_us.record(t.elapsed().as_micros().max(1) as u64);
                        }
                        Err(e) => *out.errors.entry(e).or_default() += 1,
                    }
                }
            }));
        }
        let mut out = Outcome::new();
        for t in tasks {
            out.merge(&t.await?);
        }
        out.elapsed = started.elapsed();
        out
    };
    outcome.print(&format!("{:?}", args.op).to_lowercase(), args.json);
    let failed: u64 = outcome.errors.values().sum();
    if failed > 0 {
        bail!("{failed} requests failed");
    }
    Ok(())
}

/// Watchers spread over the namespaces; one writer per client updates pods' annotations
/// with the send time; each watcher records now - sent for events in its namespace.
async fn watch(
    args: &ApiBenchArgs,
    k: &Kubeconfig,
    client: &dyn Fn(usize) -> Client,
) -> anyhow::Result<Outcome> {
    let origin = Instant::now();
    // Deliveries waiting to be counted; a full queue holds the watchers back.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<u64, String>>(DELIVERY_QUEUE);
    // Watchers get connections of their own, 200 streams each (servers allow 250 or so),
    // so the writers' requests never queue behind them.
    let mut watch_conns = Vec::new();
    for _ in 0..args.watchers.max(1).div_ceil(WATCHES_PER_CONN) {
        watch_conns.push(connect(k).await?);
    }
    let mut watchers = Vec::new();
    for w in 0..args.watchers.max(1) {
        let ns = format!("bench-{}", w as u64 % args.namespaces.max(1));
        let mut c = Client {
            sender: watch_conns[w / WATCHES_PER_CONN].clone(),
            token: k.token.clone(),
        };
        let tx = tx.clone();
        // Each watcher starts from now (resourceVersion of a fresh list).
        let bytes = c
            .expect(
                Method::GET,
                &format!("/api/v1/namespaces/{ns}/pods?limit=1"),
                None,
                &[200],
            )
            .await
            .map_err(|e| anyhow::anyhow!("listing before the watch: {e}"))?;
        let rv = serde_json::from_slice::<Value>(&bytes)?["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("0")
            .to_string();
        let path = format!(
            "/api/v1/namespaces/{ns}/pods?watch=true&resourceVersion={rv}&timeoutSeconds=600"
        );
        watchers.push(tokio::spawn(async move {
            c.sender.ready().await.ok();
            let req = Request::builder()
                .method(Method::GET)
                .uri(&path)
                .header("authorization", format!("Bearer {}", c.token))
                .body(Full::new(Bytes::new()));
            let Ok(req) = req else { return };
            let resp = match c.sender.send_request(req).await {
                Ok(r) if r.status() == StatusCode::OK => r,
                Ok(r) => {
                    let _ = tx
                        .send(Err(format!("watch: HTTP {}", r.status().as_u16())))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("watch: {e}"))).await;
                    return;
                }
            };
            let mut body = resp.into_body();
            let mut buf: Vec<u8> = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=end).collect();
                    let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                        continue;
                    };
                    if let Some(sent) = ev["object"]["metadata"]["annotations"]["bench/sent-us"]
                        .as_str()
                        .and_then(|s| s.parse::<u64>().ok())
                    {
                        let now = origin.elapsed().as_micros() as u64;
                        let _ = tx.send(Ok(now.saturating_sub(sent).max(1))).await;
                    }
                }
            }
        }));
    }
    drop(tx);
    // Writers: merge patches of pods' annotations.
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut writers = Vec::new();
    for i in 0..args.clients.max(1) {
        let (mut c, next, args) = (client(i), next.clone(), args.clone());
        writers.push(tokio::spawn(async move {
            let mut errors: Vec<String> = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= args.total {
                    return errors;
                }
                let ns_index = n % args.namespaces.max(1);
                let which = rand::random::<u64>() % args.pods_per_namespace.max(1);
                let index = which * args.namespaces.max(1) + ns_index;
                let sent = origin.elapsed().as_micros() as u64;
                let patch =
                    json!({"metadata": {"annotations": {"bench/sent-us": sent.to_string()}}});
                let path = format!("/api/v1/namespaces/bench-{ns_index}/pods/bench-{index}");
                let req = Request::builder()
                    .method(Method::PATCH)
                    .uri(&path)
                    .header("authorization", format!("Bearer {}", c.token))
                    .header("content-type", "application/merge-patch+json")
                    .body(Full::new(Bytes::from(patch.to_string())));
                let Ok(req) = req else { continue };
                if c.sender.ready().await.is_err() {
                    errors.push("connection closed".into());
                    continue;
                }
                match c.sender.send_request(req).await {
                    Ok(r) if r.status() == StatusCode::OK => {
                        let _ = r.into_body().collect().await;
                    }
                    Ok(r) => errors.push(format!("patch: HTTP {}", r.status().as_u16())),
                    Err(e) => errors.push(format!("patch: {e}")),
                }
            }
        }));
    }
    let mut out = Outcome::new();
    for w in writers {
        for e in w.await? {
            *out.errors.entry(e).or_default() += 1;
        }
    }
    out.elapsed = started.elapsed();
    // Deliveries still in flight arrive; a second without one ends the run.
    loop {
        match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            Ok(Some(Ok(us))) => {
                let _ = out.latency_us.record(us);
            }
            Ok(Some(Err(e))) => *out.errors.entry(e).or_default() += 1,
            Ok(None) | Err(_) => break,
        }
    }
    for w in watchers {
        w.abort();
    }
    Ok(out)
}
