//! Requests etcd refuses, refused the same way, and bytes that are not requests at all,
//! which must not hurt the cluster.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// A transaction (read by `etcdctl txn` from stdin) with no compares and `ops` as its
/// success branch.
fn txn_of(ops: &[String]) -> Vec<u8> {
    format!("\n{}\n\n\n", ops.join("\n")).into_bytes()
}

#[test]
fn refused_requests() {
    let c = Cluster::start(3);
    assert_eq!(c.ok(&["put", "k", "v"]), "OK\n");
    let rev = c.revision();

    // Values up to the request limit (--max-request-bytes, 1.5 MiB by default) are fine...
    let one_mib = vec![b'x'; 1024 * 1024];
    let out = c.etcdctl_stdin(&["put", "big"], &one_mib);
    assert_eq!(stdout_ok(&out, &["put", "big"]), "OK\n");
    let got = c.json(&["get", "big"]);
    assert_eq!(
        b64decode(got["kvs"][0]["value"].as_str().expect("value")).len(),
        one_mib.len()
    );
    let rev = rev + 1;

    // ...a larger one is refused.
    let too_big = vec![b'y'; 1_677_722]; // 1.6 MiB
    assert_fails_with(
        &c.etcdctl_stdin(&["put", "huge"], &too_big),
        "etcdserver: request is too large",
    );
    assert_eq!(c.ok(&["get", "huge"]), "");

    // At most 128 operations in a transaction (--max-txn-ops)...
    let ops: Vec<String> = (0..128).map(|i| format!("put t{i:03} v")).collect();
    let out = c.etcdctl_stdin(&["txn"], &txn_of(&ops));
    let text = stdout_ok(&out, &["txn"]);
    assert!(text.starts_with("SUCCESS\n"), "{text}");
    assert_eq!(text.matches("OK\n").count(), 128, "{text}");
    let rev = rev + 1;
    // ...129 are refused.
    let ops: Vec<String> = (0..129).map(|i| format!("put u{i:03} v")).collect();
    assert_fails_with(
        &c.etcdctl_stdin(&["txn"], &txn_of(&ops)),
        "etcdserver: too many operations in txn request",
    );
    assert_eq!(c.ok(&["get", "u000"]), "");

    // A transaction branch may write a key only once.
    let ops = vec!["put dup a".to_string(), "put dup b".to_string()];
    assert_fails_with(
        &c.etcdctl_stdin(&["txn"], &txn_of(&ops)),
        "etcdserver: duplicate key given in txn request",
    );
    // Also a put inside a range the same branch deletes.
    let ops = vec!["del d --prefix".to_string(), "put dup b".to_string()];
    assert_fails_with(
        &c.etcdctl_stdin(&["txn"], &txn_of(&ops)),
        "etcdserver: duplicate key given in txn request",
    );
    assert_eq!(c.ok(&["get", "dup"]), "");

    // A range whose end sorts before its start is empty, not an error.
    assert_eq!(c.ok(&["put", "a", "1"]), "OK\n");
    assert_eq!(c.ok(&["put", "b", "2"]), "OK\n");
    let rev = rev + 2;
    let out = c.etcdctl(&["get", "b", "a"]);
    assert_eq!(stdout_ok(&out, &["get", "b", "a"]), "");

    // A revision not written yet.
    assert_fails_with(
        &c.etcdctl(&["get", "k", &format!("--rev={}", rev + 100)]),
        "etcdserver: mvcc: required revision is a future revision",
    );

    // An empty key.
    assert_fails_with(
        &c.etcdctl(&["put", "", "v"]),
        "etcdserver: key is not provided",
    );

    // A lease TTL above etcd's maximum (9,000,000,000 s).
    assert_fails_with(
        &c.etcdctl(&["lease", "grant", "9000000001"]),
        "etcdserver: too large lease TTL",
    );

    // None of the refused requests wrote anything.
    assert_eq!(c.revision(), rev);
    assert_eq!(c.ok(&["get", "k"]), "k\nv\n");
}

/// Connects to `port`, writes `bytes`, reads whatever comes back for a moment, and hangs up.
fn send_garbage(port: u16, bytes: &[u8]) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        panic!("cannot connect to 127.0.0.1:{port}");
    };
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("read timeout");
    s.set_write_timeout(Some(Duration::from_secs(2)))
        .expect("write timeout");
    // The server may hang up part way through; that is fine.
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 4096];
    let _ = s.read(&mut buf);
}

fn junk(n: usize, seed: u64) -> Vec<u8> {
    // xorshift: deterministic noise.
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn garbage_on_client_and_peer_ports() {
    let mut c = Cluster::start(3);
    assert_eq!(c.ok(&["put", "before", "1"]), "OK\n");

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut payloads: Vec<Vec<u8>> = vec![
        junk(64 * 1024, 1),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(), // a TLS ClientHello start
    ];
    // HTTP/2 preface, then junk frames.
    let mut p = PREFACE.to_vec();
    p.extend(junk(4096, 2));
    payloads.push(p);
    // HTTP/2 preface, then a frame header announcing 16 MiB that never comes.
    let mut p = PREFACE.to_vec();
    p.extend([0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01]);
    payloads.push(p);
    // HTTP/2 preface, an empty SETTINGS frame, then a HEADERS frame of junk on stream 1.
    let mut p = PREFACE.to_vec();
    p.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
    p.extend([0, 0, 64, 1, 4, 0, 0, 0, 1]);
    p.extend(junk(64, 3));
    payloads.push(p);

    for i in 0..c.len() {
        let (client, peer) = (c.members[i].client_port, c.members[i].peer_port);
        for payload in &payloads {
            send_garbage(client, payload);
            send_garbage(peer, payload);
        }
    }

    // Every member is still running...
    for i in 0..c.len() {
        assert!(c.is_alive(i), "member {i} exited after garbage input");
    }
    // ...and still serving: each one answers, and the cluster still commits writes.
    c.wait_ready();
    for i in 0..c.len() {
        let out = c.etcdctl_at(i, &["get", "before"]);
        assert_eq!(
            stdout_ok(&out, &["get", "before"]),
            "before\n1\n",
            "member {i}"
        );
    }
    assert_eq!(c.ok(&["put", "after", "2"]), "OK\n");
    assert_eq!(c.ok(&["get", "after"]), "after\n2\n");
    for i in 0..c.len() {
        assert!(c.is_alive(i), "member {i} exited after garbage input");
    }
}

/// A gRPC call the client port does not serve gets `Unimplemented` with grpc-go's words,
/// and the member goes on serving.
#[test]
fn unknown_services_on_the_client_port() {
    use flotilla_proto::flotillapb::{peer_client::PeerClient, RaftPayload};

    let c = Cluster::start(1);
    let url = c.members[0].client_url();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (unknown, malformed) = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        // The peer service lives on the peer port only.
        let unknown = PeerClient::new(channel.clone())
            .vote(RaftPayload::default())
            .await
            .expect_err("the client port has no peer service");
        // A path without a method.
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.expect("ready");
        let malformed = grpc
            .unary::<RaftPayload, RaftPayload, _>(
                tonic::Request::new(RaftPayload::default()),
                http::uri::PathAndQuery::from_static("/etcdserverpb.KV"),
                tonic::codec::ProstCodec::default(),
            )
            .await
            .expect_err("a path without a method");
        (unknown, malformed)
    });
    assert_eq!(unknown.code(), tonic::Code::Unimplemented, "{unknown:?}");
    assert_eq!(unknown.message(), "unknown service flotillapb.Peer");
    assert_eq!(
        malformed.code(),
        tonic::Code::Unimplemented,
        "{malformed:?}"
    );
    assert!(
        malformed.message().contains("malformed method name"),
        "{malformed:?}"
    );
    assert_eq!(c.ok(&["put", "k", "v"]), "OK\n");
    assert_eq!(c.ok(&["get", "k"]), "k\nv\n");
}

/// `flotilla bench` against an endpoint that is not there, one that is not a gRPC server,
/// and a server that refuses every request: a clear message, a non-zero exit, and no
/// throughput for the failed run.
#[test]
fn bench_reports_unreachable_and_failing_servers() {
    let stderr_of = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).to_string();

    // Nobody listens on the port.
    let port = free_port();
    let endpoint = format!("127.0.0.1:{port}");
    let out = flotilla(&["bench", "put", "--endpoints", &endpoint, "--total", "10"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr_of(&out).contains(&format!("cannot connect to http://{endpoint}")),
        "{out:?}"
    );
    assert!(
        out.stdout.is_empty(),
        "no result for a run that never started: {out:?}"
    );

    // Something listens, but it answers HTTP/2 with a closed connection.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = listener.local_addr().expect("addr").to_string();
    let closer = std::thread::spawn(move || {
        for stream in listener.incoming().take(1) {
            let mut stream = stream.expect("accept");
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let out = flotilla(&["bench", "put", "--endpoints", &endpoint, "--total", "10"]);
    closer.join().expect("closer");
    assert!(!out.status.success(), "{out:?}");
    let err = stderr_of(&out);
    assert!(
        err.contains(&format!("http://{endpoint}")) && !err.contains("panicked"),
        "{out:?}"
    );
    assert!(out.stdout.is_empty(), "{out:?}");

    // A real member that refuses every request (values over the request limit).
    let c = Cluster::start(1);
    let endpoint = c.members[0].endpoint();
    let out = flotilla(&[
        "bench",
        "put",
        "--endpoints",
        &endpoint,
        "--total",
        "20",
        "--clients",
        "4",
        "--val-size",
        "2000000",
        "--json",
    ]);
    assert!(!out.status.success(), "{out:?}");
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let result: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON result");
    assert_eq!(result["failed"], 20, "{result}");
    assert_eq!(result["total"], 0, "{result}");
    assert!(result["requests_per_second"].is_null(), "{result}");
    let errors = result["errors"].to_string();
    assert!(
        errors.contains("etcdserver: request is too large"),
        "{result}"
    );
    assert!(stderr_of(&out).contains("20 requests failed"), "{out:?}");
}
