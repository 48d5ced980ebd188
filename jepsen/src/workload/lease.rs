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

/// How long past its TTL a lease that nobody renews may still live. A new leader gives every
/// lease a fresh TTL (etcd does the same without checkpoints), and elections under faults
/// take seconds, so the bound is loose; a lease that outlives it was never expired.
pub const EXPIRY_SLACK_SECS: u64 = 12;

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
                // The member may be down or cut off: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(200)).await;
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
                // The member may be down or cut off: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let revoke = rng.gen_bool(0.5);
        let renewals = rng.gen_range(1..4);
        // Keep alive on one stream per cycle, reading in between. The stream opens with the
        // first renewal (a bidirectional call's first message must be queued before the call
        // is awaited), so each renewal's invocation is recorded when its request is sent.
        let (tx, rx) = mpsc::channel(1);
        let mut rx = Some(rx);
        let mut stream = None;
        for _ in 0..renewals {
            read(rec, process, client, &key).await;
            tokio::time::sleep(Duration::from_millis(800)).await;
            record!("keepalive", OpKind::Invoke, json!(id), None);
            if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                record!(
                    "keepalive",
                    OpKind::Fail,
                    json!(id),
                    Some("stream closed".into())
                );
                break;
            }
            if let Some(rx) = rx.take() {
                let mut lease = LeaseClient::new(client.channel.clone());
                let call = lease.lease_keep_alive(ReceiverStream::new(rx));
                stream = match tokio::time::timeout(Duration::from_secs(3), call).await {
                    Ok(Ok(s)) => Some(s.into_inner()),
                    other => {
                        let error = match other {
                            Ok(Err(status)) => status.message().to_string(),
                            _ => "timed out opening the stream".into(),
                        };
                        record!("keepalive", OpKind::Info, json!(id), Some(error));
                        process += concurrency;
                        break;
                    }
                };
            }
            let Some(s) = stream.as_mut() else { break };
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
                    break;
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
            // Let it expire, reading until the keys are gone (or long past any excuse).
            let until = Instant::now() + Duration::from_secs(TTL as u64 + EXPIRY_SLACK_SECS + 2);
            while Instant::now() < until && Instant::now() < deadline {
                if read(rec, process, client, &key).await == Some(0) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Reads the cycle's keys; returns how many were there, if the read succeeded.
async fn read(rec: &Recorder, process: u64, client: &mut Client, key: &str) -> Option<usize> {
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
            let count = names.len();
            rec.op(
                process,
                OpKind::Ok,
                "read",
                Some(key.to_string()),
                json!(names),
                None,
            )
            .await;
            Some(count)
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
            .await;
            None
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
        // The last moment anything could have renewed the lease: any grant or renewal sent,
        // whatever its outcome.
        let last_renewal_sent = ops
            .iter()
            .filter(|c| c.invoke.f == "grant" || c.invoke.f == "keepalive")
            .map(|c| c.invoke.time_ns)
            .max();
        // Nothing expires while the cluster has no leader: the lateness clock also restarts
        // at the last read this cycle's client saw fail (its evidence of unavailability).
        let last_unavailable = ops
            .iter()
            .filter(|c| c.invoke.f == "read" && c.kind() != OpKind::Ok)
            .filter_map(|c| c.complete.map(|o| o.time_ns))
            .max();
        let late_from = last_renewal_sent.max(last_unavailable);
        let expiry_slack_ns = EXPIRY_SLACK_SECS * 1_000_000_000;
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
            if present && late_from.is_some_and(|t| start > t + ttl_ns + expiry_slack_ns) {
                anomalies.push(json!({
                    "type": "lease-outlived-ttl", "key": key, "ops": [describe(c)],
                    "explanation": format!(
                        "keys still there more than TTL + {EXPIRY_SLACK_SECS} s after the last renewal was sent and the cluster was last seen unavailable"
                    ),
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

        // Nobody renewed since the grant at 0; keys still there 20 s later.
        let mut outlived = base();
        outlived.extend([
            op(4, OpKind::Invoke, "read", json!(null), 20_000),
            op(5, OpKind::Ok, "read", json!(["a", "b"]), 20_010),
        ]);
        assert_eq!(run(&outlived), ["lease-outlived-ttl"]);

        // The same, but the cluster was unavailable until 15 s: nothing could expire it.
        let mut unavailable = base();
        unavailable.extend([
            op(4, OpKind::Invoke, "read", json!(null), 14_000),
            op(5, OpKind::Fail, "read", json!(null), 15_000),
            op(6, OpKind::Invoke, "read", json!(null), 20_000),
            op(7, OpKind::Ok, "read", json!(["a", "b"]), 20_010),
        ]);
        assert!(run(&unavailable).is_empty(), "{:?}", run(&unavailable));
    }
}
