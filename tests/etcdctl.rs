//! The etcd v3 API as Debian's `etcdctl` (v3.4) sees it, against a 3-member Flotilla
//! cluster. Every expected output below is what etcd itself prints for the same commands.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

/// What `etcdctl txn -i` prints before the result, one prompt per section.
const TXN_PROMPTS: &str =
    "compares:\nsuccess requests (get, put, del):\nfailure requests (get, put, del):\n";

fn kv_lines(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(k, v)| format!("{k}\n{v}\n")).collect()
}

#[test]
fn put_and_get() {
    let c = Cluster::start(3);

    // A fresh cluster is at revision 1.
    let empty = c.json(&["get", "foo"]);
    assert_eq!(empty["header"]["revision"], 1, "{empty}");
    assert!(empty.get("kvs").is_none(), "{empty}");

    // The first write gets revision 2.
    let put = c.json(&["put", "foo", "bar"]);
    assert_eq!(put["header"]["revision"], 2, "{put}");
    let got = c.json(&["get", "foo"]);
    assert_eq!(got["header"]["revision"], 2, "{got}");
    assert_eq!(got["count"], 1, "{got}");
    let kv = &got["kvs"][0];
    assert_eq!(b64str(&kv["key"]), "foo");
    assert_eq!(b64str(&kv["value"]), "bar");
    assert_eq!(kv["create_revision"], 2, "{got}");
    assert_eq!(kv["mod_revision"], 2, "{got}");
    assert_eq!(kv["version"], 1, "{got}");

    // A second write of the same key: version 2, create_revision unchanged.
    assert_eq!(c.ok(&["put", "foo", "baz"]), "OK\n");
    let got = c.json(&["get", "foo"]);
    assert_eq!(got["header"]["revision"], 3, "{got}");
    let kv = &got["kvs"][0];
    assert_eq!(b64str(&kv["value"]), "baz");
    assert_eq!(kv["create_revision"], 2, "{got}");
    assert_eq!(kv["mod_revision"], 3, "{got}");
    assert_eq!(kv["version"], 2, "{got}");

    // Simple get, and the old value at the older revision.
    assert_eq!(c.ok(&["get", "foo"]), "foo\nbaz\n");
    assert_eq!(c.ok(&["get", "foo", "--rev=2"]), "foo\nbar\n");
    assert_eq!(c.ok(&["get", "missing"]), "");

    // a@4, b@5, c@6, ab@7.
    for (k, v) in [("a", "1"), ("b", "2"), ("c", "3"), ("ab", "12")] {
        assert_eq!(c.ok(&["put", k, v]), "OK\n");
    }
    assert_eq!(c.revision(), 7);

    assert_eq!(
        c.ok(&["get", "a", "--prefix"]),
        kv_lines(&[("a", "1"), ("ab", "12")])
    );
    // [a, c): c itself is excluded.
    assert_eq!(
        c.ok(&["get", "a", "c"]),
        kv_lines(&[("a", "1"), ("ab", "12"), ("b", "2")])
    );
    assert_eq!(
        c.ok(&["get", "a", "c", "--limit", "2"]),
        kv_lines(&[("a", "1"), ("ab", "12")])
    );
    let limited = c.json(&["get", "a", "c", "--limit", "2"]);
    assert_eq!(limited["more"], true, "{limited}");
    assert_eq!(limited["count"], 3, "{limited}");
    assert_eq!(
        limited["kvs"].as_array().map(Vec::len),
        Some(2),
        "{limited}"
    );
    let all = c.json(&["get", "a", "c"]);
    assert!(all.get("more").is_none() || all["more"] == false, "{all}");
    assert_eq!(all["count"], 3, "{all}");

    assert_eq!(
        c.ok(&["get", "a", "c", "--sort-by=MODIFY", "--order=DESCEND"]),
        kv_lines(&[("ab", "12"), ("b", "2"), ("a", "1")])
    );
    assert_eq!(
        c.ok(&["get", "a", "c", "--sort-by=KEY", "--order=DESCEND"]),
        kv_lines(&[("b", "2"), ("ab", "12"), ("a", "1")])
    );
    // --keys-only: the server sends no values, etcdctl prints an empty line for each.
    assert_eq!(
        c.ok(&["get", "a", "--prefix", "--keys-only"]),
        kv_lines(&[("a", ""), ("ab", "")])
    );
    assert_eq!(
        c.ok(&["get", "--from-key", "b"]),
        kv_lines(&[("b", "2"), ("c", "3"), ("foo", "baz")])
    );

    // A serializable read served by a follower sees the write once it has applied it.
    assert_eq!(c.ok(&["put", "foo", "qux"]), "OK\n");
    let leader = c.leader();
    let follower = (leader + 1) % c.len();
    let mut last = None;
    let seen = poll(POLL_TIMEOUT, || {
        let out = c.etcdctl_at(follower, &["get", "foo", "--consistency=s"]);
        let ok = out.status.success() && stdout(&out) == "foo\nqux\n";
        last = Some(out);
        ok.then_some(())
    });
    assert!(
        seen.is_some(),
        "follower {follower} never served foo=qux serializably: {}",
        describe(last.as_ref().expect("one attempt"))
    );
    let s = c.etcdctl_at(follower, &["get", "foo", "--consistency=s", "-w", "json"]);
    let s = parse_json(&stdout_ok(&s, &["get", "foo", "--consistency=s"]));
    assert_eq!(s["kvs"][0]["mod_revision"], 8, "{s}");
    assert_eq!(
        s["header"]["member_id"].as_u64(),
        Some(c.member_id(follower)),
        "{s}"
    );
    // And a linearizable read through that follower too.
    let l = c.etcdctl_at(follower, &["get", "foo"]);
    assert_eq!(stdout_ok(&l, &["get", "foo"]), "foo\nqux\n");
}

#[test]
fn delete() {
    let c = Cluster::start(3);

    assert_eq!(c.ok(&["put", "k", "v"]), "OK\n");
    assert_eq!(c.ok(&["del", "k"]), "1\n");
    assert_eq!(c.ok(&["get", "k"]), "");

    for k in ["p1", "p2", "p3", "q1"] {
        assert_eq!(c.ok(&["put", k, "x"]), "OK\n");
    }
    assert_eq!(c.ok(&["del", "--prefix", "p"]), "3\n");
    assert_eq!(c.ok(&["get", "--prefix", "p"]), "");
    assert_eq!(c.ok(&["get", "q1"]), "q1\nx\n");

    assert_eq!(c.ok(&["put", "dk", "dv"]), "OK\n");
    assert_eq!(c.ok(&["del", "--prev-kv", "dk"]), "1\ndk\ndv\n");

    // Deleting what is not there deletes nothing and writes no revision.
    let before = c.revision();
    assert_eq!(c.ok(&["del", "missing"]), "0\n");
    assert_eq!(c.ok(&["del", "--prefix", "nothing-here/"]), "0\n");
    let del = c.json(&["del", "missing"]);
    assert_eq!(del["header"]["revision"], before, "{del}");
    assert!(del.get("deleted").is_none() || del["deleted"] == 0, "{del}");
    assert_eq!(c.revision(), before);

    // A deletion is a revision of its own: the key reappears with version 1.
    assert_eq!(c.ok(&["put", "k", "again"]), "OK\n");
    let got = c.json(&["get", "k"]);
    let kv = &got["kvs"][0];
    assert_eq!(kv["version"], 1, "{got}");
    assert_eq!(kv["create_revision"], kv["mod_revision"], "{got}");
    assert_eq!(kv["mod_revision"], before + 1, "{got}");
}

#[test]
fn txn() {
    let c = Cluster::start(3);
    assert_eq!(c.ok(&["put", "k", "v1"]), "OK\n");

    let txn = |stdin: &str| {
        let out = c.etcdctl_stdin(&["txn", "-i"], stdin.as_bytes());
        stdout_ok(&out, &["txn", "-i"])
    };

    // The compare holds: the success branch runs.
    assert_eq!(
        txn("mod(\"k\") > \"0\"\n\nput k v2\n\nput other x\n\n"),
        format!("{TXN_PROMPTS}SUCCESS\n\nOK\n")
    );
    assert_eq!(c.ok(&["get", "k"]), "k\nv2\n");
    assert_eq!(c.ok(&["get", "other"]), "");

    // The compare fails: the failure branch runs.
    assert_eq!(
        txn("value(\"k\") = \"v1\"\n\nput k v3\n\nput other x\n\n"),
        format!("{TXN_PROMPTS}FAILURE\n\nOK\n")
    );
    assert_eq!(c.ok(&["get", "k"]), "k\nv2\n");
    assert_eq!(c.ok(&["get", "other"]), "other\nx\n");

    // A value compare that holds, with a get and a delete in the branch.
    assert_eq!(
        txn("value(\"k\") = \"v2\"\n\nget k\ndel other\n\n\n"),
        format!("{TXN_PROMPTS}SUCCESS\n\nk\nv2\n\n1\n")
    );
    assert_eq!(c.ok(&["get", "other"]), "");

    // Several compares must all hold; version and create revision compares.
    let rev = c.revision();
    assert_eq!(
        txn(&format!(
            "version(\"k\") = \"2\"\ncreate(\"nope\") = \"0\"\nmod(\"k\") < \"{}\"\n\nput a 1\nput b 2\n\n\n",
            rev + 1
        )),
        format!("{TXN_PROMPTS}SUCCESS\n\nOK\n\nOK\n")
    );
    // Both puts of one transaction share one revision.
    let got = c.json(&["get", "a", "c"]);
    assert_eq!(got["kvs"][0]["mod_revision"], rev + 1, "{got}");
    assert_eq!(got["kvs"][1]["mod_revision"], rev + 1, "{got}");
    assert_eq!(got["header"]["revision"], rev + 1, "{got}");

    // A read-only transaction writes no revision.
    assert_eq!(
        txn("\nget a\n\n\n"),
        format!("{TXN_PROMPTS}SUCCESS\n\na\n1\n")
    );
    assert_eq!(c.revision(), rev + 1);
}

#[test]
fn watch() {
    let c = Cluster::start(3);

    // History: k@2 = v1, k@3 = v2, deleted @4.
    assert_eq!(c.ok(&["put", "k", "v1"]), "OK\n");
    assert_eq!(c.ok(&["put", "k", "v2"]), "OK\n");
    assert_eq!(c.ok(&["del", "k"]), "1\n");
    assert_eq!(c.revision(), 4);

    // Replayed from revision 2.
    let mut w = c.watch(&["--rev=2", "k"]);
    w.expect_lines(&["PUT", "k", "v1", "PUT", "k", "v2", "DELETE", "k", ""]);
    drop(w);

    // Replayed from revision 3, with previous key-values.
    let mut w = c.watch(&["--rev=3", "--prev-kv", "k"]);
    w.expect_lines(&["PUT", "k", "v1", "k", "v2", "DELETE", "k", "v2", "k", ""]);
    drop(w);

    // A prefix watch from the next revision sees every later event under the prefix, in
    // order (starting at an explicit revision, no event can slip in before it is set up).
    let start = c.revision() + 1;
    let mut w = c.watch(&["--prefix", "p/", "--prev-kv", &format!("--rev={start}")]);
    let ops: &[&[&str]] = &[
        &["put", "p/a", "1"],
        &["put", "p/b", "2"],
        &["put", "q/outside", "nope"],
        &["put", "p/a", "3"],
        &["del", "p/b"],
        &["del", "p/a"],
        &["put", "p/c", "4"],
    ];
    for op in ops {
        c.ok(op);
    }
    w.expect_lines(&[
        "PUT", "p/a", "1", //
        "PUT", "p/b", "2", //
        "PUT", "p/a", "1", "p/a", "3", //
        "DELETE", "p/b", "2", "p/b", "", //
        "DELETE", "p/a", "3", "p/a", "", //
        "PUT", "p/c", "4",
    ]);
    // A transaction's writes arrive together, and later events keep coming.
    let out = c.etcdctl_stdin(&["txn"], b"\nput p/x 5\nput p/y 6\n\n\n");
    assert_eq!(stdout_ok(&out, &["txn"]), "SUCCESS\n\nOK\n\nOK\n");
    w.expect_lines(&["PUT", "p/x", "5", "PUT", "p/y", "6"]);
    drop(w);

    // A live watch (no --rev) on a single key: events are seen once it is established;
    // keep writing a marker until the first one comes through, then check what follows.
    let mut w = c.watch(&["live"]);
    let mut n = 0;
    let first = poll(POLL_TIMEOUT, || {
        n += 1;
        c.ok(&["put", "live", &format!("marker-{n}")]);
        w.next_line(Duration::from_millis(500))
    });
    assert_eq!(first.as_deref(), Some("PUT"), "live watch never saw a put");
    assert_eq!(w.next_line(POLL_TIMEOUT).as_deref(), Some("live"));
    let marker = w.next_line(POLL_TIMEOUT).expect("marker value");
    assert!(marker.starts_with("marker-"), "{marker}");
    // Any later markers already in flight, then the final put.
    c.ok(&["put", "live", "final"]);
    loop {
        let kind = w.next_line(POLL_TIMEOUT).expect("an event");
        assert_eq!(kind, "PUT");
        assert_eq!(w.next_line(POLL_TIMEOUT).as_deref(), Some("live"));
        let v = w.next_line(POLL_TIMEOUT).expect("a value");
        if v == "final" {
            break;
        }
        assert!(v.starts_with("marker-"), "unexpected value {v}");
    }
}

fn lease_id(grant_output: &str) -> String {
    // "lease 694d77aa9e38260f granted with TTL(5s)"
    let words: Vec<&str> = grant_output.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"lease"), "{grant_output}");
    let id = words[1].to_string();
    assert!(
        u64::from_str_radix(&id, 16).is_ok(),
        "lease ID {id:?} is not hex: {grant_output}"
    );
    id
}

#[test]
fn lease() {
    let c = Cluster::start(3);

    let grant = c.ok(&["lease", "grant", "5"]);
    let id = lease_id(&grant);
    assert_eq!(grant, format!("lease {id} granted with TTL(5s)\n"));

    assert_eq!(c.ok(&["put", &format!("--lease={id}"), "lk", "v"]), "OK\n");
    let got = c.json(&["get", "lk"]);
    assert_eq!(
        got["kvs"][0]["lease"].as_i64().map(|l| format!("{l:016x}")),
        Some(id.clone()),
        "{got}"
    );

    let ttl = c.ok(&["lease", "timetolive", &id, "--keys"]);
    let head = format!("lease {id} granted with TTL(5s), remaining(");
    assert!(
        ttl.starts_with(&head) && ttl.ends_with("s), attached keys([lk])\n"),
        "{ttl}"
    );
    assert_eq!(
        c.ok(&["lease", "keep-alive", "--once", &id]),
        format!("lease {id} keepalived with TTL(5)\n")
    );
    let list = c.ok(&["lease", "list"]);
    assert!(list.contains(&id), "{list}");

    assert_eq!(
        c.ok(&["lease", "revoke", &id]),
        format!("lease {id} revoked\n")
    );
    assert_eq!(c.ok(&["get", "lk"]), "");
    assert_eq!(
        c.ok(&["lease", "timetolive", &id]),
        format!("lease {id} already expired\n")
    );
    assert_fails_with(
        &c.etcdctl(&["lease", "keep-alive", "--once", &id]),
        "etcdserver: requested lease not found",
    );
    assert_fails_with(
        &c.etcdctl(&["put", &format!("--lease={id}"), "lk", "v"]),
        "etcdserver: requested lease not found",
    );

    // A lease nobody keeps alive expires, and takes its keys with it.
    let short = lease_id(&c.ok(&["lease", "grant", "3"]));
    assert_eq!(
        c.ok(&["put", &format!("--lease={short}"), "ek", "v"]),
        "OK\n"
    );
    assert_eq!(c.ok(&["put", "stays", "v"]), "OK\n");
    let gone = poll(POLL_TIMEOUT, || (c.ok(&["get", "ek"]) == "").then_some(()));
    assert!(
        gone.is_some(),
        "key of a 3s lease still there after {POLL_TIMEOUT:?}"
    );
    assert_eq!(
        c.ok(&["lease", "timetolive", &short]),
        format!("lease {short} already expired\n")
    );
    assert_eq!(c.ok(&["get", "stays"]), "stays\nv\n");
}

#[test]
fn compaction() {
    let c = Cluster::start(3);
    // k@2 = v1, k@3 = v2, k@4 = v3.
    for v in ["v1", "v2", "v3"] {
        assert_eq!(c.ok(&["put", "k", v]), "OK\n");
    }
    assert_eq!(c.ok(&["get", "k", "--rev=2"]), "k\nv1\n");

    assert_eq!(c.ok(&["compaction", "3"]), "compacted revision 3\n");

    // Revisions before the compaction point are gone; the point itself and later remain.
    assert_fails_with(
        &c.etcdctl(&["get", "k", "--rev=2"]),
        "etcdserver: mvcc: required revision has been compacted",
    );
    assert_eq!(c.ok(&["get", "k", "--rev=3"]), "k\nv2\n");
    assert_eq!(c.ok(&["get", "k"]), "k\nv3\n");
    // Every member has compacted.
    for i in 0..c.len() {
        let out = c.etcdctl_at(i, &["get", "k", "--rev=2", "--consistency=s"]);
        assert_fails_with(
            &out,
            "etcdserver: mvcc: required revision has been compacted",
        );
    }

    // Compacting again at or below the compacted revision, or in the future, is refused.
    assert_fails_with(
        &c.etcdctl(&["compaction", "3"]),
        "etcdserver: mvcc: required revision has been compacted",
    );
    assert_fails_with(
        &c.etcdctl(&["compaction", "100"]),
        "etcdserver: mvcc: required revision is a future revision",
    );

    // A watch from a compacted revision is cancelled by the server.
    let mut w = c.watch(&["--rev=2", "k"]);
    let (out, err) = w
        .wait_exit(POLL_TIMEOUT)
        .expect("a watch from a compacted revision should be cancelled and etcdctl exit");
    assert!(out.is_empty(), "no events expected, got {out:?}");
    assert!(
        err.iter()
            .any(|l| l
                == "watch was canceled (etcdserver: mvcc: required revision has been compacted)"),
        "stderr: {err:?}"
    );
    // From the compaction point it replays what is left.
    let mut w = c.watch(&["--rev=3", "k"]);
    w.expect_lines(&["PUT", "k", "v2", "PUT", "k", "v3"]);
}

#[test]
fn cluster_membership_and_status() {
    let c = Cluster::start(3);
    let ids: Vec<u64> = (0..3).map(|i| c.member_id(i)).collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 3, "{ids:?}");

    // member list: every member, started (published its name and client URLs).
    let expected: BTreeSet<String> = (0..3)
        .map(|i| {
            let m = &c.members[i];
            format!(
                "{:x}, started, {}, {}, {}, false",
                ids[i],
                m.name,
                m.peer_url(),
                m.client_url()
            )
        })
        .collect();
    let mut last = String::new();
    let listed = poll(POLL_TIMEOUT, || {
        last = c.ok(&["member", "list"]);
        let got: BTreeSet<String> = last.lines().map(str::to_string).collect();
        (got == expected).then_some(())
    });
    assert!(
        listed.is_some(),
        "member list:\n{last}\nexpected (any order):\n{expected:#?}"
    );
    assert_eq!(last.lines().count(), 3, "{last}");
    let json = c.json(&["member", "list"]);
    assert_eq!(json["members"].as_array().map(Vec::len), Some(3), "{json}");

    // endpoint status --cluster: one entry per member (at its advertised client URL),
    // all naming the same leader, which is one of them.
    let out = c.etcdctl(&["endpoint", "status", "--cluster", "-w", "json"]);
    let status = parse_json(&stdout_ok(&out, &["endpoint", "status", "--cluster"]));
    let entries = status.as_array().expect("a JSON array");
    assert_eq!(entries.len(), 3, "{status}");
    let endpoints: BTreeSet<String> = entries
        .iter()
        .map(|e| e["Endpoint"].as_str().expect("Endpoint").to_string())
        .collect();
    let client_urls: BTreeSet<String> = c.members.iter().map(|m| m.client_url()).collect();
    assert_eq!(endpoints, client_urls);
    let leaders: BTreeSet<u64> = entries
        .iter()
        .map(|e| e["Status"]["leader"].as_u64().expect("leader"))
        .collect();
    assert_eq!(leaders.len(), 1, "members disagree on the leader: {status}");
    let leader = *leaders.iter().next().expect("a leader");
    let self_leaders = entries
        .iter()
        .filter(|e| e["Status"]["header"]["member_id"].as_u64() == Some(leader))
        .count();
    assert_eq!(
        self_leaders, 1,
        "exactly one entry should be the leader: {status}"
    );
    assert_eq!(ids[c.leader()], leader);

    // endpoint health --cluster: every member healthy. (etcdctl 3.4 writes these lines to
    // stderr, healthy or not.)
    let out = c.etcdctl(&["endpoint", "health", "--cluster"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = stderr(&out);
    let healthy: BTreeSet<String> = text
        .lines()
        .filter(|l| l.starts_with("http://"))
        .map(|l| {
            let (url, rest) = l.split_once(' ').expect("url then text");
            assert!(
                rest.starts_with("is healthy: successfully committed proposal: took = "),
                "{l}"
            );
            url.to_string()
        })
        .collect();
    assert_eq!(healthy, client_urls, "{}", describe(&out));
    let out = c.etcdctl(&["endpoint", "health", "--cluster", "-w", "json"]);
    let health = parse_json(&stdout_ok(&out, &["endpoint", "health", "--cluster"]));
    let entries = health.as_array().expect("a JSON array");
    assert_eq!(entries.len(), 3, "{health}");
    for e in entries {
        assert_eq!(e["health"], true, "{health}");
    }
    let endpoints: BTreeSet<String> = entries
        .iter()
        .map(|e| e["endpoint"].as_str().expect("endpoint").to_string())
        .collect();
    assert_eq!(endpoints, client_urls);
}

/// HashKV is a consistency check: after a mixed load every member hashes the same history
/// at the same revision, before and after a compaction, and a later write changes it.
#[test]
fn hashkv_is_equal_on_every_member() {
    let c = Cluster::start(3);
    for i in 0..30 {
        c.ok(&["put", &format!("h/{}", i % 7), &format!("v{i}")]);
        if i % 5 == 4 {
            c.ok(&["del", &format!("h/{}", i % 7)]);
        }
    }
    let rev = c.revision();
    let hashes = |rev: i64| -> Vec<u64> {
        let out = c.json(&["endpoint", "hashkv", "--cluster", &format!("--rev={rev}")]);
        out.as_array()
            .expect("one entry per member")
            .iter()
            .map(|e| e["HashKV"]["hash"].as_u64().expect("hash"))
            .collect()
    };
    let before = hashes(rev);
    assert_eq!(before.len(), 3);
    assert!(
        before.iter().all(|h| *h == before[0]),
        "members disagree: {before:?}"
    );

    c.ok(&["compaction", &(rev - 10).to_string(), "--physical"]);
    let after = hashes(rev);
    assert!(
        after.iter().all(|h| *h == after[0]),
        "members disagree after compaction: {after:?}"
    );

    c.ok(&["put", "h/new", "x"]);
    let newer = hashes(rev + 1);
    assert!(
        newer.iter().all(|h| *h == newer[0]),
        "members disagree: {newer:?}"
    );
    assert_ne!(newer[0], after[0], "a new write changes the hash");
}

/// A client that stops reading its watch falls behind: its flow-control window and the
/// stream's queues fill and the store stops handing the stream revisions. When the client
/// reads again it gets every event, in order, none lost: the store reads what the stream
/// missed from disk. (A raw gRPC client: etcdctl's client library reads the stream into an
/// unbounded buffer whatever its caller does, so it never falls behind.)
#[test]
fn a_watcher_that_stops_reading_misses_no_event() {
    use flotilla_proto::etcdserverpb::watch_client::WatchClient;
    use flotilla_proto::etcdserverpb::{watch_request, WatchCreateRequest, WatchRequest};

    const PUTS: usize = 3000;
    let c = Cluster::start(1);
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let url = c.members[0].client_url();
    let endpoint = c.endpoint(0);
    let (revisions, keys) = rt.block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(url)
            .expect("client URL")
            .connect()
            .await
            .expect("connecting");
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: b"0".to_vec(),
                    range_end: b"1".to_vec(),
                    ..Default::default()
                },
            )),
        })
        .await
        .expect("queueing the create request");
        let mut responses = WatchClient::new(channel)
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("opening the watch")
            .into_inner();
        let created = responses
            .message()
            .await
            .expect("created")
            .expect("created");
        assert!(created.created, "{created:?}");

        // 3,000 puts of 10 KiB under the prefix while nothing is read: far more than the
        // client's window and the stream's queues hold.
        let puts = PUTS.to_string();
        let bench = tokio::task::spawn_blocking(move || {
            flotilla(&[
                "bench",
                "put",
                "--endpoints",
                &endpoint,
                "--clients",
                "16",
                "--total",
                &puts,
                "--key-space-size",
                &puts,
                "--sequential-keys",
                "--val-size",
                "10240",
            ])
        })
        .await
        .expect("bench");
        assert!(bench.status.success(), "bench: {bench:?}");

        let mut revisions = Vec::new();
        let mut keys = BTreeSet::new();
        while revisions.len() < PUTS {
            let r = tokio::time::timeout(POLL_TIMEOUT, responses.message())
                .await
                .unwrap_or_else(|_| panic!("watch stalled after {} events", revisions.len()))
                .expect("watch response")
                .expect("the watch ended");
            assert!(!r.canceled, "{r:?}");
            for e in r.events {
                let kv = e.kv.expect("an event's key-value");
                revisions.push(kv.mod_revision);
                keys.insert(kv.key);
            }
        }
        drop(tx);
        (revisions, keys)
    });
    assert_eq!(keys.len(), PUTS, "every put once");
    assert!(
        revisions.windows(2).all(|w| w[1] == w[0] + 1),
        "events out of order or missing: {:?}",
        revisions.windows(2).find(|w| w[1] != w[0] + 1)
    );
    let log = std::fs::read_to_string(&c.members[0].log).expect("member log");
    assert!(
        log.contains("watch stream fell behind"),
        "the stream never fell behind, so this test did not test it; make the writes bigger"
    );
}
