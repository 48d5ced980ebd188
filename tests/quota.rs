//! The space quota and the NOSPACE alarm, as etcd operators know them: past
//! `--quota-backend-bytes` writes fail with etcd's error and the alarm is raised; reads and
//! deletes still work; compaction, defragmentation and `alarm disarm` bring writes back.

mod common;

use common::*;
use rand::RngCore;

const NOSPACE: &str = "etcdserver: mvcc: database space exceeded";

fn random_value(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes / 2];
    rand::thread_rng().fill_bytes(&mut raw);
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn nospace_alarm_then_compact_defrag_disarm() {
    let c = Cluster::start_with(3, &["--quota-backend-bytes", "3000000"]);
    // Overwrite a few keys with incompressible values until the quota refuses a put.
    let mut refused = None;
    for i in 0..2000 {
        let out = c.etcdctl(&["put", &format!("big/{}", i % 4), &random_value(16 * 1024)]);
        if !out.status.success() {
            refused = Some(out);
            break;
        }
    }
    let refused = refused.unwrap_or_else(|| c.fail("the quota never refused a put"));
    assert_fails_with(&refused, NOSPACE);

    // The alarm is raised for the cluster, and every member refuses writes that add data.
    let alarms = poll(POLL_TIMEOUT, || {
        let list = c.ok(&["alarm", "list"]);
        list.contains("alarm:NOSPACE").then_some(list)
    })
    .unwrap_or_else(|| c.fail("no NOSPACE alarm listed"));
    assert!(alarms.starts_with("memberID:"), "{alarms}");
    for i in 0..3 {
        assert_fails_with(&c.etcdctl_at(i, &["put", "small", "v"]), NOSPACE);
    }
    assert_fails_with(&c.etcdctl(&["lease", "grant", "60"]), NOSPACE);
    let status = c.json(&["endpoint", "status", "-w", "json"]);
    assert!(
        status.to_string().contains("alarm:NOSPACE"),
        "endpoint status shows the alarm: {status}"
    );

    // Reads and deletes still work.
    assert_eq!(c.ok(&["get", "big/0", "--keys-only"]), "big/0\n\n");
    assert_eq!(c.ok(&["del", "big/3"]), "1\n");

    // What the operator does: compact, defragment every member, disarm.
    let rev = c.revision();
    c.ok(&["compaction", "--physical", &rev.to_string()]);
    let defrag = c.ok(&["defrag", "--cluster"]);
    assert_eq!(
        defrag.matches("Finished defragmenting").count(),
        3,
        "{defrag}"
    );
    let disarm = c.ok(&["alarm", "disarm"]);
    assert!(disarm.contains("alarm:NOSPACE"), "{disarm}");
    assert_eq!(c.ok(&["alarm", "list"]), "");
    assert_eq!(c.ok(&["put", "small", "v"]), "OK\n");
    assert_eq!(c.ok(&["get", "small", "--print-value-only"]), "v\n");
}
