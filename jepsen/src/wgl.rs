//! Linearizability of a single register, by the Wing & Gong search with Lowe's memoization
//! (the algorithm porcupine uses).
//!
//! Operations become call and return events on a time line; the search tries to linearize
//! calls in order, backtracking when some operation's return comes before it could be
//! placed. Visited (linearized set, register state) pairs are cached, which keeps typical
//! histories near-linear. An operation with an unknown outcome returns at +infinity: it may
//! take effect any time after its call, or, placed last, not at all.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;

/// One register operation as the checker sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum RegisterOp {
    Read(Option<i64>),
    Write(i64),
    /// A compare-and-set known to have succeeded.
    Cas(i64, i64),
    /// A compare-and-set whose outcome is unknown: it swapped, or it changed nothing.
    MaybeCas(i64, i64),
}

#[derive(Debug, Clone)]
pub struct Timed {
    /// Index of the operation in the caller's list (reported back on failure).
    pub id: usize,
    pub op: RegisterOp,
    pub call_ns: u64,
    /// None: never returned (unknown outcome).
    pub return_ns: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Linearizable,
    /// No order exists. `stuck` is the operation whose return could not be preceded by its
    /// linearization point in the deepest attempt; `linearized` how many went before.
    NotLinearizable {
        stuck: usize,
        linearized: usize,
    },
    Unknown(String),
}

fn step(state: Option<i64>, op: &RegisterOp) -> Option<Option<i64>> {
    match op {
        RegisterOp::Read(v) => (state == *v).then_some(state),
        RegisterOp::Write(v) => Some(Some(*v)),
        RegisterOp::Cas(from, to) => (state == Some(*from)).then_some(Some(*to)),
        RegisterOp::MaybeCas(from, to) => Some(if state == Some(*from) {
            Some(*to)
        } else {
            state
        }),
    }
}

#[derive(Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    prev: usize,
    next: usize,
}

const NIL: usize = usize::MAX;

pub fn check(ops: &[Timed], initial: Option<i64>, budget: Duration) -> Verdict {
    let n = ops.len();
    if n == 0 {
        return Verdict::Linearizable;
    }
    // Events in time order; at equal times calls go first (the more permissive choice).
    let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, o) in ops.iter().enumerate() {
        order.push((o.call_ns, true, i));
        order.push((o.return_ns.unwrap_or(u64::MAX), false, i));
    }
    order.sort_by_key(|&(t, is_call, i)| (t, !is_call, i));
    // A doubly linked list with a head sentinel at index 0.
    let mut ev: Vec<Event> = Vec::with_capacity(2 * n + 1);
    ev.push(Event {
        op: NIL,
        is_call: false,
        prev: NIL,
        next: 1,
    });
    let mut call_of = vec![0usize; n];
    let mut return_of = vec![0usize; n];
    for (k, &(_, is_call, i)) in order.iter().enumerate() {
        let idx = k + 1;
        ev.push(Event {
            op: i,
            is_call,
            prev: idx - 1,
            next: if k + 1 < order.len() { idx + 1 } else { NIL },
        });
        if is_call {
            call_of[i] = idx;
        } else {
            return_of[i] = idx;
        }
    }
    let unlink = |ev: &mut Vec<Event>, x: usize| {
        let (p, nx) = (ev[x].prev, ev[x].next);
        ev[p].next = nx;
        if nx != NIL {
            ev[nx].prev = p;
        }
    };
    let relink = |ev: &mut Vec<Event>, x: usize| {
        let (p, nx) = (ev[x].prev, ev[x].next);
        ev[p].next = x;
        if nx != NIL {
            ev[nx].prev = x;
        }
    };

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut count = 0usize;
    let mut cache: HashSet<(Vec<u64>, Option<i64>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<i64>)> = Vec::new();
    let mut state = initial;
    let mut entry = ev[0].next;
    let mut best = (0usize, 0usize);
    let started = Instant::now();
    let mut steps = 0u64;
    while ev[0].next != NIL {
        steps += 1;
        if steps % 4096 == 0 && started.elapsed() > budget {
            return Verdict::Unknown(format!(
                "gave up after {budget:?} ({steps} steps, {count} of {n} placed)"
            ));
        }
        if entry == NIL {
            // Only possible if every remaining event is a call we could not place before a
            // return that no longer exists; treat as stuck on the first remaining op.
            return Verdict::NotLinearizable {
                stuck: ops[ev[ev[0].next].op].id,
                linearized: count,
            };
        }
        let e = ev[entry];
        if e.is_call {
            if let Some(next_state) = step(state, &ops[e.op].op) {
                let mut bits = linearized.clone();
                bits[e.op / 64] |= 1 << (e.op % 64);
                if cache.insert((bits.clone(), next_state)) {
                    stack.push((entry, state));
                    state = next_state;
                    linearized = bits;
                    count += 1;
                    unlink(&mut ev, entry);
                    unlink(&mut ev, return_of[e.op]);
                    entry = ev[0].next;
                    continue;
                }
            }
            entry = e.next;
        } else {
            // A return before its operation could be placed: undo the last placement.
            if count >= best.0 {
                best = (count, e.op);
            }
            let Some((call, prev_state)) = stack.pop() else {
                return Verdict::NotLinearizable {
                    stuck: ops[best.1].id,
                    linearized: best.0,
                };
            };
            let op = ev[call].op;
            linearized[op / 64] &= !(1 << (op % 64));
            count -= 1;
            state = prev_state;
            relink(&mut ev, return_of[op]);
            relink(&mut ev, call);
            entry = ev[call].next;
        }
    }
    let _ = call_of;
    Verdict::Linearizable
}

/// Reads a register value as the workload records it (a number or null).
pub fn value(v: &Value) -> Option<i64> {
    v.as_i64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: usize, op: RegisterOp, call: u64, ret: Option<u64>) -> Timed {
        Timed {
            id,
            op,
            call_ns: call,
            return_ns: ret,
        }
    }

    fn verdict(ops: &[Timed]) -> Verdict {
        check(ops, None, Duration::from_secs(5))
    }

    #[test]
    fn sequential_and_concurrent_histories_pass() {
        use RegisterOp::*;
        let ok = vec![
            t(0, Write(1), 0, Some(10)),
            t(1, Read(Some(1)), 20, Some(30)),
            t(2, Cas(1, 2), 40, Some(50)),
            // Concurrent with the cas: may read before or after it.
            t(3, Read(Some(1)), 35, Some(60)),
            t(4, Read(Some(2)), 70, Some(80)),
        ];
        assert_eq!(verdict(&ok), Verdict::Linearizable);
    }

    #[test]
    fn stale_read_is_caught() {
        use RegisterOp::*;
        let stale = vec![
            t(0, Write(1), 0, Some(10)),
            t(1, Write(2), 20, Some(30)),
            t(2, Read(Some(1)), 40, Some(50)),
        ];
        assert_eq!(
            verdict(&stale),
            Verdict::NotLinearizable {
                stuck: 2,
                linearized: 2
            }
        );
    }

    #[test]
    fn lost_acknowledged_write_is_caught() {
        use RegisterOp::*;
        let lost = vec![t(0, Write(3), 0, Some(10)), t(1, Read(None), 20, Some(30))];
        assert!(matches!(
            verdict(&lost),
            Verdict::NotLinearizable { stuck: 1, .. }
        ));
    }

    #[test]
    fn impossible_cas_is_caught() {
        use RegisterOp::*;
        let bad = vec![t(0, Write(1), 0, Some(10)), t(1, Cas(2, 3), 20, Some(30))];
        assert!(matches!(
            verdict(&bad),
            Verdict::NotLinearizable { stuck: 1, .. }
        ));
    }

    #[test]
    fn unknown_outcomes_may_or_may_not_happen() {
        use RegisterOp::*;
        // The write's outcome is unknown, and a later read sees it: fine.
        let seen = vec![t(0, Write(5), 0, None), t(1, Read(Some(5)), 100, Some(110))];
        assert_eq!(verdict(&seen), Verdict::Linearizable);
        // ... or never sees it: also fine (it happened after, or never).
        let unseen = vec![t(0, Write(5), 0, None), t(1, Read(None), 100, Some(110))];
        assert_eq!(verdict(&unseen), Verdict::Linearizable);
        // An unknown cas that could not have swapped changes nothing.
        let cas = vec![
            t(0, MaybeCas(9, 1), 0, None),
            t(1, Read(None), 100, Some(110)),
        ];
        assert_eq!(verdict(&cas), Verdict::Linearizable);
        // But a value nobody wrote is never read.
        let ghost = vec![t(0, Write(5), 0, None), t(1, Read(Some(6)), 100, Some(110))];
        assert!(matches!(verdict(&ghost), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn a_tiny_budget_gives_unknown_not_a_hang() {
        use RegisterOp::*;
        // Many overlapping writes and reads that force a wide search.
        let mut ops = Vec::new();
        for i in 0..2000u64 {
            ops.push(t(ops.len(), Write((i % 7) as i64), i, Some(i + 5000)));
            ops.push(t(
                ops.len(),
                Read(Some(((i + 3) % 7) as i64)),
                i,
                Some(i + 5000),
            ));
        }
        ops.push(t(ops.len(), Read(Some(99)), 10_000, Some(10_001)));
        assert!(matches!(
            check(&ops, None, Duration::from_millis(1)),
            Verdict::Unknown(_)
        ));
    }

    #[test]
    fn long_valid_histories_check_quickly() {
        use RegisterOp::*;
        let mut ops = Vec::new();
        let mut v = 0;
        for i in 0..10_000u64 {
            let at = i * 10;
            if i % 3 == 0 {
                v = (i % 5) as i64;
                ops.push(t(ops.len(), Write(v), at, Some(at + 15)));
            } else {
                ops.push(t(ops.len(), Read(Some(v)), at + 5, Some(at + 8)));
            }
        }
        assert_eq!(
            check(&ops, None, Duration::from_secs(30)),
            Verdict::Linearizable
        );
    }
}
