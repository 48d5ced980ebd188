//! The request loops of the key-value benchmarks.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::etcdserverpb::lease_client::LeaseClient;
use flotilla_proto::etcdserverpb::{
    request_op, LeaseGrantRequest, LeaseKeepAliveRequest, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, TxnRequest, TxnResponse,
};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::grpc;
use super::report::Outcome;
use super::{Common, Kind};

const PUT: &str = "/etcdserverpb.KV/Put";
const RANGE: &str = "/etcdserverpb.KV/Range";
const TXN: &str = "/etcdserverpb.KV/Txn";

/// The connections the clients share: tonic channels for the streaming keep-alives, plain
/// HTTP/2 connections for the unary calls (see `grpc`).
pub enum Conns<'a> {
    Channels(&'a [Channel]),
    Unary(&'a [grpc::Conn]),
}

/// One client's connection.
enum Conn {
    Channel(Channel),
    Unary(grpc::Conn),
}

/// Shared pacing: who sends the next request, and when.
pub struct Plan {
    pub total: u64,
    pub deadline: Option<Instant>,
    pub rate: u64,
    pub start: Instant,
    pub issued: AtomicU64,
    pub done: AtomicU64,
}

impl Plan {
    pub fn new(common: &Common) -> Arc<Plan> {
        let start = Instant::now();
        Arc::new(Plan {
            total: if common.duration.is_some() {
                u64::MAX
            } else {
                common.total
            },
            deadline: common.duration.map(|d| start + d),
            rate: common.rate,
            start,
            issued: AtomicU64::new(0),
            done: AtomicU64::new(0),
        })
    }

    /// The next request's number and the time it is due, or None when the run is over.
    pub async fn next(&self) -> Option<(u64, Instant)> {
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        if n >= self.total {
            return None;
        }
        let now = Instant::now();
        let due = if self.rate > 0 {
            self.start + Duration::from_secs_f64(n as f64 / self.rate as f64)
        } else {
            now
        };
        if let Some(deadline) = self.deadline {
            if due >= deadline || now >= deadline {
                return None;
            }
        }
        // Only a request not yet due waits: tokio's timer rounds a deadline up to its next
        // millisecond tick, so sleeping until `now` would hold every request back up to 1 ms.
        if due > now {
            tokio::time::sleep_until(due).await;
        }
        Some((n, due))
    }
}

pub fn key(common: &Common, n: u64) -> Vec<u8> {
    let space = common.key_space_size.max(1);
    let index = if common.sequential_keys {
        n % space
    } else {
        rand::thread_rng().gen_range(0..space)
    };
    key_at(common, index)
}

/// The benchmark key with number `index`, `--key-size` bytes long.
pub fn key_at(common: &Common, index: u64) -> Vec<u8> {
    let mut k = format!("{index:0width$}", width = common.key_size).into_bytes();
    k.truncate(common.key_size.max(1));
    k
}

pub fn value(common: &Common) -> Vec<u8> {
    vec![b'v'; common.val_size]
}

/// Prints progress on a terminal until the run ends.
pub fn progress(plan: Arc<Plan>, mut stop: mpsc::Receiver<()>) {
    if !std::io::stderr().is_terminal() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let done = plan.done.load(Ordering::Relaxed);
                    let secs = plan.start.elapsed().as_secs_f64();
                    let of = if plan.total == u64::MAX { String::new() } else { format!(" / {}", plan.total) };
                    eprint!("\r  {done}{of} requests, {secs:.1} s, {:.0} req/s   ", done as f64 / secs.max(1e-9));
                }
                _ = stop.recv() => { eprintln!(); return; }
            }
        }
    });
}

enum Op {
    Put,
    Range {
        serializable: bool,
        key: Option<Vec<u8>>,
    },
    TxnPut {
        ops: usize,
    },
    TxnMixed {
        read_share: f64,
    },
    KeepAlive,
}

pub async fn run(common: &Common, kind: &Kind, conns: Conns<'_>) -> anyhow::Result<Outcome> {
    let op = match kind {
        Kind::Put => Op::Put,
        Kind::Range { consistency, key } => {
            let serializable = match consistency.as_str() {
                "l" => false,
                "s" => true,
                other => anyhow::bail!("--consistency must be l or s, not {other:?}"),
            };
            Op::Range {
                serializable,
                key: key.as_ref().map(|k| k.as_bytes().to_vec()),
            }
        }
        Kind::TxnPut { txn_ops } => Op::TxnPut {
            ops: (*txn_ops).max(1),
        },
        Kind::TxnMixed { rw_ratio } => Op::TxnMixed {
            read_share: rw_ratio / (1.0 + rw_ratio),
        },
        Kind::LeaseKeepalive => Op::KeepAlive,
        Kind::Watch { .. } | Kind::WatchGet { .. } => {
            unreachable!("watch benchmarks run elsewhere")
        }
    };
    let op = Arc::new(op);
    let plan = Plan::new(common);
    let (stop_tx, stop_rx) = mpsc::channel(1);
    progress(plan.clone(), stop_rx);
    let mut tasks = Vec::new();
    for client in 0..common.clients.max(1) {
        let conn = match conns {
            Conns::Channels(c) => Conn::Channel(c[client % c.len()].clone()),
            Conns::Unary(c) => Conn::Unary(c[client % c.len()].clone()),
        };
        let (common, plan, op) = (common.clone(), plan.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            client_loop(&common, &plan, &op, conn).await
        }));
    }
    let mut outcome = Outcome::new();
    for t in tasks {
        outcome.merge(&t.await??);
    }
    outcome.elapsed = plan.start.elapsed();
    let _ = stop_tx.send(()).await;
    Ok(outcome)
}

async fn client_loop(common: &Common, plan: &Plan, op: &Op, conn: Conn) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new();
    let val = value(common);
    let mut keepalive = None;
    let unary = match (op, conn) {
        (Op::KeepAlive, Conn::Channel(channel)) => {
            let mut leases = LeaseClient::new(channel);
            let id = leases
                .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
                .await?
                .into_inner()
                .id;
            let (tx, rx) = mpsc::channel::<LeaseKeepAliveRequest>(1);
            // Queue one keep-alive before the call: etcd's server sends the response
            // headers only with its first message, which the call waits for.
            tx.send(LeaseKeepAliveRequest { id }).await?;
            let mut responses = leases
                .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            responses.message().await?;
            keepalive = Some((id, tx, responses));
            None
        }
        (Op::KeepAlive, Conn::Unary(_)) => anyhow::bail!("lease keep-alives need a channel"),
        (_, Conn::Unary(conn)) => Some(conn),
        (_, Conn::Channel(_)) => anyhow::bail!("unary calls need a plain connection"),
    };
    while let Some((n, due)) = plan.next().await {
        let result: Result<(), tonic::Status> = match op {
            Op::Put => {
                let conn = unary.as_ref().expect("checked above");
                let req = PutRequest {
                    key: key(common, n),
                    value: val.clone(),
                    ..Default::default()
                };
                conn.unary::<_, PutResponse>(PUT, &req).await.map(drop)
            }
            Op::Range {
                serializable,
                key: fixed,
            } => {
                let conn = unary.as_ref().expect("checked above");
                let req = RangeRequest {
                    key: fixed.clone().unwrap_or_else(|| key(common, n)),
                    serializable: *serializable,
                    ..Default::default()
                };
                conn.unary::<_, RangeResponse>(RANGE, &req).await.map(drop)
            }
            Op::TxnPut { ops } => {
                let conn = unary.as_ref().expect("checked above");
                let success = (0..*ops)
                    .map(|i| RequestOp {
                        request: Some(request_op::Request::RequestPut(PutRequest {
                            key: key(common, n.wrapping_mul(*ops as u64).wrapping_add(i as u64)),
                            value: val.clone(),
                            ..Default::default()
                        })),
                    })
                    .collect();
                let req = TxnRequest {
                    success,
                    ..Default::default()
                };
                conn.unary::<_, TxnResponse>(TXN, &req).await.map(drop)
            }
            Op::TxnMixed { read_share } => {
                let conn = unary.as_ref().expect("checked above");
                if rand::thread_rng().gen_bool(read_share.clamp(0.0, 1.0)) {
                    let req = RangeRequest {
                        key: key(common, n),
                        ..Default::default()
                    };
                    conn.unary::<_, RangeResponse>(RANGE, &req).await.map(drop)
                } else {
                    let put = PutRequest {
                        key: key(common, n),
                        value: val.clone(),
                        ..Default::default()
                    };
                    let req = TxnRequest {
                        success: vec![RequestOp {
                            request: Some(request_op::Request::RequestPut(put)),
                        }],
                        ..Default::default()
                    };
                    conn.unary::<_, TxnResponse>(TXN, &req).await.map(drop)
                }
            }
            Op::KeepAlive => {
                let (id, tx, responses) = keepalive.as_mut().expect("set up above");
                if tx.send(LeaseKeepAliveRequest { id: *id }).await.is_err() {
                    Err(tonic::Status::unavailable("keep-alive stream closed"))
                } else {
                    match responses.message().await {
                        Ok(Some(r)) if r.ttl > 0 => Ok(()),
                        Ok(Some(_)) => Err(tonic::Status::not_found("lease expired")),
                        Ok(None) => Err(tonic::Status::unavailable("keep-alive stream closed")),
                        Err(s) => Err(s),
                    }
                }
            }
        };
        match result {
            Ok(()) => {
                let us = due.elapsed().as_micros().max(1) as u64;
                out.latency_us.saturating_record(us);
            }
            Err(s) => out.record_error(&s),
        }
        plan.done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(out)
}
