//! Credentials a single-machine cluster makes for itself on first start: a cluster CA, the
//! apiserver's serving certificate, an admin token, and the admin kubeconfig that holds them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Where the files live under a data dir.
pub struct Files {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub tokens: PathBuf,
    pub kubeconfig: PathBuf,
    /// The key secrets are encrypted at rest with.
    pub encryption_key: PathBuf,
}

impl Files {
    pub fn under(dir: &Path) -> Files {
        let pki = dir.join("pki");
        Files {
            ca_cert: pki.join("ca.crt"),
            ca_key: pki.join("ca.key"),
            serving_cert: pki.join("apiserver.crt"),
            serving_key: pki.join("apiserver.key"),
            tokens: dir.join("tokens.csv"),
            kubeconfig: dir.join("admin.kubeconfig"),
            encryption_key: pki.join("secrets.key"),
        }
    }
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Written beside and renamed into place: never through a link someone left at `path`,
    // and always 0600.
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Makes the CA, serving certificate (for `hosts`: names and IP addresses), admin token and
/// kubeconfig if they are not there yet; existing ones are kept. Returns whether it made them.
pub fn ensure(dir: &Path, hosts: &[String], server_url: &str) -> anyhow::Result<bool> {
    let f = Files::under(dir);
    if !f.encryption_key.exists() {
        write_private(&f.encryption_key, &crate::crypt::Codec::generate()?)?;
    }
    let present = [
        &f.ca_cert,
        &f.ca_key,
        &f.serving_cert,
        &f.serving_key,
        &f.tokens,
        &f.kubeconfig,
    ]
    .iter()
    .filter(|p| p.exists())
    .count();
    if present == 6 {
        return Ok(false);
    }
    if present > 0 {
        // Making new ones would void the kubeconfigs handed out with the old.
        anyhow::bail!(
            "{} holds some of the cluster's credentials but not all; restore the missing \
             files, or remove pki/, tokens.csv and admin.kubeconfig to make new ones",
            dir.display()
        );
    }
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "flotilla-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;

    let key = KeyPair::generate().context("generating the serving key")?;
    let mut serving = CertificateParams::new(hosts.to_vec())?;
    serving
        .distinguished_name
        .push(DnType::CommonName, "flotilla-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    serving.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let serving_cert = serving
        .signed_by(&key, &ca_cert, &ca_key)
        .context("signing the serving certificate")?;

    let token = {
        use rand::RngCore;
        let mut b = [0u8; 24];
        rand::thread_rng().fill_bytes(&mut b);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    };
    write_private(&f.ca_key, &ca_key.serialize_pem())?;
    write_private(&f.ca_cert, &ca_cert.pem())?;
    write_private(&f.serving_key, &key.serialize_pem())?;
    write_private(&f.serving_cert, &serving_cert.pem())?;
    write_private(
        &f.tokens,
        &format!("{token},admin,admin,\"system:masters\"\n"),
    )?;
    write_private(
        &f.kubeconfig,
        &kubeconfig(server_url, &ca_cert.pem(), &token),
    )?;
    Ok(true)
}

/// An admin kubeconfig for `server`, trusting `ca_pem`, authenticating with `token`.
pub fn kubeconfig(server: &str, ca_pem: &str, token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: flotilla\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
         users:\n\
         - name: admin\n  user:\n    token: {token}\n\
         contexts:\n\
         - name: flotilla\n  context:\n    cluster: flotilla\n    user: admin\n\
         current-context: flotilla\n"
    )
}
