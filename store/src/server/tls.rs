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

/// Builds the acceptor, checking the files now so a bad one stops the member at start.
pub fn acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut open(&files.cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading certificates from {}", files.cert_file.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", files.cert_file.display());
    }
    let key = rustls_pemfile::private_key(&mut open(&files.key_file)?)
        .with_context(|| format!("reading the key from {}", files.key_file.display()))?
        .with_context(|| format!("{} holds no PEM private key", files.key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = if files.client_cert_auth {
        let Some(ca) = &files.trusted_ca_file else {
            bail!("--client-cert-auth needs --trusted-ca-file");
        };
        let mut roots = RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut open(ca)?) {
            let cert = cert.with_context(|| format!("reading {}", ca.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("adding a CA certificate from {}", ca.display()))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
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
