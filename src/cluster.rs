//! `flotilla apiserver` (kube-apiserver's flags) and `flotilla up`, the single-machine
//! cluster: a one-member store and the apiserver in one process, with credentials made on
//! first start and kept in the data dir.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use flotilla_apiserver::pki;

#[derive(Args)]
pub struct ApiserverArgs {
    /// Store endpoints (any etcd v3 server), comma-separated.
    #[arg(long, required = true)]
    etcd_servers: String,
    /// Address to serve HTTPS on.
    #[arg(long, default_value = "0.0.0.0")]
    bind_address: IpAddr,
    /// Port to serve HTTPS on.
    #[arg(long, default_value_t = 6443)]
    secure_port: u16,
    /// Where a self-signed serving certificate is made when --tls-cert-file is not given.
    #[arg(long, default_value = "apiserver.local.config/certificates")]
    cert_dir: PathBuf,
    /// Serving certificate (PEM).
    #[arg(long)]
    tls_cert_file: Option<PathBuf>,
    /// Serving key (PEM).
    #[arg(long)]
    tls_private_key_file: Option<PathBuf>,
    /// Bearer tokens: token,user,uid,"group1,group2" per line. Without it (and without
    /// --tls-cert-file), the admin token made in --cert-dir is accepted.
    #[arg(long)]
    token_auth_file: Option<PathBuf>,
    /// CA bundle (PEM) for client certificates: a certificate signed by it authenticates
    /// its CommonName as the user, its Organizations as groups. Without it (and without
    /// --tls-cert-file), the CA made in --cert-dir is used.
    #[arg(long)]
    client_ca_file: Option<PathBuf>,
    /// A base64-encoded 32-byte key: secrets are stored encrypted with it (AES-256-GCM).
    /// Without it (and without --tls-cert-file), the key made in --cert-dir is used.
    #[arg(long)]
    encryption_key_file: Option<PathBuf>,
    /// Where Services' cluster IPs come from (IPv4 CIDR).
    #[arg(long, default_value = flotilla_apiserver::DEFAULT_SERVICE_RANGE)]
    service_cluster_ip_range: String,
}

pub async fn apiserver(
    a: ApiserverArgs,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let mut token_auth_file = a.token_auth_file;
    let mut client_ca_file = a.client_ca_file;
    let mut encryption_key_file = a.encryption_key_file;
    let (cert, key) = match (a.tls_cert_file, a.tls_private_key_file) {
        (Some(c), Some(k)) => (c, k),
        (None, None) => {
            let made = pki::ensure(
                &a.cert_dir,
                &["localhost".into(), "127.0.0.1".into()],
                &format!("https://127.0.0.1:{}", a.secure_port),
            )?;
            if made {
                tracing::info!(dir = %a.cert_dir.display(), "made a self-signed serving certificate");
            }
            let f = pki::Files::under(&a.cert_dir);
            if token_auth_file.is_none() {
                token_auth_file = Some(f.tokens);
            }
            if encryption_key_file.is_none() {
                encryption_key_file = Some(f.encryption_key);
            }
            if client_ca_file.is_none() {
                client_ca_file = Some(f.ca_cert.clone());
            }
            (f.serving_cert, f.serving_key)
        }
        _ => anyhow::bail!("--tls-cert-file and --tls-private-key-file go together"),
    };
    if token_auth_file.is_none() && client_ca_file.is_none() {
        tracing::warn!(
            "neither --token-auth-file nor --client-ca-file: no credentials are accepted, so every request gets 401 Unauthorized"
        );
    }
    let config = flotilla_apiserver::Config {
        etcd_servers: crate::urls(&a.etcd_servers),
        bind_address: a.bind_address,
        secure_port: a.secure_port,
        tls_cert_file: cert,
        tls_private_key_file: key,
        token_auth_file,
        client_ca_file,
        service_cluster_ip_range: a.service_cluster_ip_range,
        encryption_key_file,
    };
    flotilla_apiserver::run(config, shutdown).await
}

#[derive(Args)]
pub struct UpArgs {
    /// Where the cluster keeps its data and credentials (default: ~/.flotilla).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Port of the Kubernetes API (HTTPS, on 127.0.0.1).
    #[arg(long, default_value_t = 6443)]
    secure_port: u16,
    /// Port of the store's etcd API (plain HTTP, on 127.0.0.1).
    #[arg(long, default_value_t = 12379)]
    store_port: u16,
    /// Port of the store's peer traffic (on 127.0.0.1).
    #[arg(long, default_value_t = 12380)]
    store_peer_port: u16,
}

pub async fn up(a: UpArgs) -> anyhow::Result<()> {
    let dir = match a.data_dir {
        Some(d) => d,
        None => PathBuf::from(std::env::var("HOME").context("HOME is not set; give --data-dir")?)
            .join(".flotilla"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let server = format!("https://127.0.0.1:{}", a.secure_port);
    let made = pki::ensure(&dir, &["localhost".into(), "127.0.0.1".into()], &server)?;
    let files = pki::Files::under(&dir);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let store_url = format!("http://127.0.0.1:{}", a.store_port);
    let peer_url = format!("http://127.0.0.1:{}", a.store_peer_port);
    let store_config = flotilla_store::Config {
        name: "flotilla-up".into(),
        data_dir: dir.join("store"),
        listen_client_urls: vec![store_url.clone()],
        advertise_client_urls: vec![store_url.clone()],
        listen_peer_urls: vec![peer_url.clone()],
        initial_advertise_peer_urls: vec![peer_url.clone()],
        initial_cluster: format!("flotilla-up={peer_url}"),
        ..Default::default()
    };
    let store = tokio::spawn(flotilla_store::run(store_config, stopped()));
    let api_config = flotilla_apiserver::Config {
        etcd_servers: vec![store_url],
        bind_address: "127.0.0.1".parse()?,
        secure_port: a.secure_port,
        tls_cert_file: files.serving_cert,
        tls_private_key_file: files.serving_key,
        token_auth_file: Some(files.tokens),
        client_ca_file: Some(files.ca_cert),
        service_cluster_ip_range: flotilla_apiserver::DEFAULT_SERVICE_RANGE.into(),
        encryption_key_file: Some(files.encryption_key),
    };
    let api = tokio::spawn(flotilla_apiserver::run(api_config, stopped()));
    println!(
        "Flotilla is {} at {server} (data in {}).\n\
         Point kubectl at it:\n\n  export KUBECONFIG={}\n  kubectl get namespaces\n\n\
         Ctrl-C stops it; `flotilla up` again brings the same cluster back.",
        if made { "up for the first time" } else { "up" },
        dir.display(),
        files.kubeconfig.display()
    );
    let outcome = tokio::select! {
        _ = crate::shutdown_signal() => Ok(()),
        r = api => r.map_err(anyhow::Error::from).and_then(|r| r).context("apiserver"),
    };
    let _ = stop_tx.send(true);
    let stored = store
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r)
        .context("store");
    outcome.and(stored)
}
