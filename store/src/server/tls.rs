//! TLS for client connections (etcd's `--cert-file`, `--key-file`, `--trusted-ca-file`,
//! `--client-cert-auth`), with rustls.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// The files and switches of one TLS listener kind.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub trusted_ca_file: Option<PathBuf>,
    /// Refuse clients without a certificate signed by `trusted_ca_file`.
    pub client_cert_auth: bool,
}

fn open(path: &Path) -> anyhow::Result<BufReader<File>> {
    Ok(BufReader::new(
        File::open(path).with_context(|| format!("opening {}", path.display()))?,
    ))
}

type Identity = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// A certificate chain and its key, from PEM files.
fn load_identity(cert_file: &Path, key_file: &Path) -> anyhow::Result<Identity> {
    let certs = rustls_pemfile::certs(&mut open(cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading certificates from {}", cert_file.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", cert_file.display());
    }
    let key = rustls_pemfile::private_key(&mut open(key_file)?)
        .with_context(|| format!("reading the key from {}", key_file.display()))?
        .with_context(|| format!("{} holds no PEM private key", key_file.display()))?;
    Ok((certs, key))
}

/// The CA certificates in a PEM file.
fn roots(ca: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut open(ca)?) {
        let cert = cert.with_context(|| format!("reading {}", ca.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("adding a CA certificate from {}", ca.display()))?;
    }
    Ok(roots)
}

/// Builds the acceptor, checking the files now so a bad one stops the member at start.
pub fn acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let (certs, key) = load_identity(&files.cert_file, &files.key_file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = if files.client_cert_auth {
        let Some(ca) = &files.trusted_ca_file else {
            bail!("--client-cert-auth needs --trusted-ca-file");
        };
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider)
            .build()
            .context("client certificate verifier")?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("the certificate and key do not form a usable pair")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The client side of peer TLS: trusts `trusted_ca_file` and presents this member's
/// certificate, so peers that ask for one (`--peer-client-cert-auth`) accept it.
pub fn peer_client_config(files: &TlsFiles) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let Some(ca) = &files.trusted_ca_file else {
        bail!("https peer URLs need --peer-trusted-ca-file to verify the other members");
    };
    client_config(ca, Some((&files.cert_file, &files.key_file)))
}

/// A TLS client configuration trusting the CA certificates in `ca`, presenting `identity`
/// (certificate and key files) when given.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots(ca)?);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert_file, key_file)) => {
            let (certs, key) = load_identity(cert_file, key_file)?;
            builder
                .with_client_auth_cert(certs, key)
                .context("the certificate and key do not form a usable pair")?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// How long connecting to an https URL may take, and then its TLS handshake.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A lazily connected gRPC channel to an `https://host:port` URL over rustls.
pub fn https_channel(
    url: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<tonic::transport::Channel, String> {
    let Some(rest) = url.strip_prefix("https://") else {
        return Err("not an https:// URL".into());
    };
    let authority = rest.trim_end_matches('/').to_string();
    let host = match authority.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
        None => authority.clone(),
    };
    let server_name = rustls::pki_types::ServerName::try_from(host).map_err(|e| e.to_string())?;
    // The gRPC layer speaks plain HTTP/2 to what the connector hands it: a TLS stream.
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|e| e.to_string())?
        .http2_keep_alive_interval(std::time::Duration::from_secs(10));
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let (config, server_name, authority) =
            (config.clone(), server_name.clone(), authority.clone());
        async move {
            let timed_out = |what: &str| std::io::Error::new(std::io::ErrorKind::TimedOut, what);
            let tcp = tokio::time::timeout(
                CONNECT_TIMEOUT,
                tokio::net::TcpStream::connect(authority.as_str()),
            )
            .await
            .map_err(|_| timed_out("connect timed out"))??;
            tcp.set_nodelay(true)?;
            let tls = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                tokio_rustls::TlsConnector::from(config).connect(server_name, tcp),
            )
            .await
            .map_err(|_| timed_out("TLS handshake timed out"))??;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// A peer connection after its TLS handshake, as the gRPC server reads it.
pub struct PeerTlsIo {
    stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    info: tonic::transport::server::TcpConnectInfo,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl PeerTlsIo {
    pub fn new(
        stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        info: tonic::transport::server::TcpConnectInfo,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> PeerTlsIo {
        PeerTlsIo {
            stream,
            info,
            _permit: permit,
        }
    }
}

impl tonic::transport::server::Connected for PeerTlsIo {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl tokio::io::AsyncRead for PeerTlsIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for PeerTlsIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
