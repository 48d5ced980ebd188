//! Flotilla's Kubernetes API server: stateless and multi-master, over any store that speaks
//! the etcd v3 API. [`run`] serves HTTPS until shut down.
//!
//! Objects are JSON under `/registry/<resource>/<namespace>/<name>`; `resourceVersion` is the
//! store's `mod_revision`; every write is a Txn comparing it.

pub mod apply;
pub mod convert;
pub mod crd;
pub mod crypt;
pub mod discovery;
pub mod etcd;
pub mod events;
pub mod handler;
pub mod kinds;
pub mod openapi;
pub mod patch;
pub mod pki;
pub mod protobuf;
pub mod resources;
pub mod schema;
pub mod services;
pub mod status;
pub mod table;
pub mod watch_cache;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_rustls::rustls;

use handler::{State, User};

const SYSTEM_NAMESPACES: [&str; 4] = ["default", "kube-system", "kube-public", "kube-node-lease"];

/// Connections served at once.
const MAX_CONNECTIONS: usize = 8192;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// kube-apiserver's flags, as far as they are supported.
#[derive(Debug, Clone)]
pub struct Config {
    pub etcd_servers: Vec<String>,
    pub bind_address: std::net::IpAddr,
    pub secure_port: u16,
    pub tls_cert_file: PathBuf,
    pub tls_private_key_file: PathBuf,
    /// `token,user,uid,"group1,group2"` per line.
    pub token_auth_file: Option<PathBuf>,
    /// CA certificates (PEM) client certificates must chain to: the user is the
    /// certificate's CommonName, its groups the Organizations.
    pub client_ca_file: Option<PathBuf>,
    /// Where Services' cluster IPs come from (the first is the `kubernetes` Service's).
    pub service_cluster_ip_range: String,
    /// A base64 AES-256 key: secrets are encrypted with it before they reach the store.
    pub encryption_key_file: Option<PathBuf>,
}

/// kube-apiserver's default --service-cluster-ip-range.
pub const DEFAULT_SERVICE_RANGE: &str = "10.96.0.0/12";

/// Reads a `--token-auth-file`.
pub fn read_tokens(path: &Path) -> anyhow::Result<HashMap<String, User>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.splitn(4, ',');
        let (Some(token), Some(user)) = (fields.next(), fields.next()) else {
            bail!(
                "{}:{}: want token,user,uid[,\"groups\"]",
                path.display(),
                n + 1
            );
        };
        let _uid = fields.next();
        let groups = fields
            .next()
            .map(|g| {
                g.trim_matches('"')
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        out.insert(
            token.to_string(),
            User {
                name: user.to_string(),
                groups,
            },
        );
    }
    Ok(out)
}

fn tls_acceptor(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let open = |p: &Path| -> anyhow::Result<std::io::BufReader<std::fs::File>> {
        Ok(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
        ))
    };
    let certs = rustls_pemfile::certs(&mut open(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {}", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut open(key)?)
        .with_context(|| format!("reading {}", key.display()))?
        .with_context(|| format!("{} holds no PEM private key", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        // Client certificates are asked for, not required: tokens still work.
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut open(ca)?) {
                roots
                    .add(c.with_context(|| format!("reading {}", ca.display()))?)
                    .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
            }
            if roots.is_empty() {
                bail!("{} holds no PEM certificate", ca.display());
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .context("the client CA")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("the serving certificate and key do not form a usable pair")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The user a client certificate names: CommonName, with the Organizations as groups
/// (kube-apiserver's x509 authenticator).
pub fn user_of_certificate(der: &[u8]) -> Option<User> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())?
        .to_string();
    if name.is_empty() {
        return None;
    }
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok())
        .map(str::to_string)
        .collect();
    Some(User { name, groups })
}

/// Serves the Kubernetes API on `bind_address:secure_port` until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let acceptor = tls_acceptor(
        &config.tls_cert_file,
        &config.tls_private_key_file,
        config.client_ca_file.as_deref(),
    )?;
    let tokens = match &config.token_auth_file {
        Some(p) => read_tokens(p)?,
        None => HashMap::new(),
    };
    let service_range = services::IpRange::parse(&config.service_cluster_ip_range)
        .map_err(|e| anyhow::anyhow!("--service-cluster-ip-range: {e}"))?;
    let codec = match &config.encryption_key_file {
        Some(p) => crypt::Codec::from_file(p)?,
        None => crypt::Codec::plain(),
    };
    let state = Arc::new(State {
        codec: Arc::new(codec),
        service_range,
        store: etcd::Store::connect(&config.etcd_servers)?,
        tokens,
        inflight: tokio::sync::Semaphore::new(handler::MAX_INFLIGHT),
        watches: Arc::new(tokio::sync::Semaphore::new(handler::MAX_WATCHES)),
        event_lease: tokio::sync::Mutex::new(None),
        lease_lost: std::sync::atomic::AtomicBool::new(false),
        caches: Default::default(),
    });
    // Every built-in resource's watch cache loads now, as Kubernetes' do, so no client
    // waits for one on first use; Events' loads on first use (Kubernetes keeps them out
    // of its watch cache: many, short-lived); a converted resource uses its stored one's.
    for r in resources::RESOURCES {
        if r.plural != "events" && convert::of(r).is_none() {
            state.caches.get(r, &state.store, &state.codec);
        }
    }
    // The custom resources the stored CRDs define, kept up to date.
    tokio::spawn(crd::follow(state.store.clone(), state.codec.clone()));
    // The namespaces every cluster has; retried until the store answers.
    let bootstrap = state.clone();
    let secure_port = config.secure_port;
    tokio::spawn(async move {
        for ns in SYSTEM_NAMESPACES {
            while let Err(e) = handler::ensure_namespace(&bootstrap.store, ns).await {
                tracing::debug!(namespace = ns, error = %e, "creating a system namespace; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        while let Err(e) = handler::ensure_kubernetes_service(&bootstrap, secure_port).await {
            tracing::debug!(error = %e, "creating the kubernetes Service; retrying");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        while let Err(e) = handler::resume_namespace_deletions(bootstrap.clone()).await {
            tracing::debug!(error = %e, "resuming namespace deletions; retrying");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let addr = SocketAddr::new(config.bind_address, config.secure_port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    tracing::info!(%addr, "apiserver serving");
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => p?,
            _ = &mut shutdown => return Ok(()),
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, state) = (acceptor.clone(), state.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let tls =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            // A verified client certificate names the connection's user.
            let cert_user = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|c| user_of_certificate(c.as_ref()));
            let cert_user = Arc::new(cert_user);
            let service = hyper::service::service_fn(move |req| {
                handler::handle(state.clone(), cert_user.clone(), req)
            });
            // Idle and slow clients are dropped: a header must arrive within 30 s, and
            // HTTP/2 connections must answer pings.
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30));
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(20))
                .max_concurrent_streams(250);
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}
