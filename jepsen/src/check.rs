//! From a stored run to a verdict: feeds each workload's history to its checker and
//! gathers the anomalies, with the operations involved, for `results.json`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::elle::{self, Mop, Status, Txn};
use crate::history::{pair, Completed, OpKind};
use crate::wgl::{self, RegisterOp, Timed};
use crate::workload::watch::{Observed, Seen};
use crate::workload::Workload;

/// Time the linearizability search may take over all keys.
const LINEARIZABILITY_BUDGET: Duration = Duration::from_secs(120);

pub fn check(workload: Workload, ops: &[crate::history::Op], finals: &Value) -> Value {
    let completed = pair(ops);
    let mut result = match workload {
        Workload::Register => register(&completed),
        Workload::Watch => watch(&completed, finals),
        Workload::Append => append(&completed),
        Workload::Lease => {
            let anomalies = crate::workload::lease::check(&completed, describe);
            json!({
                "valid": anomalies.is_empty(),
                "checker": "lease (all-or-nothing, alive while renewed, gone after revoke)",
                "anomalies": anomalies,
            })
        }
    };
    let count = |k: OpKind| completed.iter().filter(|c| c.kind() == k).count();
    result["stats"] = json!({
        "operations": completed.len(),
        "ok": count(OpKind::Ok),
        "fail": count(OpKind::Fail),
        "info": count(OpKind::Info),
    });
    result
}

fn describe(c: &Completed<'_>) -> Value {
    json!({
        "process": c.invoke.process,
        "f": c.invoke.f,
        "key": c.invoke.key,
        "invoke": c.invoke.value,
        "type": c.kind(),
        "value": c.value(),
        "invoke_ns": c.invoke.time_ns,
        "complete_ns": c.complete.map(|o| o.time_ns),
    })
}

/// Per-key linearizability of read, write and cas.
fn register(completed: &[Completed<'_>]) -> Value {
    let mut by_key: BTreeMap<String, Vec<(Timed, usize)>> = BTreeMap::new();
    for (i, c) in completed.iter().enumerate() {
        let Some(key) = c.invoke.key.clone() else {
            continue;
        };
        let kind = c.kind();
        let op = match (c.invoke.f.as_str(), kind) {
            (_, OpKind::Fail) => continue, // definitely did not happen
            ("read", OpKind::Ok) => RegisterOp::Read(wgl::value(c.value())),
            ("read", _) => continue, // an unknown read constrains nothing
            ("write", _) => match c.invoke.value.as_i64() {
                Some(v) => RegisterOp::Write(v),
                None => continue,
            },
            ("cas", k) => {
                let (from, to) = (
                    c.invoke.value[0].as_i64().unwrap_or(0),
                    c.invoke.value[1].as_i64().unwrap_or(0),
                );
                if k == OpKind::Ok {
                    RegisterOp::Cas(from, to)
                } else {
                    RegisterOp::MaybeCas(from, to)
                }
            }
            _ => continue,
        };
        let return_ns = if kind == OpKind::Ok {
            c.complete.map(|o| o.time_ns)
        } else {
            None
        };
        let list = by_key.entry(key).or_default();
        let id = list.len();
        list.push((
            Timed {
                id,
                op,
                call_ns: c.invoke.time_ns,
                return_ns,
            },
            i,
        ));
    }
    // Every key gets an equal share first; the time the easy keys did not use then goes,
    // in equal shares again, to the keys that ran out.
    let started = std::time::Instant::now();
    let share = LINEARIZABILITY_BUDGET / (by_key.len().max(1) as u32);
    let mut verdicts: Vec<(&String, wgl::Verdict)> = by_key
        .iter()
        .map(|(key, list)| {
            let timed: Vec<Timed> = list.iter().map(|(t, _)| t.clone()).collect();
            (key, wgl::check(&timed, None, share))
        })
        .collect();
    let hard: Vec<usize> = (0..verdicts.len())
        .filter(|&i| matches!(verdicts[i].1, wgl::Verdict::Unknown(_)))
        .collect();
    if !hard.is_empty() {
        let left = LINEARIZABILITY_BUDGET.saturating_sub(started.elapsed());
        let second = left / hard.len() as u32;
        if second > share {
            for i in hard {
                let timed: Vec<Timed> = by_key[verdicts[i].0]
                    .iter()
                    .map(|(t, _)| t.clone())
                    .collect();
                verdicts[i].1 = wgl::check(&timed, None, second);
            }
        }
    }
    let mut anomalies = Vec::new();
    let mut unknown = Vec::new();
    for (key, verdict) in verdicts {
        let list = &by_key[key];
        match verdict {
            wgl::Verdict::Linearizable => {}
            wgl::Verdict::Unknown(why) => unknown.push(json!({"key": key, "reason": why})),
            wgl::Verdict::NotLinearizable { stuck, linearized } => {
                let (t, idx) = &list[stuck];
                let end = t.return_ns.unwrap_or(u64::MAX);
                // The operation that could not be placed, and everything concurrent with it.
                let concurrent: Vec<Value> = list
                    .iter()
                    .filter(|(o, _)| {
                        o.id != stuck
                            && o.call_ns <= end
                            && o.return_ns.unwrap_or(u64::MAX) >= t.call_ns
                    })
                    .map(|(_, i)| describe(&completed[*i]))
                    .collect();
                anomalies.push(json!({
                    "type": "nonlinearizable",
                    "key": key,
                    "op": describe(&completed[*idx]),
                    "concurrent": concurrent,
                    "linearized_before_failing": linearized,
                }));
            }
        }
    }
    let valid = if !anomalies.is_empty() {
        json!(false)
    } else if !unknown.is_empty() {
        json!("unknown")
    } else {
        json!(true)
    };
    json!({ "valid": valid, "checker": "linearizable (per-key register)", "anomalies": anomalies, "unknown": unknown })
}

/// Strict serializability of the list-append transactions (see `elle`).
fn append(completed: &[Completed<'_>]) -> Value {
    let parse = |v: &Value| -> Vec<Mop> {
        v.as_array()
            .map(|mops| {
                mops.iter()
                    .filter_map(|m| {
                        let k = m[1].as_u64()?;
                        match m[0].as_str()? {
                            "append" => Some(Mop::Append(k, m[2].as_u64()?)),
                            _ => Some(Mop::Read(
                                k,
                                m[2].as_array()
                                    .map(|l| l.iter().filter_map(|x| x.as_u64()).collect()),
                            )),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let txns: Vec<Txn> = completed
        .iter()
        .enumerate()
        .map(|(i, c)| Txn {
            id: i,
            status: match c.kind() {
                OpKind::Ok => Status::Ok,
                OpKind::Fail => Status::Fail,
                _ => Status::Info,
            },
            mops: parse(if c.kind() == OpKind::Ok {
                c.value()
            } else {
                &c.invoke.value
            }),
            invoke_ns: c.invoke.time_ns,
            complete_ns: c
                .complete
                .filter(|o| o.kind == OpKind::Ok)
                .map(|o| o.time_ns),
        })
        .collect();
    let mut anomalies = elle::check(&txns);
    // Name the operations, not just their positions.
    for a in &mut anomalies {
        if let Some(ids) = a["txns"].as_array().cloned() {
            a["ops"] = json!(ids
                .iter()
                .filter_map(|id| id
                    .as_u64()
                    .and_then(|i| completed.get(i as usize))
                    .map(describe))
                .collect::<Vec<_>>());
        }
    }
    json!({
        "valid": anomalies.is_empty(),
        "checker": "elle list-append (ww, wr, rw, real-time cycles; G1a, G1b)",
        "anomalies": anomalies,
    })
}

/// Every watcher saw the reference history of its span: in order, no gaps, no duplicates,
/// correct prev_kv; and every acknowledged write is in the reference at its revision.
fn watch(completed: &[Completed<'_>], finals: &Value) -> Value {
    let mut anomalies = Vec::new();
    let reference: Observed =
        serde_json::from_value(finals["reference"].clone()).unwrap_or_default();
    let watchers: Vec<Observed> =
        serde_json::from_value(finals["watchers"].clone()).unwrap_or_default();
    let final_revision = finals["final_revision"].as_i64().unwrap_or(0);
    anomalies.extend(stream_anomalies("reference", &reference.events));
    let by_revision: BTreeMap<(i64, String), &Seen> = reference
        .events
        .iter()
        .map(|e| ((e.revision, e.key.clone()), e))
        .collect();
    if reference.events.last().map(|e| e.revision).unwrap_or(0) < final_revision
        && reference.compact_revision.is_none()
    {
        anomalies.push(json!({
            "type": "reference-incomplete",
            "last_seen": reference.events.last().map(|e| e.revision),
            "final_revision": final_revision,
        }));
    }
    // Acknowledged writes are in the reference, where they said.
    for c in completed {
        if c.kind() != OpKind::Ok {
            continue;
        }
        let rev = c.value()["revision"].as_i64().unwrap_or(0);
        let key = c.invoke.key.clone().unwrap_or_default();
        match by_revision.get(&(rev, key.clone())) {
            Some(e) if Some(e.value.as_str()) == c.value()["value"].as_str() => {}
            other => anomalies.push(json!({
                "type": "acknowledged-write-missing",
                "op": describe(c),
                "reference_has": other.map(|e| json!(e)),
            })),
        }
    }
    for w in &watchers {
        let name = format!("watcher {}", w.watcher);
        anomalies.extend(stream_anomalies(&name, &w.events));
        if let Some(compact) = w.compact_revision {
            anomalies.push(json!({"type": "unexpected-compaction", "watcher": w.watcher, "compact_revision": compact}));
        }
        let last = w
            .events
            .last()
            .map(|e| e.revision)
            .unwrap_or(w.start_revision - 1);
        let expected: Vec<&Seen> = reference
            .events
            .iter()
            .filter(|e| e.revision >= w.start_revision && e.revision <= last)
            .collect();
        let got: Vec<&Seen> = w.events.iter().collect();
        if expected != got {
            let missing: Vec<&Seen> = expected
                .iter()
                .filter(|e| !got.contains(e))
                .copied()
                .take(20)
                .collect();
            let unexpected: Vec<&Seen> = got
                .iter()
                .filter(|e| !expected.contains(e))
                .copied()
                .take(20)
                .collect();
            anomalies.push(json!({
                "type": "watch-diverged",
                "watcher": w.watcher,
                "missing": missing,
                "unexpected": unexpected,
                "expected_events": expected.len(),
                "seen_events": got.len(),
            }));
        }
        if last < final_revision {
            anomalies.push(json!({
                "type": "watch-incomplete",
                "watcher": w.watcher,
                "last_seen": last,
                "final_revision": final_revision,
                "reconnects": w.reconnects,
            }));
        }
    }
    json!({
        "valid": anomalies.is_empty(),
        "checker": "watch (order, gaps, duplicates, prev_kv, acknowledged writes)",
        "anomalies": anomalies,
        "watchers": watchers.len(),
        "reference_events": reference.events.len(),
        "final_revision": final_revision,
    })
}

/// Within one stream: revisions never go back, no event twice, and each event's prev_kv is
/// the value the key had at its previous event.
fn stream_anomalies(name: &str, events: &[Seen]) -> Vec<Value> {
    let mut out = Vec::new();
    let mut last_value: BTreeMap<&str, Option<&str>> = BTreeMap::new();
    for pair in events.windows(2) {
        if pair[1].revision < pair[0].revision {
            out.push(
                json!({"type": "watch-out-of-order", "stream": name, "events": [pair[0], pair[1]]}),
            );
        }
        if pair[1] == pair[0] {
            out.push(json!({"type": "watch-duplicate", "stream": name, "event": pair[1]}));
        }
    }
    for e in events {
        if let Some(prev) = last_value.get(e.key.as_str()) {
            if e.prev_value.as_deref() != *prev {
                out.push(json!({
                    "type": "wrong-prev-kv",
                    "stream": name,
                    "event": e,
                    "expected_prev": prev,
                }));
            }
        }
        let now = if e.kind == "delete" {
            None
        } else {
            Some(e.value.as_str())
        };
        last_value.insert(e.key.as_str(), now);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(rev: i64, key: &str, value: &str, prev: Option<&str>) -> Seen {
        Seen {
            revision: rev,
            key: key.into(),
            kind: "put".into(),
            value: value.into(),
            prev_value: prev.map(Into::into),
        }
    }

    fn finals(reference: Vec<Seen>, watchers: Vec<Vec<Seen>>) -> Value {
        let last = reference.last().map(|e| e.revision).unwrap_or(0);
        json!({
            "final_revision": last,
            "reference": Observed { watcher: 99, start_revision: 1, events: reference, ..Default::default() },
            "watchers": watchers.into_iter().enumerate().map(|(i, events)| Observed {
                watcher: i, start_revision: 1, events, ..Default::default()
            }).collect::<Vec<_>>(),
        })
    }

    fn types(v: &Value) -> Vec<String> {
        v["anomalies"]
            .as_array()
            .expect("anomalies")
            .iter()
            .map(|a| a["type"].as_str().unwrap_or("").to_string())
            .collect()
    }

    #[test]
    fn watch_checker_catches_duplicates_gaps_order_and_prev_kv() {
        let good = vec![
            seen(2, "w/0", "a", None),
            seen(3, "w/0", "b", Some("a")),
            seen(4, "w/1", "c", None),
        ];
        let ok = watch(&[], &finals(good.clone(), vec![good.clone(), good.clone()]));
        assert_eq!(ok["valid"], json!(true), "{ok}");

        let dup = vec![
            good[0].clone(),
            good[1].clone(),
            good[1].clone(),
            good[2].clone(),
        ];
        assert!(types(&watch(&[], &finals(good.clone(), vec![dup])))
            .contains(&"watch-duplicate".to_string()));

        let gap = vec![good[0].clone(), good[2].clone()];
        let r = watch(&[], &finals(good.clone(), vec![gap]));
        assert!(types(&r).contains(&"watch-diverged".to_string()), "{r}");
        assert_eq!(
            r["anomalies"][0]["missing"][0]["revision"],
            json!(3),
            "the missing event is named: {r}"
        );

        let swapped = vec![good[1].clone(), good[0].clone(), good[2].clone()];
        assert!(types(&watch(&[], &finals(good.clone(), vec![swapped])))
            .contains(&"watch-out-of-order".to_string()));

        let bad_prev = vec![
            good[0].clone(),
            seen(3, "w/0", "b", Some("zzz")),
            good[2].clone(),
        ];
        assert!(types(&watch(&[], &finals(good.clone(), vec![bad_prev])))
            .contains(&"wrong-prev-kv".to_string()));

        let short = vec![good[0].clone()];
        assert!(types(&watch(&[], &finals(good, vec![short])))
            .contains(&"watch-incomplete".to_string()));
    }
}
