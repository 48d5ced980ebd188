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

    // A backup over TLS with our own tool, as etcdctl's flags.
    let backup = d.join("tls.backup").display().to_string();
    let save = |extra: &[&str]| {
        let mut args = vec![
            "store",
            "snapshot",
            "save",
            &backup,
            "--endpoints",
            &client_url,
        ];
        args.extend_from_slice(extra);
        flotilla(&args)
    };
    let out = save(&["--cacert", &ca, "--cert", &cert, "--key", &key]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = save(&[]);
    assert!(
        !out.status.success() && stderr(&out).contains("--cacert"),
        "{}",
        describe(&out)
    );

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

#[test]
fn members_replicate_over_peer_tls_and_the_peer_port_wants_a_certificate() {
    let certs = tempfile::tempdir().expect("temp dir");
    let d = certs.path();
    make_certs(d);
    let path = |f: &str| d.join(f).display().to_string();
    let (ca, cert, key) = (path("ca.crt"), path("member.crt"), path("member.key"));
    let mut c = Cluster::start_peers_with(
        3,
        "https",
        &[
            "--peer-cert-file",
            &cert,
            "--peer-key-file",
            &key,
            "--peer-trusted-ca-file",
            &ca,
            "--peer-client-cert-auth",
        ],
    );
    assert!(c.members[0].peer_url().starts_with("https://"));
    // Writes through every member: followers forward to the leader over peer TLS, and the
    // leader replicates over it.
    for i in 0..3 {
        let key = format!("k{i}");
        stdout_ok(&c.etcdctl_at(i, &["put", &key, "v"]), &["put"]);
    }
    let all_have = |c: &Cluster, members: std::ops::Range<usize>| {
        members.clone().all(|i| {
            let out = c.etcdctl_at(
                i,
                &["get", "k", "--prefix", "--keys-only", "--consistency=s"],
            );
            stdout(&out).lines().filter(|l| !l.is_empty()).count() == 3
        })
    };
    assert!(
        poll(POLL_TIMEOUT, || all_have(&c, 0..3).then_some(())).is_some(),
        "not every member got the writes over peer TLS"
    );

    // A new member joins over TLS as well.
    let i = c.new_member();
    let (name, peer) = (c.members[i].name.clone(), c.members[i].peer_url());
    c.ok(&["member", "add", &name, &format!("--peer-urls={peer}")]);
    let initial_cluster = format!("{},{name}={peer}", c.initial_cluster());
    c.start_joining(i, &initial_cluster);
    assert!(
        poll(READY_TIMEOUT, || all_have(&c, i..i + 1).then_some(())).is_some(),
        "the new member did not catch up over peer TLS:\n{}",
        c.log_tails()
    );

    // The peer port: no certificate, or no TLS at all, gets nowhere.
    let peer_url = c.members[0].peer_url();
    let short = "--dial-timeout=2s";
    let no_cert = etcdctl(&peer_url, &["--cacert", &ca, short, "get", "k0"], None);
    assert!(!no_cert.status.success(), "{}", describe(&no_cert));
    assert!(
        !stderr(&no_cert).contains("Unimplemented"),
        "the handshake should fail, not the call: {}",
        describe(&no_cert)
    );
    let plain = format!("http://127.0.0.1:{}", c.members[0].peer_port);
    let out = etcdctl(&plain, &[short, "get", "k0"], None);
    assert!(!out.status.success(), "{}", describe(&out));
    // With the certificate the handshake passes (and the peer port serves no KV).
    let with_cert = etcdctl(
        &peer_url,
        &[
            "--cacert", &ca, "--cert", &cert, "--key", &key, short, "get", "k0",
        ],
        None,
    );
    assert!(
        stderr(&with_cert).contains("Unimplemented")
            || stderr(&with_cert).contains("unknown service"),
        "{}",
        describe(&with_cert)
    );
}
