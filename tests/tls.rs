//! TLS on client URLs with etcd's flags: etcdctl with `--cacert --cert --key` works; a client
//! that does not trust the server's CA, or that has no certificate when client-cert auth is
//! on, is refused.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", describe(&out));
}

/// A CA, and a certificate it signed for 127.0.0.1 good for server and client use.
fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=flotilla-test-ca",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "member.key",
            "-out",
            "member.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .expect("writing ext.cnf");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "member.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "member.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

struct Member(Child);

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn etcdctl_over_tls_with_client_certificates() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    make_certs(d);
    let (client, peer) = (free_port(), free_port());
    let client_url = format!("https://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let log = std::fs::File::create(d.join("member.log")).expect("log file");
    let _member = Member(
        Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["store", "--name", "tls", "--data-dir"])
            .arg(d.join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .arg("--cert-file")
            .arg(d.join("member.crt"))
            .arg("--key-file")
            .arg(d.join("member.key"))
            .arg("--trusted-ca-file")
            .arg(d.join("ca.crt"))
            .arg("--client-cert-auth")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("starting flotilla store"),
    );
    let path = |f: &str| d.join(f).display().to_string();
    let (ca, cert, key) = (path("ca.crt"), path("member.crt"), path("member.key"));
    let with_certs = |args: &[&str]| {
        let mut all = vec!["--cacert", &ca, "--cert", &cert, "--key", &key];
        all.extend_from_slice(args);
        etcdctl(&client_url, &all, None)
    };
    let ready = poll(READY_TIMEOUT, || {
        with_certs(&["endpoint", "health"])
            .status
            .success()
            .then_some(())
    });
    assert!(
        ready.is_some(),
        "the member never became healthy over TLS: {}",
        std::fs::read_to_string(d.join("member.log")).unwrap_or_default()
    );
    assert_eq!(stdout_ok(&with_certs(&["put", "k", "v"]), &["put"]), "OK\n");
    assert_eq!(
        stdout_ok(&with_certs(&["get", "k", "--print-value-only"]), &["get"]),
        "v\n"
    );
    let status = stdout_ok(
        &with_certs(&["endpoint", "status", "--cluster", "-w", "json"]),
        &["endpoint", "status"],
    );
    assert!(status.contains(&client_url), "{status}");

    // Without trusting the CA, or without a client certificate: refused.
    let short = Duration::from_secs(2);
    let timeout = format!("--dial-timeout={}s", short.as_secs());
    let untrusted = etcdctl(&client_url, &[&timeout, "get", "k"], None);
    assert!(!untrusted.status.success(), "{}", describe(&untrusted));
    let no_cert = etcdctl(&client_url, &["--cacert", &ca, &timeout, "get", "k"], None);
    assert!(!no_cert.status.success(), "{}", describe(&no_cert));
    // Plain HTTP to the TLS port is no way around it either.
    let plain = etcdctl(
        &format!("http://127.0.0.1:{client}"),
        &[&timeout, "get", "k"],
        None,
    );
    assert!(!plain.status.success(), "{}", describe(&plain));
}
