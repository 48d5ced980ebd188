//! MVCC behaviour against etcd's semantics, on a real RocksDB in a temporary directory.

use std::sync::Arc;

use flotilla_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use flotilla_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use flotilla_proto::etcdserverpb::{
    request_op, response_op, CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest,
    LeaseRevokeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use flotilla_proto::mvccpb::event::EventType;

use super::apply::{Applier, Group};
use super::*;
use crate::error::EtcdError;

struct Fixture {
    _dir: tempfile::TempDir,
    mvcc: Arc<Mvcc>,
}

fn open() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // The families as members configure them (the kv family's prefix filters included).
    let cache = rocksdb::Cache::new_lru_cache(8 << 20).expect("block cache");
    let families = Mvcc::column_families().into_iter().map(|name| {
        rocksdb::ColumnFamilyDescriptor::new(name, crate::family_options(name, &cache))
    });
    let db = DB::open_cf_descriptors(&opts, dir.path(), families).expect("open rocksdb");
    let mvcc = Mvcc::open(Arc::new(db)).expect("open mvcc");
    Fixture { _dir: dir, mvcc }
}

impl Fixture {
    /// Applies one command the way the state machine does: all or nothing.
    fn apply<T>(
        &self,
        f: impl FnOnce(&mut Applier<'_>) -> Result<T, EtcdError>,
    ) -> Result<T, EtcdError> {
        let mut a = Applier::new(&self.mvcc);
        let r = f(&mut a)?;
        let mut group = Group::default();
        group.add(a.finish());
        let (batch, outcomes, latest) = group.take(&self.mvcc);
        self.mvcc
            .commit_group(batch, outcomes, latest)
            .expect("commit");
        Ok(r)
    }

    /// Every version of every key in the `kv` family, tombstones included.
    fn versions_on_disk(&self) -> usize {
        let mut versions = 0;
        let mut it = self
            .mvcc
            .db()
            .raw_iterator_cf_opt(self.mvcc.cf(CF_KV), super::total_order());
        it.seek_to_first();
        while it.valid() {
            versions += 1;
            it.next();
        }
        versions
    }

    fn put(&self, k: &str, v: &str) -> i64 {
        let req = PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        };
        self.apply(|a| a.put(&req))
            .expect("put")
            .header
            .expect("header")
            .revision
    }

    fn get_at(&self, k: &str, rev: i64) -> Option<(String, i64, i64, i64)> {
        self.mvcc.get(k.as_bytes(), rev).expect("get").map(|kv| {
            (
                String::from_utf8(kv.value).expect("utf8"),
                kv.create_revision,
                kv.mod_revision,
                kv.version,
            )
        })
    }

    fn keys(&self, req: RangeRequest) -> Vec<String> {
        let rev = self.mvcc.resolve_revision(req.revision).expect("revision");
        self.mvcc
            .range(&req, rev)
            .expect("range")
            .kvs
            .into_iter()
            .map(|kv| String::from_utf8(kv.key).expect("utf8"))
            .collect()
    }
}

fn range(key: &str, end: &str) -> RangeRequest {
    RangeRequest {
        key: key.into(),
        range_end: end.into(),
        ..Default::default()
    }
}

#[test]
fn revisions_count_like_etcd() {
    let f = open();
    assert_eq!(
        f.mvcc.current_revision(),
        1,
        "an empty store is at revision 1"
    );
    assert_eq!(f.put("a", "1"), 2);
    assert_eq!(f.put("a", "2"), 3);
    assert_eq!(f.put("b", "1"), 4);
    assert_eq!(f.get_at("a", 4), Some(("2".into(), 2, 3, 2)));
    assert_eq!(f.get_at("a", 2), Some(("1".into(), 2, 2, 1)));
    assert_eq!(f.get_at("a", 1), None);

    let del = DeleteRangeRequest {
        key: "a".into(),
        ..Default::default()
    };
    let r = f.apply(|a| a.delete_range(&del)).expect("delete");
    assert_eq!((r.deleted, r.header.expect("header").revision), (1, 5));
    assert_eq!(f.get_at("a", 5), None);
    let r = f.apply(|a| a.delete_range(&del)).expect("delete again");
    assert_eq!(
        (r.deleted, f.mvcc.current_revision()),
        (0, 5),
        "deleting nothing makes no revision"
    );

    assert_eq!(f.put("a", "3"), 6);
    assert_eq!(
        f.get_at("a", 6),
        Some(("3".into(), 6, 6, 1)),
        "a recreated key starts a new generation"
    );
}

#[test]
fn ranges_prefixes_limits_and_sorting() {
    let f = open();
    for (k, v) in [
        ("p/b", "2"),
        ("p/a", "3"),
        ("p/c", "1"),
        ("q", "0"),
        ("p", "9"),
        ("p\0x", "8"),
    ] {
        f.put(k, v);
    }
    assert_eq!(f.keys(range("p/", "p0")), ["p/a", "p/b", "p/c"]);
    assert_eq!(f.keys(range("p", "")), ["p"]);
    assert_eq!(
        f.keys(range("p", "\0")),
        ["p", "p\0x", "p/a", "p/b", "p/c", "q"]
    );
    assert_eq!(
        f.keys(range("p/b", "p/a")),
        Vec::<String>::new(),
        "end before key is empty"
    );

    let mut limited = range("p/", "p0");
    limited.limit = 2;
    let rev = f.mvcc.current_revision();
    let r = f.mvcc.range(&limited, rev).expect("range");
    assert_eq!((r.kvs.len(), r.more, r.count), (2, true, 3));

    let mut by_value = range("p/", "p0");
    by_value.sort_target = SortTarget::Value as i32;
    by_value.sort_order = SortOrder::Descend as i32;
    assert_eq!(f.keys(by_value), ["p/a", "p/b", "p/c"]);

    let mut count_only = range("p/", "p0");
    count_only.count_only = true;
    let r = f.mvcc.range(&count_only, rev).expect("range");
    assert_eq!((r.kvs.len(), r.count), (0, 3));

    let mut at_old = range("p/", "p0");
    at_old.revision = 3;
    assert_eq!(f.keys(at_old), ["p/a", "p/b"]);
}

#[test]
fn txn_reads_its_own_writes_and_is_one_revision() {
    let f = open();
    f.put("k", "v1");
    let put = |k: &str, v: &str| RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        })),
    };
    let get = |k: &str| RequestOp {
        request: Some(request_op::Request::RequestRange(range(k, ""))),
    };
    let txn = TxnRequest {
        compare: vec![Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Value as i32,
            key: "k".into(),
            target_union: Some(TargetUnion::Value("v1".into())),
            range_end: Vec::new(),
        }],
        success: vec![put("k", "v2"), put("other", "x"), get("k")],
        failure: vec![get("k")],
    };
    let r = f.apply(|a| a.txn(&txn)).expect("txn");
    assert!(r.succeeded);
    assert_eq!(r.header.expect("header").revision, 3);
    let Some(response_op::Response::ResponseRange(read)) = &r.responses[2].response else {
        panic!("range response")
    };
    assert_eq!(
        read.kvs[0].value, b"v2",
        "a txn's range sees its earlier put"
    );
    assert_eq!(
        f.get_at("other", 3).map(|x| x.2),
        Some(3),
        "every write of the txn has its revision"
    );

    let r = f.apply(|a| a.txn(&txn)).expect("txn");
    assert!(!r.succeeded, "the value is v2 now");
    assert_eq!(
        f.mvcc.current_revision(),
        3,
        "a read-only branch makes no revision"
    );
}

#[test]
fn compare_on_missing_key_compares_zero_values() {
    let f = open();
    let cmp = |target: CompareTarget, union: TargetUnion| TxnRequest {
        compare: vec![Compare {
            result: CompareResult::Equal as i32,
            target: target as i32,
            key: "absent".into(),
            target_union: Some(union),
            range_end: Vec::new(),
        }],
        ..Default::default()
    };
    assert!(
        f.apply(|a| a.txn(&cmp(CompareTarget::Create, TargetUnion::CreateRevision(0))))
            .expect("txn")
            .succeeded
    );
    assert!(
        f.apply(|a| a.txn(&cmp(CompareTarget::Version, TargetUnion::Version(0))))
            .expect("txn")
            .succeeded
    );
    assert!(
        !f.apply(|a| a.txn(&cmp(CompareTarget::Value, TargetUnion::Value(Vec::new()))))
            .expect("txn")
            .succeeded
    );
}

#[test]
fn leases_attach_and_revoke_in_one_revision() {
    let f = open();
    f.apply(|a| a.lease_grant(&LeaseGrantRequest { ttl: 10, id: 7 }))
        .expect("grant");
    assert_eq!(
        f.apply(|a| a.lease_grant(&LeaseGrantRequest { ttl: 10, id: 7 }))
            .expect_err("dup"),
        EtcdError::LeaseExists
    );
    for k in ["x", "y"] {
        let req = PutRequest {
            key: k.into(),
            value: "v".into(),
            lease: 7,
            ..Default::default()
        };
        f.apply(|a| a.put(&req)).expect("put");
    }
    let bad = PutRequest {
        key: "z".into(),
        value: "v".into(),
        lease: 8,
        ..Default::default()
    };
    assert_eq!(
        f.apply(|a| a.put(&bad)).expect_err("no lease"),
        EtcdError::LeaseNotFound
    );
    assert_eq!(
        f.mvcc.lease_keys(7).expect("keys"),
        [b"x".to_vec(), b"y".to_vec()]
    );

    let rev_before = f.mvcc.current_revision();
    f.apply(|a| a.lease_revoke(&LeaseRevokeRequest { id: 7 }))
        .expect("revoke");
    assert_eq!(
        f.mvcc.current_revision(),
        rev_before + 1,
        "both keys go in one revision"
    );
    assert_eq!(f.get_at("x", rev_before + 1), None);
    assert_eq!(f.get_at("y", rev_before + 1), None);
    assert!(f.mvcc.lease(7).expect("lease").is_none());
}

/// Commands of one group reach RocksDB in one batch, sorted by key: two writes of one key
/// (here a key's lease record, attached, detached, attached again) keep their order.
#[test]
fn writes_of_one_key_in_one_group_keep_their_order() {
    let f = open();
    f.apply(|a| a.lease_grant(&LeaseGrantRequest { ttl: 10, id: 7 }))
        .expect("grant");
    let put = |key: &str, lease: i64| PutRequest {
        key: key.into(),
        value: "v".into(),
        lease,
        ..Default::default()
    };
    for (leases, attached) in [(&[7, 0, 7][..], true), (&[7, 0][..], false)] {
        let key = if attached { "a" } else { "b" };
        let mut group = Group::default();
        for &lease in leases {
            let mut a = Applier::after(&f.mvcc, Some(&group));
            // Another key first, so the sort has something to move.
            a.put(&put("z", 0)).expect("put");
            a.put(&put(key, lease)).expect("put");
            group.add(a.finish());
        }
        let (batch, outcomes, latest) = group.take(&f.mvcc);
        f.mvcc
            .commit_group(batch, outcomes, latest)
            .expect("commit");
    }
    assert_eq!(f.mvcc.lease_keys(7).expect("keys"), [b"a".to_vec()]);
}

#[test]
fn events_replay_in_order_with_prev_kv() {
    let f = open();
    f.put("a", "1");
    f.put("a", "2");
    f.apply(|a| {
        a.delete_range(&DeleteRangeRequest {
            key: "a".into(),
            ..Default::default()
        })
    })
    .expect("del");
    let events = f.mvcc.events_between(2, 10, 100).expect("events");
    let revs: Vec<i64> = events.iter().map(|r| r.revision).collect();
    assert_eq!(revs, [2, 3, 4]);
    let e = &events[1].events[0];
    assert_eq!(
        e.kv.as_ref().map(|kv| kv.value.clone()),
        Some(b"2".to_vec())
    );
    assert_eq!(
        e.prev_kv.as_ref().map(|kv| kv.value.clone()),
        Some(b"1".to_vec())
    );
    let d = &events[2].events[0];
    assert_eq!(d.r#type, EventType::Delete as i32);
    assert_eq!(d.kv.as_ref().map(|kv| kv.mod_revision), Some(4));
}

/// A live put event carries `prev_kv` only when the put asked for it; a watcher that wants
/// it reads the version at the revision before, which a create does not have and which a
/// compaction past it removes.
#[test]
fn live_events_give_prev_kv_on_demand() {
    let f = open();
    let mut events = f.mvcc.subscribe();
    let mut next = || {
        let batch = events.try_recv().expect("an event");
        assert_eq!(batch.events.len(), 1);
        batch.events[0].clone()
    };
    let value = |kv: Option<KeyValue>| kv.map(|kv| String::from_utf8(kv.value).expect("utf8"));

    f.put("a", "1"); // 2
    let created = next();
    assert_eq!(created.prev_kv, None);
    assert_eq!(
        f.mvcc.prev_kv_of(&created),
        None,
        "a create has no previous version"
    );

    f.put("a", "2"); // 3
    let replaced = next();
    assert_eq!(replaced.prev_kv, None, "not attached unless the put asked");
    assert_eq!(value(f.mvcc.prev_kv_of(&replaced)), Some("1".into()));

    let asked = PutRequest {
        key: "a".into(),
        value: "3".into(),
        prev_kv: true,
        ..Default::default()
    };
    let response = f.apply(|a| a.put(&asked)).expect("put"); // 4
    assert_eq!(value(response.prev_kv), Some("2".into()));
    let attached = next();
    assert_eq!(value(attached.prev_kv.clone()), Some("2".into()));
    assert_eq!(value(f.mvcc.prev_kv_of(&attached)), Some("2".into()));

    // A key deleted by its lease's revocation: the event's previous version is read.
    f.apply(|a| a.lease_grant(&LeaseGrantRequest { ttl: 10, id: 7 }))
        .expect("grant");
    let leased = PutRequest {
        key: "l".into(),
        value: "held".into(),
        lease: 7,
        ..Default::default()
    };
    f.apply(|a| a.put(&leased)).expect("put"); // 5
    next();
    f.apply(|a| a.lease_revoke(&LeaseRevokeRequest { id: 7 }))
        .expect("revoke"); // 6
    let revoked = next();
    assert_eq!(revoked.r#type, EventType::Delete as i32);
    assert_eq!(value(f.mvcc.prev_kv_of(&revoked)), Some("held".into()));

    // Once compacted past, the version before is gone: left out, as etcd leaves it out.
    f.apply(|a| {
        a.compact(&CompactionRequest {
            revision: 6,
            physical: false,
        })
    })
    .expect("compact");
    compactor::compact_for_tests(&f.mvcc, 6);
    assert_eq!(f.mvcc.prev_kv_of(&replaced), None);
}

#[test]
fn compaction_keeps_what_reads_at_or_after_it_see() {
    let f = open();
    f.put("a", "1"); // 2
    f.put("a", "2"); // 3
    f.put("b", "1"); // 4
    f.apply(|a| {
        a.delete_range(&DeleteRangeRequest {
            key: "b".into(),
            ..Default::default()
        })
    })
    .expect("del"); // 5
    f.put("a", "3"); // 6
    f.apply(|a| {
        a.compact(&CompactionRequest {
            revision: 5,
            physical: false,
        })
    })
    .expect("compact");
    assert_eq!(f.mvcc.resolve_revision(4), Err(EtcdError::Compacted));
    assert_eq!(
        f.mvcc.resolve_revision(5),
        Ok(5),
        "the compaction revision itself stays readable"
    );
    assert_eq!(f.mvcc.resolve_revision(7), Err(EtcdError::FutureRevision));
    assert_eq!(
        f.apply(|a| a.compact(&CompactionRequest {
            revision: 5,
            physical: false
        }))
        .expect_err("again"),
        EtcdError::Compacted
    );
    compactor::compact_for_tests(&f.mvcc, 5);
    assert_eq!(f.get_at("a", 5), Some(("2".into(), 2, 3, 2)));
    assert_eq!(f.get_at("a", 6), Some(("3".into(), 2, 6, 3)));
    assert_eq!(f.get_at("b", 5), None);
    // Versions below the compaction are gone from disk, except the newest one per key.
    assert_eq!(
        f.versions_on_disk(),
        2,
        "a@3 (newest at or below 5) and a@6 remain; b's tombstone and history go"
    );
    assert_eq!(
        f.mvcc
            .events_between(0, 10, 100)
            .expect("events")
            .first()
            .map(|r| r.revision),
        Some(5)
    );
}

#[test]
fn the_version_field_is_read_without_decoding_the_record() {
    let live = keys::KvRecord {
        create_revision: 3,
        version: 7,
        lease: 9,
        value: vec![1; 100],
    };
    assert_eq!(super::raw_version(&super::encode(&live)), Some(7));
    let dead = keys::KvRecord { version: 0, ..live };
    assert_eq!(super::raw_version(&super::encode(&dead)), Some(0));
}

/// A key with a long history loses it in one range deletion; its neighbours, including keys
/// that extend its name, keep what reads at or after the compaction see.
#[test]
fn compaction_of_a_long_history_spares_the_neighbours() {
    let f = open();
    for i in 0..50 {
        f.put("hot", &format!("v{i}")); // revisions 2..=51
    }
    f.put("hot\u{0}x", "n"); // 52
    f.put("hot0", "n"); // 53
    f.put("hot", "last"); // 54
    f.put("hos", "n"); // 55
    compactor::compact_for_tests(&f.mvcc, 53);
    assert_eq!(f.get_at("hot", 53), Some(("v49".into(), 2, 51, 50)));
    assert_eq!(f.get_at("hot", 54), Some(("last".into(), 2, 54, 51)));
    assert_eq!(f.get_at("hot\u{0}x", 55), Some(("n".into(), 52, 52, 1)));
    assert_eq!(f.get_at("hot0", 55), Some(("n".into(), 53, 53, 1)));
    assert_eq!(f.get_at("hos", 55), Some(("n".into(), 55, 55, 1)));
    assert_eq!(
        f.versions_on_disk(),
        5,
        "hot@51, hot@54 and one version of each neighbour"
    );
}

/// The kv family filters by key (`crate::family_options`): a read of one key may skip files
/// without it, but a scan that seeks to one key's older version must still find the keys after
/// it in files the filter would rule out.
#[test]
fn scans_and_gets_see_every_file_with_prefix_filters() {
    let f = open();
    let flush = |f: &Fixture| f.mvcc.db().flush_cf(f.mvcc.cf(CF_KV)).expect("flush");
    for k in ["a", "c", "d", "e"] {
        f.put(k, "old");
        flush(&f);
    }
    let before = f.mvcc.current_revision();
    f.put("c", "new");
    f.put("e", "new");
    flush(&f);
    f.put("g", "new");
    assert_eq!(f.keys(range("a", "z")), ["a", "c", "d", "e", "g"]);
    // At `before`, c and e have newer versions: the scan seeks to each key's older one.
    let mut old = range("a", "z");
    old.revision = before;
    assert_eq!(f.keys(old.clone()), ["a", "c", "d", "e"]);
    old.key = "b".into();
    assert_eq!(f.keys(old), ["c", "d", "e"]);
    assert_eq!(f.get_at("b", before), None);
    assert_eq!(f.get_at("c", before).map(|v| v.0), Some("old".to_string()));
    assert_eq!(
        f.get_at("e", f.mvcc.current_revision()).map(|v| v.0),
        Some("new".to_string())
    );
    assert_eq!(f.get_at("h", f.mvcc.current_revision()), None);
    assert_eq!(f.versions_on_disk(), 7);
}

/// Compaction's range deletion of a long history, with the history and the deletion in
/// different table files: reads of the key (filtered) and of its neighbours still agree.
#[test]
fn a_range_deleted_history_across_files_reads_the_same_with_prefix_filters() {
    let f = open();
    let flush = |f: &Fixture| f.mvcc.db().flush_cf(f.mvcc.cf(CF_KV)).expect("flush");
    for i in 0..20 {
        f.put("hot", &format!("v{i}")); // revisions 2..=21
        if i % 5 == 4 {
            flush(&f);
        }
    }
    f.put("hot0", "n"); // 22
    flush(&f);
    compactor::compact_for_tests(&f.mvcc, 22);
    flush(&f);
    f.put("hos", "n"); // 23
    assert_eq!(f.get_at("hot", 23), Some(("v19".into(), 2, 21, 20)));
    assert_eq!(f.get_at("hot0", 23), Some(("n".into(), 22, 22, 1)));
    assert_eq!(f.get_at("hotter", 23), None);
    assert_eq!(f.keys(range("hos", "hou")), ["hos", "hot", "hot0"]);
    assert_eq!(f.versions_on_disk(), 3);
}

/// A state put in place whole (a snapshot install) brings its own physical compaction
/// progress: the compactor must finish what the sender's had not, not take this member's
/// earlier progress for it.
#[test]
fn reloading_a_replaced_state_takes_its_compaction_progress() {
    let f = open();
    for v in ["1", "2", "3", "4"] {
        f.put("a", v); // 2..=5
    }
    f.apply(|a| {
        a.compact(&CompactionRequest {
            revision: 5,
            physical: false,
        })
    })
    .expect("compact");
    compactor::compact_for_tests(&f.mvcc, 5);
    f.mvcc.compact_done.send_replace(5);
    // The replacing state: compacted to 5 logically, physically not yet.
    f.mvcc
        .db()
        .put_cf(f.mvcc.cf(CF_META), META_COMPACT_DONE, super::encode(&0i64))
        .expect("meta");
    f.mvcc.reload().expect("reload");
    assert_eq!(*f.mvcc.compaction_progress().borrow(), 0);
    assert_eq!(
        *f.mvcc.compact_target.borrow(),
        5,
        "so the compactor runs again"
    );
}

/// A reader the apply path shares between commands sees what was written after it was
/// made: its iterator serves lookups only until the database changes.
#[test]
fn a_shared_reader_sees_writes_made_after_it() {
    let f = open();
    f.put("a", "1");
    let reader = f.mvcc.reader();
    let value = |key: &[u8]| {
        reader
            .get_record(key, f.mvcc.current_revision())
            .expect("read")
            .map(|(_, r)| r.value)
    };
    assert_eq!(value(b"a"), Some(b"1".to_vec()));
    assert_eq!(value(b"b"), None);
    f.put("b", "2");
    f.put("a", "3");
    assert_eq!(value(b"b"), Some(b"2".to_vec()));
    assert_eq!(value(b"a"), Some(b"3".to_vec()));
}
