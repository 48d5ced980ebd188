//! Acknowledged writes survive members being killed with SIGKILL.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;

#[test]
fn leader_killed_survivors_continue_and_it_catches_up() {
    let mut c = Cluster::start(3);

    let mut acked: Vec<(String, String)> = Vec::new();
    for i in 0..10 {
        let (k, v) = (format!("before-{i}"), format!("v{i}"));
        if stdout(&c.etcdctl(&["put", &k, &v])) == "OK\n" {
            acked.push((k, v));
        }
    }
    assert_eq!(acked.len(), 10, "a healthy cluster acknowledges every put");

    let old = c.leader();
    c.kill(old);
    let survivors = c.running();
    assert_eq!(survivors.len(), 2);

    // The two survivors elect a new leader among themselves...
    let new = c.leader();
    assert_ne!(new, old);
    assert!(survivors.contains(&new));

    // ...and keep taking writes.
    for i in 0..10 {
        let (k, v) = (format!("after-{i}"), format!("w{i}"));
        let out = c.etcdctl_on(&survivors, &["put", &k, &v]);
        assert_eq!(stdout_ok(&out, &["put", &k, &v]), "OK\n");
        acked.push((k, v));
    }
    let out = c.etcdctl_on(&survivors, &["put", "latest", "final"]);
    assert_eq!(stdout_ok(&out, &["put", "latest"]), "OK\n");

    // Every acknowledged write is readable, from each survivor.
    for &i in &survivors {
        for (k, v) in &acked {
            let out = c.etcdctl_at(i, &["get", k]);
            assert_eq!(
                stdout_ok(&out, &["get", k]),
                format!("{k}\n{v}\n"),
                "member {i}"
            );
        }
    }

    // The killed member comes back and catches up with what it missed.
    c.restart(old);
    c.wait_ready();
    let mut last = None;
    let caught_up = poll(POLL_TIMEOUT, || {
        let out = c.etcdctl_at(old, &["get", "latest", "--consistency=s"]);
        let ok = out.status.success() && stdout(&out) == "latest\nfinal\n";
        last = Some(out);
        ok.then_some(())
    });
    assert!(
        caught_up.is_some(),
        "restarted member {old} never served latest=final: {}",
        describe(last.as_ref().expect("one attempt"))
    );
    for (k, v) in &acked {
        let out = c.etcdctl_at(old, &["get", k, "--consistency=s"]);
        assert_eq!(
            stdout_ok(&out, &["get", k]),
            format!("{k}\n{v}\n"),
            "member {old}"
        );
    }
    // It is a full member again: the cluster agrees on a leader and it serves
    // linearizable reads.
    c.leader();
    let out = c.etcdctl_at(old, &["get", "latest"]);
    assert_eq!(stdout_ok(&out, &["get", "latest"]), "latest\nfinal\n");
}

#[test]
fn whole_cluster_killed_during_writes_loses_no_acknowledged_write() {
    let mut c = Cluster::start(3);

    // One writer putting key-i = val-i, recording the revision of each acknowledged put.
    let acked: Arc<Mutex<Vec<(usize, i64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, endpoints) = (acked.clone(), stop.clone(), c.endpoints());
        thread::spawn(move || {
            for i in 0..100_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (k, v) = (format!("key-{i:06}"), format!("val-{i}"));
                let out = etcdctl(&endpoints, &["put", &k, &v, "-w", "json"], None);
                if !out.status.success() {
                    continue;
                }
                let json = parse_json(&stdout(&out));
                let rev = json["header"]["revision"]
                    .as_i64()
                    .unwrap_or_else(|| panic!("put acknowledged without a revision: {json}"));
                acked.lock().expect("lock").push((i, rev));
            }
        })
    };

    let enough = poll(Duration::from_secs(60), || {
        (acked.lock().expect("lock").len() >= 50).then_some(())
    });
    assert!(
        enough.is_some(),
        "the writer never got 50 puts acknowledged"
    );

    // Kill every member while the writer keeps going.
    for i in 0..c.len() {
        c.kill(i);
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer thread");
    let acked = acked.lock().expect("lock").clone();
    assert!(
        acked.windows(2).all(|w| w[0].1 < w[1].1),
        "sequential acknowledged puts should have increasing revisions: {acked:?}"
    );
    let max_acked = acked
        .iter()
        .map(|a| a.1)
        .max()
        .expect("some acknowledged puts");

    for i in 0..c.len() {
        c.restart(i);
    }
    c.wait_ready();

    // Every acknowledged key is there, with the revision it was acknowledged at.
    let all = c.json(&["get", "key-", "--prefix"]);
    let stored: BTreeMap<String, (String, i64)> = all["kvs"]
        .as_array()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| {
                    (
                        b64str(&kv["key"]),
                        (
                            b64str(&kv["value"]),
                            kv["mod_revision"].as_i64().expect("rev"),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mut lost = Vec::new();
    for (i, rev) in &acked {
        let k = format!("key-{i:06}");
        let want = (format!("val-{i}"), *rev);
        if stored.get(&k) != Some(&want) {
            lost.push(format!(
                "{k}: acknowledged {want:?}, stored {:?}",
                stored.get(&k)
            ));
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged puts lost or changed:\n{}",
        lost.len(),
        acked.len(),
        lost.join("\n")
    );
    assert!(
        all["header"]["revision"].as_i64().expect("revision") >= max_acked,
        "{}",
        all["header"]
    );

    // New writes continue after the last acknowledged one.
    let put = c.json(&["put", "after-restart", "x"]);
    let rev = put["header"]["revision"].as_i64().expect("revision");
    assert!(
        rev > max_acked,
        "new put got revision {rev}, acknowledged up to {max_acked}"
    );
    // And every member has all of it.
    for i in 0..c.len() {
        let out = c.etcdctl_at(i, &["get", "key-", "--prefix", "--limit=1", "-w", "json"]);
        let n = parse_json(&stdout_ok(&out, &["get", "--limit=1"]))["count"]
            .as_u64()
            .unwrap_or(0);
        assert!(
            n as usize >= acked.len(),
            "member {i} has {n} keys, {} acknowledged",
            acked.len()
        );
    }
}

/// The remaining TTL of `lease timetolive` output, "... remaining(7s) ...".
fn remaining_ttl(out: &str) -> i64 {
    let start = out
        .find("remaining(")
        .unwrap_or_else(|| panic!("no remaining TTL in {out:?}"))
        + "remaining(".len();
    let end = out[start..].find('s').map(|e| start + e).unwrap_or(start);
    out[start..end]
        .parse()
        .unwrap_or_else(|_| panic!("remaining TTL is not a number in {out:?}"))
}

#[test]
fn lease_keeps_its_remaining_ttl_across_a_leader_kill() {
    let mut c = Cluster::start(3);
    let t0 = std::time::Instant::now();
    let grant = c.ok(&["lease", "grant", "10"]);
    let id = grant
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        c.ok(&["put", &format!("--lease={id}"), "leased", "v"]),
        "OK\n"
    );

    // Past half its TTL the leader checkpoints what is left; then the leader dies.
    thread::sleep(Duration::from_millis(6500));
    let before = remaining_ttl(&c.ok(&["lease", "timetolive", &id]));
    assert!(before <= 4, "6.5 s into a 10 s lease: {before}s left");
    let old = c.leader();
    c.kill(old);
    let survivors = c.running();
    c.leader();

    // The new leader kept (roughly) the remaining TTL instead of granting a fresh 10 s.
    let out = c.etcdctl_on(&survivors, &["lease", "timetolive", &id, "--keys"]);
    let text = stdout_ok(&out, &["lease", "timetolive"]);
    let after = remaining_ttl(&text);
    let elapsed = t0.elapsed().as_secs_f64();
    assert!(
        after <= before + 1,
        "after the failover the lease has {after}s left; before it had {before}s: {text}"
    );
    if after > 0 {
        assert!(
            text.contains("attached keys([leased])"),
            "the lease is alive, so is its key: {text}"
        );
    }

    // It expires on time: gone well before a renewed TTL would have run out.
    let gone = poll(Duration::from_secs(30), || {
        let out = c.etcdctl_on(&survivors, &["get", "leased", "--print-value-only"]);
        (out.status.success() && stdout(&out).is_empty()).then(|| t0.elapsed().as_secs_f64())
    })
    .unwrap_or_else(|| c.fail("the lease's key never went away"));
    assert!(
        gone < elapsed + 7.0,
        "the key went at {gone:.1}s; the failover was over at {elapsed:.1}s, so a fresh \
         10 s TTL would explain it"
    );
    assert!(
        gone >= 9.5,
        "the key went early, at {gone:.1}s of a 10 s lease"
    );
}
