//! `flotilla bench`: a load generator for any etcd v3 endpoint (Flotilla's or etcd's).
//!
//! Clients share a pool of gRPC connections; each runs requests back to back (closed loop)
//! or on a fixed schedule (`--rate`, open loop: latency counts from the scheduled time, so a
//! stalled server is not hidden by clients that stopped sending). Latencies go into HDR
//! histograms; errors are counted by kind, and a run with errors exits non-zero.

pub mod api;
mod grpc;
mod load;
mod report;
mod watch;

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use flotilla_proto::etcdserverpb::kv_client::KvClient;
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use flotilla_proto::etcdserverpb::{StatusRequest, StatusResponse};
use tonic::transport::{Channel, Endpoint};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub kind: Kind,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Comma-separated endpoints (host:port or http://host:port).
    #[arg(long, global = true, default_value = "127.0.0.1:2379")]
    pub endpoints: String,
    /// gRPC connections shared by the clients.
    #[arg(long, global = true, default_value_t = 1)]
    pub conns: usize,
    /// Concurrent clients.
    #[arg(long, global = true, default_value_t = 1)]
    pub clients: usize,
    /// Requests to send in all (ignored with --duration).
    #[arg(long, global = true, default_value_t = 10_000)]
    pub total: u64,
    /// Run for this long instead of a fixed total (e.g. 10s, 500ms, 2m).
    #[arg(long, global = true, value_parser = crate::parse_duration)]
    pub duration: Option<Duration>,
    /// Key size in bytes.
    #[arg(long, global = true, default_value_t = 8)]
    pub key_size: usize,
    /// Value size in bytes.
    #[arg(long, global = true, default_value_t = 256)]
    pub val_size: usize,
    /// Distinct keys written or read.
    #[arg(long, global = true, default_value_t = 1)]
    pub key_space_size: u64,
    /// Keys in order instead of at random from the key space.
    #[arg(long, global = true)]
    pub sequential_keys: bool,
    /// Send every request to the leader.
    #[arg(long, global = true)]
    pub target_leader: bool,
    /// Requests per second in all, open loop (0: as fast as the clients go).
    #[arg(long, global = true, default_value_t = 0)]
    pub rate: u64,
    /// Print the result as one JSON object.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Kind {
    /// Put keys.
    Put,
    /// Read keys (one key, or the whole key space with --prefix).
    Range {
        /// l (linearizable) or s (serializable).
        #[arg(long, default_value = "l")]
        consistency: String,
        /// The key to read (default: the first benchmark key).
        #[arg(long)]
        key: Option<String>,
    },
    /// Puts inside Txns.
    TxnPut {
        /// Puts per Txn.
        #[arg(long, default_value_t = 1)]
        txn_ops: usize,
    },
    /// A mix of linearizable ranges and Txn puts.
    TxnMixed {
        /// Reads per write.
        #[arg(long, default_value_t = 1.0)]
        rw_ratio: f64,
    },
    /// Watch delivery latency: writes to watched keys, measured from put to receipt.
    Watch {
        /// Watchers in all.
        #[arg(long, default_value_t = 100)]
        watchers: usize,
        /// Watch streams the watchers are spread over.
        #[arg(long, default_value_t = 10)]
        streams: usize,
        /// Puts per second while watching, in all, by `--clients` writers (open loop).
        #[arg(long, default_value_t = 100)]
        put_rate: u64,
    },
    /// Watch creation followed by a range, as an informer does.
    WatchGet {
        /// Watchers in all.
        #[arg(long, default_value_t = 100)]
        watchers: usize,
    },
    /// Lease keep-alives over one stream per client.
    LeaseKeepalive,
}

/// The endpoint of each of the `--conns` connections: the endpoints in turn, or the leader
/// alone with `--target-leader`. The first `endpoints` entries are distinct.
async fn conn_urls(common: &Common) -> anyhow::Result<(Vec<String>, usize)> {
    let mut endpoints: Vec<String> = common
        .endpoints
        .split(',')
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
        .map(|e| {
            if e.contains("://") {
                e.to_string()
            } else {
                format!("http://{e}")
            }
        })
        .collect();
    if endpoints.is_empty() {
        bail!("--endpoints is empty");
    }
    if common.target_leader {
        endpoints = vec![find_leader(&endpoints).await?];
    }
    let urls = (0..common.conns.max(1))
        .map(|i| endpoints[i % endpoints.len()].clone())
        .collect();
    Ok((urls, endpoints.len()))
}

/// Connects to each endpoint (failing clearly if one cannot be reached) and returns
/// `conns` channels spread over them.
pub async fn connect(common: &Common) -> anyhow::Result<Vec<Channel>> {
    let (urls, distinct) = conn_urls(common).await?;
    let mut channels = Vec::new();
    for url in &urls {
        let channel = Endpoint::from_shared(url.clone())
            .with_context(|| format!("bad endpoint {url}"))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        channels.push(channel);
    }
    // One request per endpoint up front, so a server that answers with errors fails the run
    // before any number is printed.
    for (ch, url) in channels.iter().zip(&urls).take(distinct) {
        MaintenanceClient::new(ch.clone())
            .status(StatusRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("{url} refused a status request: {}", s.message()))?;
    }
    Ok(channels)
}

/// [`connect`] for the unary request loops: `conns` plain HTTP/2 connections.
pub async fn connect_unary(common: &Common) -> anyhow::Result<Vec<grpc::Conn>> {
    let (urls, distinct) = conn_urls(common).await?;
    let mut conns = Vec::new();
    for url in &urls {
        conns.push(grpc::Conn::connect(url).await?);
    }
    for (conn, url) in conns.iter().zip(&urls).take(distinct) {
        conn.unary::<_, StatusResponse>("/etcdserverpb.Maintenance/Status", &StatusRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("{url} refused a status request: {}", s.message()))?;
    }
    Ok(conns)
}

async fn find_leader(endpoints: &[String]) -> anyhow::Result<String> {
    for url in endpoints {
        let Ok(ch) = Endpoint::from_shared(url.clone())?
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await
        else {
            continue;
        };
        if let Ok(s) = MaintenanceClient::new(ch).status(StatusRequest {}).await {
            let s = s.into_inner();
            if s.header.map(|h| h.member_id) == Some(s.leader) && s.leader != 0 {
                return Ok(url.clone());
            }
        }
    }
    bail!("no endpoint in {endpoints:?} reports itself as the leader")
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let result = match &args.kind {
        Kind::Watch {
            watchers,
            streams,
            put_rate,
        } => {
            let channels = connect(&args.common).await?;
            watch::run_watch(&args.common, &channels, *watchers, *streams, *put_rate).await?
        }
        Kind::WatchGet { watchers } => {
            let channels = connect(&args.common).await?;
            watch::run_watch_get(&args.common, &channels, *watchers).await?
        }
        Kind::LeaseKeepalive => {
            let channels = connect(&args.common).await?;
            load::run(&args.common, &args.kind, load::Conns::Channels(&channels)).await?
        }
        kind => {
            let conns = connect_unary(&args.common).await?;
            load::run(&args.common, kind, load::Conns::Unary(&conns)).await?
        }
    };
    let name = format!("{:?}", args.kind)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_end_matches('{')
        .to_string();
    result.print(&name, args.common.json);
    if result.errors.values().sum::<u64>() > 0 {
        bail!("{} requests failed", result.errors.values().sum::<u64>());
    }
    Ok(())
}

pub(crate) fn kv(channel: &Channel) -> KvClient<Channel> {
    KvClient::new(channel.clone()).max_decoding_message_size(64 << 20)
}
