//! The corruption check: a member whose data was changed behind Raft's back is found by the
//! leader's periodic HashKV comparison and gets the CORRUPT alarm; the cluster then refuses
//! writes with etcd's error, and the corrupt member refuses reads.

mod common;

use common::*;

/// Flips the last byte of the newest stored value of `key` in a stopped member's data.
fn tamper(data_dir: &std::path::Path, key: &[u8]) {
    let path = data_dir.join("db");
    let opts = rocksdb::Options::default();
    let families = rocksdb::DB::list_cf(&opts, &path).expect("listing column families");
    let db = rocksdb::DB::open_cf(&opts, &path, &families).expect("opening the member's data");
    let kv = db.cf_handle("kv").expect("kv family");
    // Keys are escape(key) 00 01 !revision: the newest version of a key sorts first.
    let mut prefix = key.to_vec();
    prefix.extend_from_slice(&[0, 1]);
    let mut it = db.raw_iterator_cf(kv);
    it.seek(&prefix);
    let (k, mut v) = match (it.key(), it.value()) {
        (Some(k), Some(v)) if k.starts_with(&prefix) => (k.to_vec(), v.to_vec()),
        _ => panic!("no stored version of {key:?}"),
    };
    drop(it);
    let last = v.len() - 1;
    v[last] ^= 0x01;
    db.put_cf(kv, k, v).expect("writing the damaged value");
    db.flush_cf(kv).expect("flushing");
}

#[test]
fn a_tampered_member_is_found_and_alarmed() {
    let mut c = Cluster::start_with(3, &["--experimental-corrupt-check-time", "1s"]);
    for i in 0..10 {
        c.ok(&["put", &format!("k{i}"), &format!("value-{i}")]);
    }
    assert_eq!(
        c.ok(&["alarm", "list"]),
        "",
        "a healthy cluster has no alarm"
    );

    let leader = c.leader();
    let victim = (0..3).find(|&i| i != leader).unwrap_or_default();
    let victim_id = c.member_id(victim);
    c.kill(victim);
    tamper(&c.members[victim].data_dir, b"k5");
    c.restart(victim);

    // (The victim may never look healthy again: it refuses reads once it is found.)
    let alarms = poll(POLL_TIMEOUT, || {
        let out = c.etcdctl_at(leader, &["alarm", "list"]);
        let list = stdout(&out);
        list.contains("alarm:CORRUPT").then_some(list)
    })
    .unwrap_or_else(|| c.fail("the tampered member was never found"));
    assert_eq!(
        alarms.trim_end(),
        format!("memberID:{victim_id} alarm:CORRUPT"),
        "only the tampered member is blamed"
    );

    // Writes are refused everywhere; the corrupt member refuses reads; the others serve them.
    assert_fails_with(
        &c.etcdctl(&["put", "k1", "new"]),
        "etcdserver: corrupt cluster",
    );
    assert_fails_with(
        &c.etcdctl_at(victim, &["get", "k5"]),
        "etcdserver: corrupt cluster",
    );
    let healthy = (0..3).find(|&i| i != victim).unwrap_or_default();
    let out = c.etcdctl_at(healthy, &["get", "k5", "--print-value-only"]);
    assert_eq!(stdout_ok(&out, &["get", "k5"]), "value-5\n");
}
