//! Backup and restore: `flotilla store snapshot save` from a loaded cluster, `restore` into a
//! fresh 3-member cluster, and every key and revision is the same (checked with etcdctl's
//! `get -w json` and `endpoint hashkv`).

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

fn flotilla_ok(args: &[&str]) -> String {
    let out = flotilla(args);
    assert!(
        out.status.success(),
        "flotilla {args:?}: {}",
        describe(&out)
    );
    stdout(&out)
}

/// Every key with its revisions, as `get --prefix -w json` reports them, and the revision.
fn everything(c: &Cluster, i: usize) -> (Vec<Value>, i64) {
    let out = c.etcdctl_at(i, &["get", "", "--prefix", "-w", "json"]);
    let v: Value =
        serde_json::from_str(&stdout_ok(&out, &["get", "--prefix"])).expect("etcdctl printed JSON");
    let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
    (kvs, v["header"]["revision"].as_i64().expect("revision"))
}

fn hashkv(c: &Cluster, rev: i64) -> Vec<u64> {
    c.json(&["endpoint", "hashkv", "--cluster", &format!("--rev={rev}")])
        .as_array()
        .expect("one entry per member")
        .iter()
        .map(|e| e["HashKV"]["hash"].as_u64().expect("hash"))
        .collect()
}

#[test]
fn snapshot_save_and_restore_into_a_new_cluster() {
    let source = Cluster::start(3);
    // A mixed history: overwrites (versions), deletes, a transaction, a lease, a compaction.
    let load = flotilla(&[
        "bench",
        "put",
        "--endpoints",
        &source.endpoints(),
        "--clients",
        "8",
        "--total",
        "3000",
        "--key-space-size",
        "700",
        "--val-size",
        "64",
    ]);
    assert!(load.status.success(), "bench: {}", describe(&load));
    for i in 0..20 {
        source.ok(&["put", &format!("app/{i}"), &format!("v{i}")]);
    }
    source.ok(&["del", "app/1", "app/5"]);
    let early = source.revision();
    source.ok(&["put", "app/3", "again"]);
    let grant = source.ok(&["lease", "grant", "600"]);
    let lease = grant
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    source.ok(&["put", "--lease", &lease, "app/leased", "x"]);
    source.ok(&["compaction", &(early - 100).to_string()]);

    let (want_kvs, want_rev) = everything(&source, 0);
    let want_hash = hashkv(&source, want_rev);
    assert!(want_kvs.len() > 500, "{} keys", want_kvs.len());

    let file = source.dir().join("backup.snap");
    let file_s = file.display().to_string();
    let saved = flotilla_ok(&[
        "store",
        "snapshot",
        "save",
        &file_s,
        "--endpoints",
        &source.members[1].client_url(),
    ]);
    assert_eq!(saved, format!("Snapshot saved at {file_s}\n"));
    let status: Value = serde_json::from_str(&flotilla_ok(&[
        "store", "snapshot", "status", &file_s, "-w", "json",
    ]))
    .expect("status prints JSON");
    assert_eq!(status["revision"].as_i64(), Some(want_rev), "{status}");
    let table = flotilla_ok(&["store", "snapshot", "status", &file_s]);
    assert!(
        table.contains("| REVISION |") || table.contains("REVISION"),
        "{table}"
    );

    // etcdctl's own `snapshot save` takes the same stream and writes the same kind of file.
    let by_etcdctl = source.dir().join("etcdctl.snap");
    let by_etcdctl_s = by_etcdctl.display().to_string();
    let out = etcdctl(
        &source.members[2].endpoint(),
        &["snapshot", "save", &by_etcdctl_s],
        None,
    );
    assert_eq!(
        stdout_ok(&out, &["snapshot", "save"]),
        format!("Snapshot saved at {by_etcdctl_s}\n")
    );
    let status2: Value = serde_json::from_str(&flotilla_ok(&[
        "store",
        "snapshot",
        "status",
        &by_etcdctl_s,
        "-w",
        "json",
    ]))
    .expect("status prints JSON");
    assert_eq!(status2["revision"].as_i64(), Some(want_rev), "{status2}");
    assert_eq!(status2["totalKey"], status["totalKey"]);

    // A damaged copy is refused, saying why.
    let damaged = source.dir().join("damaged.snap");
    let mut bytes = std::fs::read(&file).expect("reading the backup");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&damaged, &bytes).expect("writing the damaged copy");
    let out = flotilla(&[
        "store",
        "snapshot",
        "restore",
        &damaged.display().to_string(),
        "--data-dir",
        &source.dir().join("never").display().to_string(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("integrity check failed"),
        "{}",
        describe(&out)
    );
    assert!(!Path::new(&source.dir().join("never")).exists());

    // Restore every member of a new cluster from the file, then start it.
    let mut target = Cluster::prepare(3);
    let initial_cluster = target.initial_cluster().to_string();
    let token = target.token().to_string();
    for m in &target.members {
        flotilla_ok(&[
            "store",
            "snapshot",
            "restore",
            &file_s,
            "--data-dir",
            &m.data_dir.display().to_string(),
            "--name",
            &m.name,
            "--initial-cluster",
            &initial_cluster,
            "--initial-cluster-token",
            &token,
            "--initial-advertise-peer-urls",
            &m.peer_url(),
        ]);
    }
    target.start_all();
    // Restoring into an existing data dir is refused, as etcdutl does.
    let out = flotilla(&[
        "store",
        "snapshot",
        "restore",
        &file_s,
        "--data-dir",
        &target.members[0].data_dir.display().to_string(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("exists"), "{}", describe(&out));

    for i in 0..3 {
        let (kvs, rev) = everything(&target, i);
        assert_eq!(rev, want_rev, "member {i}: revision");
        assert!(
            kvs == want_kvs,
            "member {i}: keys differ from the source ({} vs {})",
            kvs.len(),
            want_kvs.len()
        );
    }
    assert_eq!(hashkv(&target, want_rev), want_hash);
    // The compaction point came along: older revisions are gone, as in the source.
    assert_fails_with(
        &target.etcdctl(&["get", "app/0", &format!("--rev={}", early - 200)]),
        "required revision has been compacted",
    );
    // The lease came along with its key.
    let ttl = target.ok(&["lease", "timetolive", &lease, "--keys"]);
    assert!(ttl.contains("attached keys([app/leased])"), "{ttl}");
    // And the new cluster goes on from the restored revision.
    target.ok(&["put", "after", "restore"]);
    assert_eq!(target.revision(), want_rev + 1);
}
