//! `watch`: writers put to a few keys while watchers follow the key prefix, reconnecting
//! (to another node) from the revision after the last one they saw whenever a stream
//! breaks. Every watcher must see the same ordered, gap-free, duplicate-free events as a
//! reference watch read from revision 1 after the faults end, with correct prev_kv.

use std::time::Duration;

use flotilla_proto::etcdserverpb::{watch_request, WatchCreateRequest, WatchRequest};
use flotilla_proto::mvccpb::event::EventType;
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{Client, ClientError};
use crate::db::Cluster;
use crate::workload::{Invocation, Outcome};

pub const PREFIX: &str = "w/";
const KEYS: u64 = 4;

pub fn generate(rng: &mut StdRng, process: u64, counter: u64) -> Invocation {
    Invocation {
        f: "write".into(),
        key: Some(format!("{PREFIX}{}", rng.gen_range(0..KEYS))),
        value: json!(format!("{process}-{counter}")),
    }
}

pub async fn invoke(client: &mut Client, op: &Invocation) -> Outcome {
    let key = op.key.as_deref().unwrap_or_default();
    let value = op.value.as_str().unwrap_or_default();
    match client.put(key, value, 0).await {
        Ok(revision) => Outcome::Ok {
            value: json!({"value": value, "revision": revision}),
        },
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

/// One event as a watcher received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub revision: i64,
    pub key: String,
    pub kind: String,
    pub value: String,
    pub prev_value: Option<String>,
}

/// Everything one watcher saw, and how its streams ended.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Observed {
    pub watcher: usize,
    pub start_revision: i64,
    pub events: Vec<Seen>,
    /// Stream breaks it recovered from (reconnects), with the reason.
    pub reconnects: Vec<String>,
    /// Set when the store cancelled the watch because its revision was compacted.
    pub compact_revision: Option<i64>,
}

/// Follows the prefix from `start_revision` until `until` holds a revision it has reached
/// (sent once the test is over), or `give_up` passes.
pub async fn follow(
    watcher: usize,
    nodes: usize,
    start_revision: i64,
    until: tokio::sync::watch::Receiver<Option<i64>>,
    give_up: Instant,
) -> Observed {
    let mut seen = Observed {
        watcher,
        start_revision,
        ..Default::default()
    };
    let mut next = start_revision;
    let mut node = watcher % nodes + 1;
    loop {
        let done = |next: i64, until: &tokio::sync::watch::Receiver<Option<i64>>| {
            until.borrow().is_some_and(|last| next > last)
        };
        if done(next, &until) || Instant::now() > give_up || seen.compact_revision.is_some() {
            return seen;
        }
        let Ok(client) = Client::connect(&Cluster::endpoint(node)) else {
            return seen;
        };
        let (tx, rx) = mpsc::channel(1);
        let create = WatchCreateRequest {
            key: PREFIX.as_bytes().to_vec(),
            range_end: b"w0".to_vec(),
            start_revision: next,
            prev_kv: true,
            ..Default::default()
        };
        let _ = tx
            .send(WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(create)),
            })
            .await;
        let stream = tokio::time::timeout(
            Duration::from_secs(3),
            client.watch_client().watch(ReceiverStream::new(rx)),
        )
        .await;
        let mut stream = match stream {
            Ok(Ok(s)) => s.into_inner(),
            Ok(Err(e)) => {
                seen.reconnects
                    .push(format!("node {node}: {}", e.message()));
                node = node % nodes + 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(_) => {
                seen.reconnects
                    .push(format!("node {node}: watch call timed out"));
                node = node % nodes + 1;
                continue;
            }
        };
        loop {
            let msg = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
            match msg {
                Ok(Ok(Some(resp))) => {
                    if resp.compact_revision > 0 {
                        seen.compact_revision = Some(resp.compact_revision);
                        return seen;
                    }
                    if resp.canceled {
                        seen.reconnects
                            .push(format!("node {node}: canceled: {}", resp.cancel_reason));
                        break;
                    }
                    for e in resp.events {
                        let kv = e.kv.unwrap_or_default();
                        let kind = if e.r#type == EventType::Delete as i32 {
                            "delete"
                        } else {
                            "put"
                        };
                        next = kv.mod_revision + 1;
                        seen.events.push(Seen {
                            revision: kv.mod_revision,
                            key: String::from_utf8_lossy(&kv.key).into_owned(),
                            kind: kind.into(),
                            value: String::from_utf8_lossy(&kv.value).into_owned(),
                            prev_value: e
                                .prev_kv
                                .map(|p| String::from_utf8_lossy(&p.value).into_owned()),
                        });
                    }
                    if done(next, &until) {
                        return seen;
                    }
                }
                // Quiet for a while: fine, keep waiting (faults may have stopped writes).
                Err(_) => {
                    if Instant::now() > give_up || done(next, &until) {
                        return seen;
                    }
                }
                Ok(Ok(None)) => {
                    seen.reconnects.push(format!("node {node}: stream ended"));
                    break;
                }
                Ok(Err(e)) => {
                    seen.reconnects
                        .push(format!("node {node}: {}", e.message()));
                    break;
                }
            }
        }
        node = node % nodes + 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(tx);
    }
}
