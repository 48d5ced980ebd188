//! The chaos suite end to end, as CI runs it: real members in network namespaces, faults,
//! and the checkers' verdicts. Needs root (namespaces, veth, iptables); CI runs as root.
//! Runs one test at a time: every run uses the same namespace names.

use std::path::PathBuf;
use std::process::Command;

fn jepsen() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flotilla-jepsen"))
}

/// The store binary, built by the same `cargo build --workspace` next to this one.
fn flotilla() -> PathBuf {
    jepsen().with_file_name("flotilla")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

/// Runs one test; returns the exit code and the run's results.json.
fn run(args: &[&str]) -> (i32, serde_json::Value) {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(jepsen())
        .arg("test")
        .args(args)
        .args([
            "--binary",
            &flotilla().display().to_string(),
            "--out",
            &out_dir.path().display().to_string(),
        ])
        .output()
        .expect("running flotilla-jepsen");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix("results in "))
        .unwrap_or_else(|| {
            panic!(
                "no results directory:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let results =
        std::fs::read_to_string(PathBuf::from(dir).join("results.json")).expect("results.json");
    // Keep the evidence of a failed run where CI shows it.
    if out.status.code() != Some(0) {
        eprintln!("{}", results);
    }
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_str(&results).expect("results.json is JSON"),
    )
}

#[test]
fn chaos_suite() {
    assert!(
        is_root(),
        "the chaos suite needs root for network namespaces and iptables"
    );
    assert!(
        flotilla().exists(),
        "build the workspace first: {} is missing",
        flotilla().display()
    );

    // Linearizable registers under partitions and kill -9.
    let (code, r) = run(&[
        "--workload",
        "register",
        "--nemesis",
        "partition,kill",
        "--nodes",
        "3",
        "--time-limit",
        "60",
        "--concurrency",
        "8",
        "--rate",
        "150",
        "--seed",
        "7",
    ]);
    assert_eq!(
        (code, &r["valid"]),
        (0, &serde_json::json!(true)),
        "register: {r}"
    );
    assert!(
        r["stats"]["ok"].as_u64().unwrap_or(0) > 500,
        "too few operations to mean anything: {r}"
    );

    // Watches under kill -9 and pauses.
    let (code, r) = run(&[
        "--workload",
        "watch",
        "--nemesis",
        "kill,pause",
        "--nodes",
        "3",
        "--time-limit",
        "60",
        "--concurrency",
        "4",
        "--rate",
        "100",
        "--seed",
        "7",
    ]);
    assert_eq!(
        (code, &r["valid"]),
        (0, &serde_json::json!(true)),
        "watch: {r}"
    );
    assert!(
        r["reference_events"].as_u64().unwrap_or(0) > 500,
        "too few events to mean anything: {r}"
    );

    // A broken store is caught: members that serve linearizable reads without a read index
    // answer stale reads from an isolated leader, and the checker must say so.
    let (code, r) = run(&[
        "--workload",
        "register",
        "--nemesis",
        "partition-leader",
        "--nodes",
        "3",
        "--time-limit",
        "40",
        "--concurrency",
        "8",
        "--rate",
        "200",
        "--nemesis-interval",
        "3",
        "--nemesis-duration",
        "8",
        "--seed",
        "7",
        "--member-arg=--experimental-unsafe-stale-reads",
    ]);
    assert_eq!(code, 1, "the stale-read fault went unnoticed: {r}");
    let anomalies = r["anomalies"].as_array().expect("anomalies");
    assert!(
        anomalies
            .iter()
            .any(|a| a["type"] == "nonlinearizable" && a["op"]["f"] == "read"),
        "expected a non-linearizable read: {r}"
    );
}
