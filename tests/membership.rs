//! Membership changes with etcdctl on a loaded cluster: grow 3 → 5 through learners that
//! are promoted once caught up, then shrink back to 3 removing the leader, while a writer
//! keeps going. No acknowledged write may be lost.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const PRELOADED_KEYS: u64 = 100_000;

fn member_ids(c: &Cluster) -> Vec<(u64, String, bool)> {
    let list = c.json(&["member", "list"]);
    list["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["ID"].as_u64().expect("ID"),
                m["peerURLs"][0].as_str().unwrap_or_default().to_string(),
                m["isLearner"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

fn count_on(c: &Cluster, i: usize, prefix: &str) -> u64 {
    let out = c.etcdctl_at(
        i,
        &[
            "get",
            prefix,
            "--prefix",
            "--consistency=s",
            "--limit=1",
            "-w",
            "json",
        ],
    );
    if !out.status.success() {
        return 0;
    }
    parse_json(&stdout(&out))["count"].as_u64().unwrap_or(0)
}

#[test]
fn grow_to_five_through_learners_and_shrink_back_removing_the_leader() {
    let mut c = Cluster::start(3);
    // Load: 100k keys through the benchmark client.
    let load = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "bench",
            "put",
            "--endpoints",
            &c.endpoints(),
            "--clients",
            "64",
            "--conns",
            "4",
        ])
        .args([
            "--total",
            &PRELOADED_KEYS.to_string(),
            "--key-space-size",
            &PRELOADED_KEYS.to_string(),
        ])
        .args(["--sequential-keys", "--key-size", "12", "--val-size", "64"])
        .output()
        .expect("running flotilla bench");
    assert!(load.status.success(), "{}", describe(&load));

    // A writer that keeps going through every change; it records what was acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let writer = {
        let (stop, acked, endpoints) = (stop.clone(), acked.clone(), c.endpoints());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let key = format!("during-{i:06}");
                if etcdctl(&endpoints, &["put", &key, "v"], None)
                    .status
                    .success()
                {
                    acked.lock().expect("lock").push(key);
                }
                i += 1;
            }
        })
    };

    // Grow to five: add each as a learner, start it, wait until it has the data, promote.
    for _ in 0..2 {
        let i = c.new_member();
        let (name, peer) = (c.members[i].name.clone(), c.members[i].peer_url());
        let added = c.ok(&[
            "member",
            "add",
            &name,
            &format!("--peer-urls={peer}"),
            "--learner",
        ]);
        let initial_cluster = added
            .lines()
            .find_map(|l| l.strip_prefix("ETCD_INITIAL_CLUSTER="))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_else(|| panic!("member add printed no ETCD_INITIAL_CLUSTER: {added}"));
        assert!(
            added.contains("ETCD_INITIAL_CLUSTER_STATE=\"existing\""),
            "{added}"
        );
        c.start_joining(i, &initial_cluster);
        let caught_up = poll(Duration::from_secs(120), || {
            (count_on(&c, i, "0") >= PRELOADED_KEYS).then_some(())
        });
        assert!(
            caught_up.is_some(),
            "the learner did not catch up:\n{}",
            c.log_tails()
        );
        let id = member_ids(&c)
            .into_iter()
            .find(|m| m.1 == peer)
            .expect("the new member is listed")
            .0;
        let promoted = poll(Duration::from_secs(60), || {
            c.etcdctl(&["member", "promote", &format!("{id:x}")])
                .status
                .success()
                .then_some(())
        });
        assert!(
            promoted.is_some(),
            "promotion never succeeded:\n{}",
            c.log_tails()
        );
    }
    let members = member_ids(&c);
    assert_eq!(members.len(), 5, "{members:?}");
    assert!(
        members.iter().all(|m| !m.2),
        "every member is a voter now: {members:?}"
    );

    // Shrink back to three, the leader first. A removed member stops by itself, as etcd's.
    for _ in 0..2 {
        let leader = c.leader();
        let id = c.member_id(leader);
        let out = c.etcdctl(&["member", "remove", &format!("{id:x}")]);
        assert!(out.status.success(), "{}", describe(&out));
        let exited = poll(Duration::from_secs(30), || {
            (!c.is_alive(leader)).then_some(())
        });
        assert!(exited.is_some(), "the removed member kept running");
        c.kill(leader);
    }
    let members = member_ids(&c);
    assert_eq!(members.len(), 3, "{members:?}");
    c.wait_ready();

    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    let acked = acked.lock().expect("lock").clone();
    assert!(
        !acked.is_empty(),
        "no write went through during the changes"
    );
    // Every acknowledged write, and the preload, is on every remaining member.
    let after = c.ok(&["put", "after-changes", "x"]);
    assert_eq!(after.trim(), "OK");
    for i in c.running() {
        let during = poll(Duration::from_secs(30), || {
            (count_on(&c, i, "during-") >= acked.len() as u64).then_some(())
        });
        assert!(
            during.is_some(),
            "member {i} is missing acknowledged writes"
        );
        assert!(
            count_on(&c, i, "0") >= PRELOADED_KEYS,
            "member {i} is missing the preload"
        );
    }
    for key in acked.iter().step_by(7) {
        assert_eq!(
            c.ok(&["get", key, "--print-value-only"]).trim(),
            "v",
            "{key}"
        );
    }
}

/// The highest log index among member `i`'s snapshot checkpoints (`snap/ckpt-TERM-INDEX`).
fn snapshot_index(c: &Cluster, i: usize) -> Option<u64> {
    std::fs::read_dir(c.members[i].data_dir.join("snap"))
        .ok()?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let rest = name.strip_prefix("ckpt-")?;
            rest.split_once('-')?.1.parse::<u64>().ok()
        })
        .max()
}

/// 1,500 revisions of one key: past a `--snapshot-count` of 1,000, so every member takes a
/// snapshot holding about 1,000 of them.
fn put_one_key_1500_times(c: &Cluster) {
    let load = flotilla(&[
        "bench",
        "put",
        "--endpoints",
        &c.endpoints(),
        "--clients",
        "4",
        "--total",
        "1500",
        "--key-space-size",
        "1",
    ]);
    assert!(load.status.success(), "bench: {}", describe(&load));
}

/// A snapshot taken before a compaction holds the history the compaction removed, and a new
/// member would be sent all of it: a compaction that removes `--snapshot-count` or more
/// revisions of the latest snapshot makes every member take a new one, with few commands
/// applied since.
#[test]
fn a_compaction_of_the_snapshots_history_refreshes_the_snapshot() {
    let c = Cluster::start_with(3, &["--snapshot-count", "1000"]);
    put_one_key_1500_times(&c);
    // The count-based snapshot, somewhere past 1,000 commands: it holds 1,000 revisions or
    // more, all of which the compaction below removes.
    let before: Vec<u64> = (0..3)
        .map(|i| {
            poll(Duration::from_secs(20), || snapshot_index(&c, i))
                .unwrap_or_else(|| c.fail(&format!("member {i} took no snapshot")))
        })
        .collect();
    let raft_index = |i: usize| -> u64 {
        let out = c.etcdctl_at(i, &["endpoint", "status", "-w", "json"]);
        parse_json(&stdout(&out))[0]["Status"]["raftIndex"]
            .as_u64()
            .expect("raftIndex")
    };
    let ahead = raft_index(c.leader());
    let rev = c.revision();
    c.ok(&["compaction", "--physical", &rev.to_string()]);
    // Fewer than 1,000 commands since the last snapshot: only the compaction can explain a
    // newer one, and it covers the compaction's entry.
    for (i, old) in before.into_iter().enumerate() {
        let new = poll(Duration::from_secs(20), || {
            snapshot_index(&c, i).filter(|n| *n > ahead)
        });
        assert!(
            new.is_some(),
            "member {i}: no snapshot after the compaction (was at index {old}, the compaction \
             is past {ahead})\n{}",
            c.log_tails()
        );
    }
}

/// What the latest snapshot holds is read from the snapshot itself, not taken from the
/// state at start: a member restarted after a compaction removed its snapshot's history
/// (before it could take a new one) takes a new one then.
#[test]
fn a_snapshot_of_compacted_history_is_refreshed_after_a_restart() {
    let mut c = Cluster::start_with(3, &["--snapshot-count", "1000"]);
    put_one_key_1500_times(&c);
    // Every member's snapshot holds about 1,000 revisions of the one key.
    for i in 0..3 {
        poll(Duration::from_secs(20), || snapshot_index(&c, i))
            .unwrap_or_else(|| c.fail(&format!("member {i} took no snapshot")));
    }
    // With a count too large to refresh anything, the compaction leaves those snapshots as
    // they are.
    for i in 0..3 {
        c.kill(i);
    }
    c.set_extra_args(&["--snapshot-count", "1000000"]);
    c.start_all();
    let before: Vec<u64> = (0..3)
        .map(|i| snapshot_index(&c, i).expect("snapshot"))
        .collect();
    let rev = c.revision();
    c.ok(&["compaction", "--physical", &rev.to_string()]);
    let status = c.etcdctl_at(c.leader(), &["endpoint", "status", "-w", "json"]);
    let compacted_at = parse_json(&stdout(&status))[0]["Status"]["raftIndex"]
        .as_u64()
        .expect("raftIndex");
    // `--physical` waited for one member's physical compaction; 1,500 revisions take the
    // others milliseconds. The pause makes it all but certain they finished before the
    // kill, the case this test is about (one that had not would finish at start, and the
    // compaction's progress would then trigger the refresh on its own).
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..3 {
        assert_eq!(snapshot_index(&c, i), Some(before[i]), "member {i}");
        c.kill(i);
    }
    // 500: the history the snapshots hold and the compaction removed (about 1,000
    // revisions) is past it, and the commands applied after the restart are far from it.
    c.set_extra_args(&["--snapshot-count", "500"]);
    c.start_all();
    for i in 0..3 {
        let new = poll(Duration::from_secs(20), || {
            snapshot_index(&c, i).filter(|n| *n >= compacted_at)
        });
        assert!(
            new.is_some(),
            "member {i}: no snapshot after the restart (still at {}, the compaction is at \
             {compacted_at})\n{}",
            before[i],
            c.log_tails()
        );
    }
}
