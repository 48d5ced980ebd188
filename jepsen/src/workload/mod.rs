//! Workloads: what the client processes do, and how each operation's outcome is recorded.

pub mod append;
pub mod lease;
pub mod register;
pub mod watch;

use rand::rngs::StdRng;
use serde_json::Value;

use crate::client::Client;

/// What a process is about to do.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub f: String,
    pub key: Option<String>,
    pub value: Value,
}

/// How an operation ended: it happened, it certainly did not, or nobody knows.
#[derive(Debug, Clone)]
pub enum Outcome {
    Ok { value: Value },
    Fail { value: Value, error: String },
    Info { value: Value, error: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Register,
    Append,
    Watch,
    Lease,
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Workload, String> {
        match s {
            "register" => Ok(Workload::Register),
            "append" => Ok(Workload::Append),
            "watch" => Ok(Workload::Watch),
            "lease" => Ok(Workload::Lease),
            other => Err(format!(
                "--workload must be register, append, watch or lease, not {other:?}"
            )),
        }
    }
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Register => "register",
            Workload::Append => "append",
            Workload::Watch => "watch",
            Workload::Lease => "lease",
        }
    }

    pub fn generate(self, rng: &mut StdRng, process: u64, counter: u64) -> Invocation {
        match self {
            Workload::Register => register::generate(rng),
            Workload::Append => append::generate(rng, process, counter),
            // Lease processes run whole cycles (`lease::run_process`); single writes otherwise.
            Workload::Watch | Workload::Lease => watch::generate(rng, process, counter),
        }
    }

    pub async fn invoke(self, client: &mut Client, op: &Invocation) -> Outcome {
        match self {
            Workload::Register => register::invoke(client, op).await,
            Workload::Append => append::invoke(client, op).await,
            Workload::Watch | Workload::Lease => watch::invoke(client, op).await,
        }
    }
}
