//! `lease`: keys attached to leases vanish atomically when the lease is revoked or expires,
//! never before.
//!
//! Each process runs lease cycles: grant a lease, put two keys under it in one Txn, then
//! either keep it alive for a while and revoke it, or stop renewing and let it expire,
//! reading the pair all along. The checker knows, for every read, whether the lease must
//! still have been alive (a renewal's effect lasts at least TTL from its invocation) or
//! must be gone (its revoke was acknowledged), and that the pair is all or nothing.

use std::time::Duration;

use flotilla_proto::etcdserverpb::lease_client::LeaseClient;
use flotilla_proto::etcdserverpb::{
    request_op, LeaseKeepAliveRequest, PutRequest, RequestOp, TxnRequest,
};
use rand::rngs::StdRng;
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{Client, ClientError};
use crate::history::{Completed, OpKind};
use crate::runner::Recorder;

/// Lease TTL in seconds (above the store's 2 s minimum).
pub const TTL: i64 = 4;

fn outcome_kind(e: &ClientError) -> OpKind {
    match e {
        ClientError::Definite(_) => OpKind::Fail,
        ClientError::Indefinite(_) => OpKind::Info,
    }
}

/// One process: lease cycles until the deadline. Returns when done; never panics on errors.
pub async fn run_process(
    rec: &Recorder,
    mut process: u64,
    concurrency: u64,
    client: &mut Client,
    rng: &mut StdRng,
    deadline: Instant,
) {
    let mut cycle = 0u64;
    while Instant::now() < deadline {
        cycle += 1;
        let key = format!("l/{process}-{cycle}/");
        macro_rules! record {
            ($f:expr, $kind:expr, $value:expr, $err:expr) => {
                rec.op(process, $kind, $f, Some(key.clone()), $value, $err)
                    .await
            };
        }
        // Grant.
        record!("grant", OpKind::Invoke, json!(TTL), None);
        let id = match client.lease_grant(TTL).await {
            Ok(id) => {
                record!("grant", OpKind::Ok, json!({"ttl": TTL, "id": id}), None);
                id
            }
            Err(e) => {
                record!(
                    "grant",
                    outcome_kind(&e),
                    json!(TTL),
                    Some(e.message().to_string())
                );
                if outcome_kind(&e) == OpKind::Info {
                    process += concurrency;
                }
                continue;
            }
        };
        // Both keys under the lease, atomically.
        let puts = ["a", "b"]
            .iter()
            .map(|k| RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: format!("{key}{k}").into_bytes(),
                    value: b"x".to_vec(),
                    lease: id,
                    ..Default::default()
                })),
            })
            .collect();
        record!("put", OpKind::Invoke, json!(id), None);
        match client
            .txn(TxnRequest {
                success: puts,
                ..Default::default()
            })
            .await
        {
            Ok(_) => record!("put", OpKind::Ok, json!(id), None),
            Err(e) => {
                record!(
                    "put",
                    outcome_kind(&e),
                    json!(id),
                    Some(e.message().to_string())
                );
                if outcome_kind(&e) == OpKind::Info {
                    process += concurrency;
                }
                continue;
            }
        }
        let revoke = rng.gen_bool(0.5);
        let renewals = rng.gen_range(1..4);
        // Keep alive (a stream per cycle), reading in between.
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.send(LeaseKeepAliveRequest { id }).await;
        let mut stream = match tokio::time::timeout(
            Duration::from_secs(3),
            LeaseClient::new(client.channel.clone()).lease_keep_alive(ReceiverStream::new(rx)),
        )
        .await
        {
            Ok(Ok(s)) => Some(s.into_inner()),
            _ => None,
        };
        let mut first = true;
        for _ in 0..renewals {
            read(rec, process, client, &key).await;
            tokio::time::sleep(Duration::from_millis(800)).await;
            let Some(s) = stream.as_mut() else { break };
            record!("keepalive", OpKind::Invoke, json!(id), None);
            if !first && tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                record!(
                    "keepalive",
                    OpKind::Fail,
                    json!(id),
                    Some("stream closed".into())
                );
                break;
            }
            first = false;
            match tokio::time::timeout(Duration::from_secs(3), s.message()).await {
                Ok(Ok(Some(r))) if r.ttl > 0 => record!(
                    "keepalive",
                    OpKind::Ok,
                    json!({"id": id, "ttl": r.ttl}),
                    None
                ),
                // TTL 0: the lease is gone; the renewal did nothing.
                Ok(Ok(Some(_))) => record!(
                    "keepalive",
                    OpKind::Fail,
                    json!(id),
                    Some("lease not found".into())
                ),
                other => {
                    // Whether the renewal happened is unknown.
                    record!(
                        "keepalive",
                        OpKind::Info,
                        json!(id),
                        Some(format!("{other:?}"))
                    );
                    process += concurrency;
                    stream = None;
                }
            }
        }
        drop(tx);
        if revoke {
            record!("revoke", OpKind::Invoke, json!(id), None);
            match client.lease_revoke(id).await {
                Ok(()) => record!("revoke", OpKind::Ok, json!(id), None),
                Err(e) => {
                    record!(
                        "revoke",
                        outcome_kind(&e),
                        json!(id),
                        Some(e.message().to_string())
                    );
                    if outcome_kind(&e) == OpKind::Info {
                        process += concurrency;
                    }
                }
            }
            read(rec, process, client, &key).await;
        } else {
            // Let it expire, reading as it does.
            let until = Instant::now() + Duration::from_secs(TTL as u64 + 2);
            while Instant::now() < until && Instant::now() < deadline {
                read(rec, process, client, &key).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn read(rec: &Recorder, process: u64, client: &mut Client, key: &str) {
    rec.op(
        process,
        OpKind::Invoke,
        "read",
        Some(key.to_string()),
        json!(null),
        None,
    )
    .await;
    match client.get_prefix(key).await {
        Ok((kvs, _)) => {
            let names: Vec<String> = kvs
                .into_iter()
                .map(|(k, _)| k.trim_start_matches(key).to_string())
                .collect();
            rec.op(
                process,
                OpKind::Ok,
                "read",
                Some(key.to_string()),
                json!(names),
                None,
            )
            .await;
        }
        Err(e) => {
            rec.op(
                process,
                OpKind::Fail,
                "read",
                Some(key.to_string()),
                json!(null),
                Some(e.message().to_string()),
            )
            .await
        }
    }
}

/// Checks every lease cycle (one key prefix each): all-or-nothing reads, alive while it
/// must be, gone after an acknowledged revoke.
pub fn check(
    completed: &[Completed<'_>],
    describe: impl Fn(&Completed<'_>) -> Value,
) -> Vec<Value> {
    use std::collections::BTreeMap;
    let mut cycles: BTreeMap<&str, Vec<&Completed<'_>>> = BTreeMap::new();
    for c in completed {
        if let Some(k) = c.invoke.key.as_deref() {
            cycles.entry(k).or_default().push(c);
        }
    }
    let ttl_ns = TTL as u64 * 1_000_000_000;
    let mut anomalies = Vec::new();
    for (key, ops) in cycles {
        let put_done = ops
            .iter()
            .find(|c| c.invoke.f == "put" && c.kind() == OpKind::Ok)
            .and_then(|c| c.complete.map(|o| o.time_ns));
        let revoke_done = ops
            .iter()
            .find(|c| c.invoke.f == "revoke" && c.kind() == OpKind::Ok)
            .and_then(|c| c.complete.map(|o| o.time_ns));
        let revoke_invoked = ops
            .iter()
            .find(|c| c.invoke.f == "revoke")
            .map(|c| c.invoke.time_ns);
        // Renewals known to have happened: the lease lives at least TTL past each invocation.
        let renewals: Vec<(u64, u64)> = ops
            .iter()
            .filter(|c| {
                (c.invoke.f == "grant" || c.invoke.f == "keepalive") && c.kind() == OpKind::Ok
            })
            .filter_map(|c| c.complete.map(|o| (c.invoke.time_ns, o.time_ns)))
            .collect();
        for c in ops
            .iter()
            .filter(|c| c.invoke.f == "read" && c.kind() == OpKind::Ok)
        {
            let seen: Vec<&str> = c
                .value()
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            let (start, end) = (
                c.invoke.time_ns,
                c.complete.map(|o| o.time_ns).unwrap_or(u64::MAX),
            );
            if seen.len() == 1 {
                anomalies.push(
                    json!({"type": "lease-partial-vanish", "key": key, "ops": [describe(c)]}),
                );
                continue;
            }
            let present = seen.len() == 2;
            if present && revoke_done.is_some_and(|t| t < start) {
                anomalies.push(json!({
                    "type": "lease-key-survived-revoke", "key": key, "ops": [describe(c)],
                    "explanation": "read after the revoke was acknowledged still saw the lease's keys",
                }));
            }
            let must_live_until = renewals
                .iter()
                .filter(|(_, done)| *done <= end)
                .map(|(inv, _)| inv + ttl_ns)
                .max();
            let revoking = revoke_invoked.is_some_and(|t| t < end);
            if !present
                && put_done.is_some_and(|t| t < start)
                && must_live_until.is_some_and(|until| end < until)
                && !revoking
            {
                anomalies.push(json!({
                    "type": "lease-expired-early", "key": key, "ops": [describe(c)],
                    "explanation": "keys gone while a renewal acknowledged less than a TTL before still held",
                }));
            }
        }
    }
    anomalies
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{pair, Op};

    fn op(index: u64, kind: OpKind, f: &str, value: Value, time_ms: u64) -> Op {
        Op {
            index,
            process: 0,
            kind,
            f: f.into(),
            key: Some("l/0-1/".into()),
            value,
            time_ns: time_ms * 1_000_000,
            error: None,
        }
    }

    fn run(ops: &[Op]) -> Vec<String> {
        check(&pair(ops), |c| json!(c.invoke.index))
            .iter()
            .map(|a| a["type"].as_str().unwrap_or("").to_string())
            .collect()
    }

    fn base() -> Vec<Op> {
        vec![
            op(0, OpKind::Invoke, "grant", json!(4), 0),
            op(1, OpKind::Ok, "grant", json!({"id": 1}), 10),
            op(2, OpKind::Invoke, "put", json!(1), 20),
            op(3, OpKind::Ok, "put", json!(1), 30),
        ]
    }

    #[test]
    fn a_valid_cycle_passes() {
        let mut h = base();
        h.extend([
            op(4, OpKind::Invoke, "read", json!(null), 40),
            op(5, OpKind::Ok, "read", json!(["a", "b"]), 50),
            op(6, OpKind::Invoke, "revoke", json!(1), 60),
            op(7, OpKind::Ok, "revoke", json!(1), 70),
            op(8, OpKind::Invoke, "read", json!(null), 80),
            op(9, OpKind::Ok, "read", json!([]), 90),
            // Long after the TTL, gone is fine.
            op(10, OpKind::Invoke, "read", json!(null), 9000),
            op(11, OpKind::Ok, "read", json!([]), 9010),
        ]);
        assert!(run(&h).is_empty(), "{:?}", run(&h));
    }

    #[test]
    fn planted_lease_bugs_are_caught() {
        let mut survived = base();
        survived.extend([
            op(4, OpKind::Invoke, "revoke", json!(1), 40),
            op(5, OpKind::Ok, "revoke", json!(1), 50),
            op(6, OpKind::Invoke, "read", json!(null), 60),
            op(7, OpKind::Ok, "read", json!(["a", "b"]), 70),
        ]);
        assert_eq!(run(&survived), ["lease-key-survived-revoke"]);

        let mut partial = base();
        partial.extend([
            op(4, OpKind::Invoke, "read", json!(null), 5000),
            op(5, OpKind::Ok, "read", json!(["b"]), 5010),
        ]);
        assert_eq!(run(&partial), ["lease-partial-vanish"]);

        let mut early = base();
        early.extend([
            op(4, OpKind::Invoke, "read", json!(null), 1000),
            op(5, OpKind::Ok, "read", json!([]), 1010),
        ]);
        assert_eq!(run(&early), ["lease-expired-early"]);
    }
}
