//! The history of a test: every operation's invocation and completion, and every fault
//! window, with monotonic timestamps from the start of the test.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How an operation record reads: started, happened, certainly did not happen, or unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// One line of `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    pub index: u64,
    pub process: u64,
    #[serde(rename = "type")]
    pub kind: OpKind,
    pub f: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub value: Value,
    pub time_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Start,
    Stop,
}

/// A fault's start or end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nemesis {
    pub time_ns: u64,
    pub fault: String,
    pub phase: Phase,
    pub targets: Vec<usize>,
}

/// An operation from invocation to completion. `complete` is None for an operation whose
/// process never heard back (it may take effect at any time after `invoke`).
#[derive(Debug, Clone)]
pub struct Completed<'a> {
    pub invoke: &'a Op,
    pub complete: Option<&'a Op>,
}

impl Completed<'_> {
    /// The outcome: Ok, Fail or Info (Info also for an operation never completed).
    pub fn kind(&self) -> OpKind {
        self.complete.map(|c| c.kind).unwrap_or(OpKind::Info)
    }

    pub fn value(&self) -> &Value {
        self.complete
            .map(|c| &c.value)
            .unwrap_or(&self.invoke.value)
    }
}

/// Pairs each invocation with its process's next completion.
pub fn pair(ops: &[Op]) -> Vec<Completed<'_>> {
    let mut open: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    let mut out: Vec<Completed<'_>> = Vec::new();
    for op in ops {
        match op.kind {
            OpKind::Invoke => {
                open.insert(op.process, out.len());
                out.push(Completed {
                    invoke: op,
                    complete: None,
                });
            }
            _ => {
                if let Some(i) = open.remove(&op.process) {
                    out[i].complete = Some(op);
                }
            }
        }
    }
    out
}
