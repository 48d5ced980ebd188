//! `register`: per-key read, write and compare-and-set, checked for linearizability.
//!
//! A few keys take every operation, so operations overlap a lot; values are small integers
//! so compare-and-sets succeed often enough to matter. As Jepsen's independent keys do, the
//! workload moves on to fresh keys after about `OPS_PER_KEY` operations a key: the
//! linearizability search is exponential in the concurrent operations of unknown outcome on a
//! key, and a long run on one key would end in an "unknown" verdict rather than a check.

use std::sync::atomic::{AtomicU64, Ordering};

use rand::rngs::StdRng;
use rand::Rng;
use serde_json::json;

use crate::client::{Client, ClientError};
use crate::workload::{Invocation, Outcome};

pub const KEYS: usize = 8;
const VALUES: i64 = 5;
/// Operations a key takes before the workload moves on to a fresh one.
pub const OPS_PER_KEY: u64 = 300;

/// Operations generated so far by every process of this run.
static GENERATED: AtomicU64 = AtomicU64::new(0);

pub fn key(generation: u64, k: usize) -> String {
    format!("r/{generation}/{k}")
}

/// A random operation: read, write or cas on a random key of the current generation.
pub fn generate(rng: &mut StdRng) -> Invocation {
    let n = GENERATED.fetch_add(1, Ordering::Relaxed);
    let key = key(n / (KEYS as u64 * OPS_PER_KEY), rng.gen_range(0..KEYS));
    match rng.gen_range(0..4) {
        0 | 1 => Invocation {
            f: "read".into(),
            key: Some(key),
            value: json!(null),
        },
        2 => Invocation {
            f: "write".into(),
            key: Some(key),
            value: json!(rng.gen_range(0..VALUES)),
        },
        _ => Invocation {
            f: "cas".into(),
            key: Some(key),
            value: json!([rng.gen_range(0..VALUES), rng.gen_range(0..VALUES)]),
        },
    }
}

pub async fn invoke(client: &mut Client, op: &Invocation) -> Outcome {
    let key = op.key.as_deref().unwrap_or_default();
    let result = match op.f.as_str() {
        "read" => client.get(key).await.map(|(v, _)| match v {
            Some((value, _)) => json!(value.parse::<i64>().unwrap_or(-1)),
            None => json!(null),
        }),
        "write" => client
            .put(key, &op.value.to_string(), 0)
            .await
            .map(|_| op.value.clone()),
        _ => {
            let from = op.value[0].to_string();
            let to = op.value[1].to_string();
            match client.cas(key, &from, &to).await {
                Ok(true) => Ok(op.value.clone()),
                Ok(false) => {
                    return Outcome::Fail {
                        value: op.value.clone(),
                        error: "compare failed".into(),
                    }
                }
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(value) => Outcome::Ok { value },
        Err(ClientError::Definite(e)) => Outcome::Fail {
            value: op.value.clone(),
            error: e,
        },
        Err(ClientError::Indefinite(e)) => Outcome::Info {
            value: op.value.clone(),
            error: e,
        },
    }
}
