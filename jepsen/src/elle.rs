//! Strict serializability of list-append transactions, in the manner of Elle.
//!
//! Appended elements are unique, so every read of a key names exactly which appends it saw
//! and in what order. From the longest read of each key comes the key's version order;
//! from it, dependency edges between transactions: ww (one append directly after another),
//! wr (a read that saw an append), rw (a read that missed the next append), plus real-time
//! edges (one transaction completed before another began). A cycle is an anomaly, named by
//! its edges: G0 (ww only), G1c (ww and wr), G-single (exactly one rw), G2 (more rw); with a
//! real-time edge in it, the same names with `-realtime` (serializable, but not strictly).
//! Reads that cannot come from one version order, aborted reads (G1a), intermediate reads
//! (G1b), duplicated and never-written elements are reported directly.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use serde_json::{json, Value};

/// One micro-operation: an append of an element, or a read and the list it returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mop {
    Append(u64, u64),
    Read(u64, Option<Vec<u64>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Fail,
    /// Unknown outcome: it may have committed.
    Info,
}

#[derive(Debug, Clone)]
pub struct Txn {
    /// The caller's name for it, reported back in anomalies.
    pub id: usize,
    pub status: Status,
    pub mops: Vec<Mop>,
    pub invoke_ns: u64,
    /// None when it never completed.
    pub complete_ns: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Edge {
    Ww,
    Wr,
    Rw,
    Realtime,
}

/// Checks the transactions and returns every anomaly found (empty: strictly serializable).
pub fn check(txns: &[Txn]) -> Vec<Value> {
    let mut anomalies = Vec::new();
    // Who appended each element (unique per key).
    let mut writer: HashMap<(u64, u64), usize> = HashMap::new();
    for (i, t) in txns.iter().enumerate() {
        for m in &t.mops {
            if let Mop::Append(k, v) = m {
                writer.insert((*k, *v), i);
            }
        }
    }
    // Version order per key: the longest read; every other read must be a prefix of it.
    let mut order: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut longest_by: BTreeMap<u64, usize> = BTreeMap::new();
    for (i, t) in txns
        .iter()
        .enumerate()
        .filter(|(_, t)| t.status == Status::Ok)
    {
        for m in &t.mops {
            if let Mop::Read(k, Some(list)) = m {
                let seen: HashSet<&u64> = list.iter().collect();
                if seen.len() != list.len() {
                    anomalies.push(json!({"type": "duplicate-elements", "key": k, "txns": [t.id], "read": list}));
                }
                for v in list {
                    match writer.get(&(*k, *v)) {
                        None => anomalies.push(
                            json!({"type": "garbage-read", "key": k, "element": v, "txns": [t.id]}),
                        ),
                        Some(&w) if txns[w].status == Status::Fail => anomalies.push(json!({
                            "type": "G1a", "key": k, "element": v, "txns": [t.id, txns[w].id],
                            "explanation": "read an element appended by a transaction that failed",
                        })),
                        _ => {}
                    }
                }
                let cur = order.entry(*k).or_default();
                let (short, long) = if list.len() <= cur.len() {
                    (list, &*cur)
                } else {
                    (&*cur, list)
                };
                if long[..short.len()] != short[..] {
                    anomalies.push(json!({
                        "type": "incompatible-order",
                        "key": k,
                        "txns": [t.id, longest_by.get(k).map(|&j| txns[j].id)],
                        "reads": [list, cur.clone()],
                    }));
                } else if list.len() > cur.len() {
                    *cur = list.clone();
                    longest_by.insert(*k, i);
                }
            }
        }
    }
    // G1b: a read ending at an element its writer later overwrote in the same transaction.
    for t in txns.iter().filter(|t| t.status == Status::Ok) {
        for m in &t.mops {
            if let Mop::Read(k, Some(list)) = m {
                if let Some(&last) = list.last() {
                    if let Some(&w) = writer.get(&(*k, last)) {
                        let appends: Vec<u64> = txns[w]
                            .mops
                            .iter()
                            .filter_map(|m| match m {
                                Mop::Append(kk, v) if kk == k => Some(*v),
                                _ => None,
                            })
                            .collect();
                        if w != txns.iter().position(|x| x.id == t.id).unwrap_or(usize::MAX)
                            && appends.last() != Some(&last)
                        {
                            anomalies.push(json!({"type": "G1b", "key": k, "element": last, "txns": [t.id, txns[w].id]}));
                        }
                    }
                }
            }
        }
    }

    // Transactions in the graph: every Ok one, and Info ones whose appends were seen.
    let committed: Vec<bool> = txns
        .iter()
        .map(|t| match t.status {
            Status::Ok => true,
            Status::Fail => false,
            Status::Info => t.mops.iter().any(|m| match m {
                Mop::Append(k, v) => order.get(k).is_some_and(|o| o.contains(v)),
                Mop::Read(..) => false,
            }),
        })
        .collect();
    let mut edges: HashMap<usize, Vec<(usize, Edge)>> = HashMap::new();
    let mut add = |from: usize, to: usize, e: Edge| {
        if from != to && committed[from] && committed[to] {
            edges.entry(from).or_default().push((to, e));
        }
    };
    for (k, versions) in &order {
        for pair in versions.windows(2) {
            if let (Some(&a), Some(&b)) = (writer.get(&(*k, pair[0])), writer.get(&(*k, pair[1]))) {
                add(a, b, Edge::Ww);
            }
        }
    }
    for (i, t) in txns
        .iter()
        .enumerate()
        .filter(|(_, t)| t.status == Status::Ok)
    {
        for m in &t.mops {
            let Mop::Read(k, Some(list)) = m else {
                continue;
            };
            if let Some(last) = list.last() {
                if let Some(&w) = writer.get(&(*k, *last)) {
                    add(w, i, Edge::Wr);
                }
            }
            let next = order.get(k).and_then(|o| o.get(list.len()));
            if let Some(next) = next {
                if let Some(&w) = writer.get(&(*k, *next)) {
                    add(i, w, Edge::Rw);
                }
            }
        }
    }
    // Real-time order among completed transactions, as a frontier: each transaction gets
    // edges from the completed ones no later completion already follows.
    let mut events: Vec<(u64, bool, usize)> = Vec::new();
    for (i, t) in txns.iter().enumerate() {
        if t.status != Status::Ok {
            continue;
        }
        events.push((t.invoke_ns, true, i));
        if let Some(c) = t.complete_ns {
            events.push((c, false, i));
        }
    }
    events.sort_by_key(|&(t, is_invoke, i)| (t, !is_invoke, i));
    let mut frontier: Vec<usize> = Vec::new();
    let mut preds_at_invoke: HashMap<usize, Vec<usize>> = HashMap::new();
    for (_, is_invoke, i) in events {
        if is_invoke {
            preds_at_invoke.insert(i, frontier.clone());
            for &f in &frontier {
                add(f, i, Edge::Realtime);
            }
        } else {
            let before = preds_at_invoke.get(&i).cloned().unwrap_or_default();
            frontier.retain(|f| !before.contains(f));
            frontier.push(i);
        }
    }

    for cycle in cycles(txns.len(), &edges) {
        let kinds: Vec<Edge> = cycle.iter().map(|(_, _, e)| *e).collect();
        let rw = kinds.iter().filter(|e| **e == Edge::Rw).count();
        let realtime = kinds.contains(&Edge::Realtime);
        let base = if rw == 1 {
            "G-single"
        } else if rw > 1 {
            "G2"
        } else if kinds.contains(&Edge::Wr) {
            "G1c"
        } else if kinds.contains(&Edge::Ww) {
            "G0"
        } else {
            "realtime-cycle"
        };
        let name = if realtime && base != "realtime-cycle" {
            format!("{base}-realtime")
        } else {
            base.to_string()
        };
        anomalies.push(json!({
            "type": name,
            "txns": cycle.iter().map(|(a, _, _)| txns[*a].id).collect::<Vec<_>>(),
            "cycle": cycle.iter().map(|(a, b, e)| json!({"from": txns[*a].id, "to": txns[*b].id, "edge": format!("{e:?}")})).collect::<Vec<_>>(),
        }));
    }
    anomalies
}

/// One short cycle per strongly connected component (Tarjan, then BFS inside it).
fn cycles(n: usize, edges: &HashMap<usize, Vec<(usize, Edge)>>) -> Vec<Vec<(usize, usize, Edge)>> {
    let empty = Vec::new();
    let succ = |v: usize| edges.get(&v).unwrap_or(&empty);
    // Iterative Tarjan.
    let mut index = vec![usize::MAX; n];
    let mut low = vec![0usize; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut next_index = 0;
    let mut components: Vec<Vec<usize>> = Vec::new();
    for root in 0..n {
        if index[root] != usize::MAX {
            continue;
        }
        let mut call: Vec<(usize, usize)> = vec![(root, 0)];
        while let Some(&mut (v, ref mut pos)) = call.last_mut() {
            if *pos == 0 && index[v] == usize::MAX {
                index[v] = next_index;
                low[v] = next_index;
                next_index += 1;
                stack.push(v);
                on_stack[v] = true;
            }
            let out = succ(v);
            if *pos < out.len() {
                let w = out[*pos].0;
                *pos += 1;
                if index[w] == usize::MAX {
                    call.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            call.pop();
            if let Some(&(parent, _)) = call.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let mut comp = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    comp.push(w);
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    components.push(comp);
                }
            }
        }
    }
    let mut out = Vec::new();
    for comp in components {
        let members: HashSet<usize> = comp.iter().copied().collect();
        let start = comp[0];
        // Shortest path from start back to start, inside the component.
        let mut prev: HashMap<usize, (usize, Edge)> = HashMap::new();
        let mut queue = VecDeque::from([start]);
        let mut found = None;
        'bfs: while let Some(v) = queue.pop_front() {
            for &(w, e) in succ(v) {
                if !members.contains(&w) {
                    continue;
                }
                if w == start {
                    found = Some((v, e));
                    break 'bfs;
                }
                if let std::collections::hash_map::Entry::Vacant(slot) = prev.entry(w) {
                    slot.insert((v, e));
                    queue.push_back(w);
                }
            }
        }
        if let Some((last, e)) = found {
            let mut cycle = vec![(last, start, e)];
            let mut v = last;
            while v != start {
                let (p, pe) = prev[&v];
                cycle.push((p, v, pe));
                v = p;
            }
            cycle.reverse();
            out.push(cycle);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(id: usize, mops: Vec<Mop>, invoke: u64, complete: u64) -> Txn {
        Txn {
            id,
            status: Status::Ok,
            mops,
            invoke_ns: invoke,
            complete_ns: Some(complete),
        }
    }
    fn r(k: u64, list: &[u64]) -> Mop {
        Mop::Read(k, Some(list.to_vec()))
    }
    fn a(k: u64, v: u64) -> Mop {
        Mop::Append(k, v)
    }
    fn types(anomalies: &[Value]) -> Vec<String> {
        anomalies
            .iter()
            .map(|a| a["type"].as_str().unwrap_or("").to_string())
            .collect()
    }
    fn txns_of(anomalies: &[Value], ty: &str) -> Vec<u64> {
        let a = anomalies
            .iter()
            .find(|a| a["type"] == ty)
            .unwrap_or_else(|| panic!("no {ty} in {anomalies:?}"));
        let mut ids: Vec<u64> = a["txns"]
            .as_array()
            .expect("txns")
            .iter()
            .filter_map(|v| v.as_u64())
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn a_serial_history_is_valid() {
        let h = vec![
            ok(0, vec![a(1, 10)], 0, 10),
            ok(1, vec![r(1, &[10]), a(2, 20)], 20, 30),
            ok(2, vec![r(1, &[10]), r(2, &[20]), a(1, 11)], 40, 50),
            ok(3, vec![r(1, &[10, 11])], 60, 70),
        ];
        assert!(check(&h).is_empty(), "{:?}", check(&h));
    }

    #[test]
    fn g_single_is_caught_with_its_transactions() {
        // Read skew: T1 sees T2's append to key 2 but not its append to key 1.
        let h = vec![
            ok(1, vec![r(1, &[]), r(2, &[5])], 0, 100),
            ok(2, vec![a(1, 7), a(2, 5)], 0, 100),
            ok(3, vec![r(1, &[7]), r(2, &[5])], 200, 300),
        ];
        let found = check(&h);
        assert!(types(&found).contains(&"G-single".to_string()), "{found:?}");
        assert_eq!(txns_of(&found, "G-single"), vec![1, 2]);
    }

    #[test]
    fn write_skew_is_g2() {
        let h = vec![
            ok(1, vec![r(1, &[]), a(2, 5)], 0, 100),
            ok(2, vec![r(2, &[]), a(1, 7)], 0, 100),
            ok(3, vec![r(1, &[7]), r(2, &[5])], 200, 300),
        ];
        let found = check(&h);
        assert!(types(&found).contains(&"G2".to_string()), "{found:?}");
        assert_eq!(txns_of(&found, "G2"), vec![1, 2]);
    }

    #[test]
    fn g0_and_g1c_are_caught() {
        // Appends to two keys ordered differently: ww cycle.
        let g0 = vec![
            ok(1, vec![a(1, 1), a(2, 1)], 0, 100),
            ok(2, vec![a(1, 2), a(2, 2)], 0, 100),
            ok(3, vec![r(1, &[1, 2]), r(2, &[2, 1])], 200, 300),
        ];
        assert!(
            types(&check(&g0)).contains(&"G0".to_string()),
            "{:?}",
            check(&g0)
        );
        // Each reads the other's append: wr cycle.
        let g1c = vec![
            ok(1, vec![a(1, 1), r(2, &[2])], 0, 100),
            ok(2, vec![a(2, 2), r(1, &[1])], 0, 100),
        ];
        assert!(
            types(&check(&g1c)).contains(&"G1c".to_string()),
            "{:?}",
            check(&g1c)
        );
    }

    #[test]
    fn aborted_intermediate_garbage_and_incompatible_reads_are_caught() {
        let g1a = vec![
            Txn {
                id: 1,
                status: Status::Fail,
                mops: vec![a(1, 9)],
                invoke_ns: 0,
                complete_ns: Some(10),
            },
            ok(2, vec![r(1, &[9])], 20, 30),
        ];
        assert_eq!(txns_of(&check(&g1a), "G1a"), vec![1, 2]);

        let g1b = vec![
            ok(1, vec![a(1, 1), a(1, 2)], 0, 10),
            ok(2, vec![r(1, &[1])], 5, 8),
        ];
        assert_eq!(txns_of(&check(&g1b), "G1b"), vec![1, 2]);

        let garbage = vec![ok(1, vec![r(1, &[42])], 0, 10)];
        assert!(types(&check(&garbage)).contains(&"garbage-read".to_string()));

        let diverged = vec![
            ok(1, vec![a(1, 1)], 0, 10),
            ok(2, vec![a(1, 2)], 0, 10),
            ok(3, vec![r(1, &[1, 2])], 20, 30),
            ok(4, vec![r(1, &[2, 1])], 20, 30),
        ];
        assert!(types(&check(&diverged)).contains(&"incompatible-order".to_string()));
    }

    #[test]
    fn stale_read_after_a_completed_write_is_a_realtime_violation() {
        // T2 starts after T1 finished appending, yet reads the key without the append.
        let h = vec![
            ok(1, vec![a(1, 1)], 0, 10),
            ok(2, vec![r(1, &[])], 20, 30),
            ok(3, vec![r(1, &[1])], 40, 50),
        ];
        let found = check(&h);
        assert!(
            types(&found).iter().any(|t| t.ends_with("-realtime")),
            "{found:?}"
        );
    }
}
