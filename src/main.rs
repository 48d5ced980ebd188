//! `flotilla`: one binary, a subcommand per part of the control plane.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

mod bench;
mod cluster;
mod snapshot;

/// mimalloc for Rust allocations: the store and apiserver allocate per request and per
/// event on many threads, where glibc's allocator cost ~9% of a put-heavy profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "flotilla",
    version,
    about = "A Kubernetes-style control plane on a Raft key-value store of its own"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one member of the key-value store (etcd v3 API, etcd's flags).
    Store(StoreArgs),
    /// Drive load against any etcd v3 endpoint and report throughput and latency.
    Bench(bench::BenchArgs),
    /// Drive load against a Kubernetes API server (create, get, list, watch pods).
    BenchApi(bench::api::ApiBenchArgs),
    /// Run a Kubernetes API server over a store (kube-apiserver's flags).
    Apiserver(cluster::ApiserverArgs),
    /// Run a single-machine cluster (store + apiserver) and write an admin kubeconfig.
    Up(cluster::UpArgs),
}

pub(crate) fn urls(s: &str) -> Vec<String> {
    s.split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect()
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Back up a member, inspect a backup, restore one into a new member's data dir.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct StoreArgs {
    #[command(subcommand)]
    command: Option<StoreCommand>,
    /// Human-readable name for this member.
    #[arg(long, default_value = "default")]
    name: String,
    /// Path to the data directory (default: ${name}.flotilla).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// URLs to listen on for client traffic.
    #[arg(long, default_value = "http://localhost:2379")]
    listen_client_urls: String,
    /// This member's client URLs to advertise to the rest of the cluster.
    #[arg(long, default_value = "http://localhost:2379")]
    advertise_client_urls: String,
    /// URLs to listen on for peer traffic.
    #[arg(long, default_value = "http://localhost:2380")]
    listen_peer_urls: String,
    /// This member's peer URLs to advertise to the rest of the cluster.
    #[arg(long, default_value = "http://localhost:2380")]
    initial_advertise_peer_urls: String,
    /// Initial cluster configuration for bootstrapping: name=peer-url,...
    #[arg(long)]
    initial_cluster: Option<String>,
    /// Initial cluster state ('new' or 'existing').
    #[arg(long, default_value = "new")]
    initial_cluster_state: String,
    /// Initial cluster token for the cluster during bootstrap.
    #[arg(long, default_value = "etcd-cluster")]
    initial_cluster_token: String,
    /// Maximum client request size in bytes the server will accept.
    #[arg(long, default_value_t = 1536 * 1024)]
    max_request_bytes: usize,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long, default_value_t = 128)]
    max_txn_ops: usize,
    /// Number of committed transactions to trigger a snapshot to disk.
    #[arg(long, default_value_t = 100_000)]
    snapshot_count: u64,
    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, default_value_t = 100)]
    heartbeat_interval: u64,
    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, default_value_t = 1000)]
    election_timeout: u64,
    /// Interval between progress notifications on watches that asked for them (e.g. 10m, 5s).
    #[arg(long = "experimental-watch-progress-notify-interval", default_value = "10m", value_parser = parse_duration)]
    watch_progress_notify_interval: Duration,
    /// Checkpoint leases' remaining TTLs through Raft, so a leader change does not renew
    /// them (on by default; etcd's default is off).
    #[arg(long = "experimental-enable-lease-checkpoint", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    enable_lease_checkpoint: bool,
    /// How often the leader checkpoints leases' remaining TTLs (e.g. 5s, 5m).
    #[arg(long = "experimental-lease-checkpoint-interval", default_value = "1s", value_parser = parse_duration)]
    lease_checkpoint_interval: Duration,
    /// How often the leader compares every member's HashKV and raises the CORRUPT alarm
    /// for a member that differs (0s: never).
    #[arg(long = "experimental-corrupt-check-time", default_value = "5m", value_parser = parse_duration)]
    corrupt_check_time: Duration,
    /// Path to the client server TLS certificate (for https:// client URLs).
    #[arg(long)]
    cert_file: Option<PathBuf>,
    /// Path to the client server TLS key.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Path to the client server TLS trusted CA certificate.
    #[arg(long)]
    trusted_ca_file: Option<PathBuf>,
    /// Enable client cert authentication (clients must present a certificate signed by
    /// --trusted-ca-file).
    #[arg(long)]
    client_cert_auth: bool,
    /// Path to the peer server TLS certificate (for https:// peer URLs); also presented to
    /// the other members when dialling them.
    #[arg(long)]
    peer_cert_file: Option<PathBuf>,
    /// Path to the peer server TLS key.
    #[arg(long)]
    peer_key_file: Option<PathBuf>,
    /// Path to the peer TLS trusted CA certificate (verifies the other members).
    #[arg(long)]
    peer_trusted_ca_file: Option<PathBuf>,
    /// Enable peer client cert authentication (members must present a certificate signed by
    /// --peer-trusted-ca-file).
    #[arg(long)]
    peer_client_cert_auth: bool,
    /// Raise the NOSPACE alarm when the data grows past this many bytes (0: 2 GiB; negative:
    /// no quota).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    quota_backend_bytes: i64,
    /// Seconds a token from Authenticate stays valid (auth changes void older tokens sooner).
    #[arg(long, default_value_t = flotilla_store::auth::DEFAULT_TOKEN_TTL_SECS)]
    auth_token_ttl: u64,
    /// Work factor of the bcrypt hashes stored for passwords (4 to 31).
    #[arg(long, default_value_t = flotilla_store::auth::DEFAULT_BCRYPT_COST)]
    bcrypt_cost: u32,
    /// Test-only fault injection: serve linearizable reads without a read index.
    #[arg(long, hide = true)]
    experimental_unsafe_stale_reads: bool,
    /// Log level: debug, info, warn, error.
    #[arg(long, default_value = "info")]
    log_level: String,
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 5s or 10m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?} is not a duration like 500ms, 5s or 10m")),
    }
}

fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},openraft=warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

pub(crate) async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Keeps the process off transparent huge pages unless `MIMALLOC_ALLOW_THP` says otherwise.
///
/// mimalloc asks the kernel for huge pages on its regions (`madvise`), and the kernel then
/// zeroes a whole 2 MiB page at each first touch as the allocator's memory grows and is
/// returned: 5-9% of a young member's CPU under 256-client puts. With them, three members
/// spent 4-7% more CPU per put, their put p99 was a third higher and each started 30 MiB
/// larger (seven paired runs, 100k puts each). The flag is the process's and is inherited
/// by its children; it takes effect for memory touched from here on, nearly all of it.
fn keep_off_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!("flotilla: could not keep off transparent huge pages: {e}");
    }
}

fn main() -> anyhow::Result<()> {
    keep_off_huge_pages();
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    // Without the LIFO slot a woken task queues behind those already woken. When an applied
    // entry answers hundreds of clients at once, their handlers mostly run before the HTTP/2
    // connection task, which then writes their responses together instead of one each
    // (leader writev per put at 256 clients: 1.02 -> 0.16; put 17.7k -> 18.5k/s). The cfg
    // comes from .cargo/config.toml; RUSTFLAGS in the environment replaces it, and the
    // member logs which it got.
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    // Every runtime thread, the blocking pool's included (the state machine applies there),
    // may reach RocksDB.
    builder.on_thread_start(flotilla_store::on_thread_start);
    let runtime = builder.build()?;
    match cli.command {
        Command::Store(StoreArgs {
            command: Some(StoreCommand::Snapshot(cmd)),
            ..
        }) => runtime.block_on(snapshot::run(cmd)),
        Command::Store(a) => {
            init_tracing(&a.log_level);
            tracing::info!(
                lifo_slot = !cfg!(tokio_unstable),
                "tokio runtime (built {} --cfg tokio_unstable)",
                if cfg!(tokio_unstable) {
                    "with"
                } else {
                    "without"
                }
            );
            let initial_cluster = a
                .initial_cluster
                .unwrap_or_else(|| format!("{}={}", a.name, a.initial_advertise_peer_urls));
            let config = flotilla_store::Config {
                data_dir: a
                    .data_dir
                    .unwrap_or_else(|| PathBuf::from(format!("{}.flotilla", a.name))),
                name: a.name,
                listen_client_urls: urls(&a.listen_client_urls),
                advertise_client_urls: urls(&a.advertise_client_urls),
                listen_peer_urls: urls(&a.listen_peer_urls),
                initial_advertise_peer_urls: urls(&a.initial_advertise_peer_urls),
                initial_cluster,
                initial_cluster_state: a.initial_cluster_state,
                initial_cluster_token: a.initial_cluster_token,
                max_request_bytes: a.max_request_bytes,
                max_txn_ops: a.max_txn_ops,
                snapshot_count: a.snapshot_count,
                heartbeat_interval_ms: a.heartbeat_interval,
                election_timeout_ms: a.election_timeout,
                progress_notify_interval: a.watch_progress_notify_interval,
                quota_backend_bytes: a.quota_backend_bytes,
                auth_token_ttl: Duration::from_secs(a.auth_token_ttl),
                bcrypt_cost: a.bcrypt_cost,
                client_tls: match (a.cert_file, a.key_file) {
                    (Some(cert_file), Some(key_file)) => {
                        Some(flotilla_store::server::tls::TlsFiles {
                            cert_file,
                            key_file,
                            trusted_ca_file: a.trusted_ca_file,
                            client_cert_auth: a.client_cert_auth,
                        })
                    }
                    (None, None) => None,
                    _ => anyhow::bail!("--cert-file and --key-file go together"),
                },
                peer_tls: match (a.peer_cert_file, a.peer_key_file) {
                    (Some(cert_file), Some(key_file)) => {
                        Some(flotilla_store::server::tls::TlsFiles {
                            cert_file,
                            key_file,
                            trusted_ca_file: a.peer_trusted_ca_file,
                            client_cert_auth: a.peer_client_cert_auth,
                        })
                    }
                    (None, None) => None,
                    _ => anyhow::bail!("--peer-cert-file and --peer-key-file go together"),
                },
                corrupt_check_interval: (!a.corrupt_check_time.is_zero())
                    .then_some(a.corrupt_check_time),
                lease_checkpoint_interval: a
                    .enable_lease_checkpoint
                    .then_some(a.lease_checkpoint_interval),
                unsafe_stale_reads: a.experimental_unsafe_stale_reads,
            };
            runtime.block_on(flotilla_store::run(config, shutdown_signal()))
        }
        // A subscriber that keeps only warnings also keeps the libraries' per-request trace
        // spans cheap: with none set, each one is offered to the `log` crate (about 2.5% of
        // the load generator's CPU at 256 clients).
        Command::Bench(args) => {
            init_tracing("warn");
            runtime.block_on(bench::run(args))
        }
        Command::BenchApi(args) => {
            init_tracing("warn");
            runtime.block_on(bench::api::run(args))
        }
        Command::Apiserver(args) => {
            init_tracing("info");
            runtime.block_on(cluster::apiserver(args, shutdown_signal()))
        }
        Command::Up(args) => {
            init_tracing("warn");
            runtime.block_on(cluster::up(args))
        }
    }
}
