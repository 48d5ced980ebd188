//! `append`: transactions over a few keys whose values are lists; each transaction reads
//! some keys and appends unique elements to others. Checked for strict serializability.
//!
//! A transaction is one etcd Txn: it reads the keys it appends to first (outside the Txn),
//! then the Txn compares their mod_revisions against those reads and, if nothing changed,
//! runs the micro-operations in order: a read is a Range, an append a Put of the longer
//! list. A changed key makes the Txn fail, which is a definite failure.

use flotilla_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use flotilla_proto::etcdserverpb::{
    request_op, response_op, Compare, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::{json, Value};

use crate::client::{Client, ClientError};
use crate::workload::{Invocation, Outcome};

pub const KEYS: usize = 6;

fn key(k: u64) -> String {
    format!("a/{k}")
}

/// A transaction of one to four micro-ops on distinct keys: `["r", k, null]` or
/// `["append", k, element]`, elements unique per test (process * 2^32 + counter).
pub fn generate(rng: &mut StdRng, process: u64, counter: u64) -> Invocation {
    let mut keys: Vec<u64> = (0..KEYS as u64).collect();
    keys.shuffle(rng);
    let n = rng.gen_range(1..=4);
    let mops: Vec<Value> = keys[..n]
        .iter()
        .enumerate()
        .map(|(i, &k)| {
            if rng.gen_bool(0.5) {
                json!(["r", k, null])
            } else {
                json!(["append", k, (process << 32) | (counter * 4 + i as u64)])
            }
        })
        .collect();
    Invocation {
        f: "txn".into(),
        key: None,
        value: Value::Array(mops),
    }
}

fn parse_list(bytes: &[u8]) -> Vec<u64> {
    if bytes.is_empty() {
        return Vec::new();
    }
    String::from_utf8_lossy(bytes)
        .split(',')
        .filter_map(|x| x.parse().ok())
        .collect()
}

fn render_list(list: &[u64]) -> String {
    list.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

pub async fn invoke(client: &mut Client, op: &Invocation) -> Outcome {
    let mops = op.value.as_array().cloned().unwrap_or_default();
    let fail = |e: ClientError, value: &Value| match e {
        ClientError::Definite(e) => Outcome::Fail {
            value: value.clone(),
            error: e,
        },
        ClientError::Indefinite(e) => Outcome::Info {
            value: value.clone(),
            error: e,
        },
    };
    // Read the keys about to be appended to, for the guard.
    let mut current: Vec<(u64, Vec<u64>, i64)> = Vec::new();
    for m in &mops {
        if m[0] == "append" {
            let k = m[1].as_u64().unwrap_or(0);
            match client.get(&key(k)).await {
                Ok((v, _)) => {
                    let (list, rev) = v
                        .map(|(s, rev)| (parse_list(s.as_bytes()), rev))
                        .unwrap_or((Vec::new(), 0));
                    current.push((k, list, rev));
                }
                Err(e) => return fail(ClientError::Definite(e.message().to_string()), &op.value),
            }
        }
    }
    let compare = current
        .iter()
        .map(|(k, _, rev)| Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: key(*k).into_bytes(),
            target_union: Some(TargetUnion::ModRevision(*rev)),
            range_end: Vec::new(),
        })
        .collect();
    let mut success = Vec::new();
    for m in &mops {
        let k = m[1].as_u64().unwrap_or(0);
        if m[0] == "r" {
            success.push(RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: key(k).into_bytes(),
                    ..Default::default()
                })),
            });
        } else {
            let mut list = current
                .iter()
                .find(|c| c.0 == k)
                .map(|c| c.1.clone())
                .unwrap_or_default();
            list.push(m[2].as_u64().unwrap_or(0));
            success.push(RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: key(k).into_bytes(),
                    value: render_list(&list).into_bytes(),
                    ..Default::default()
                })),
            });
        }
    }
    let txn = TxnRequest {
        compare,
        success,
        failure: Vec::new(),
    };
    match client.txn(txn).await {
        Ok((true, responses, _rev)) => {
            let mut reads = responses.iter().filter_map(|r| match r {
                response_op::Response::ResponseRange(r) => Some(r),
                _ => None,
            });
            let completed: Vec<Value> = mops
                .iter()
                .map(|m| {
                    if m[0] == "r" {
                        let list = reads
                            .next()
                            .and_then(|r| r.kvs.first())
                            .map(|kv| parse_list(&kv.value))
                            .unwrap_or_default();
                        json!(["r", m[1], list])
                    } else {
                        m.clone()
                    }
                })
                .collect();
            Outcome::Ok {
                value: Value::Array(completed),
            }
        }
        Ok((false, _, _)) => Outcome::Fail {
            value: op.value.clone(),
            error: "guard failed: a key changed".into(),
        },
        Err(e) => fail(e, &op.value),
    }
}
