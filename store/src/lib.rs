//! Flotilla's store: a Raft-replicated MVCC key-value store that speaks the etcd v3 API.
//!
//! [`run`] starts one member from etcd-style configuration and serves until shut down.

pub mod auth;
pub mod backup;
pub mod corruption;
pub mod error;
pub mod forward;
pub mod lease;
pub mod member;
pub mod mvcc;
pub mod raft;
pub mod server;
pub mod watch_hub;

use openraft::async_runtime::WatchReceiver as _;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use flotilla_proto::flotillapb::{command, Command, MemberAttributes};
use openraft::{ServerState, SnapshotPolicy};
use rocksdb::{ColumnFamilyDescriptor, Options, DB};
use tokio::net::TcpListener;

use member::{Limits, Member};
use raft::log_store::LogStore;
use raft::network::{Network, PeerClients};
use raft::state_machine::StateMachine;
use raft::MemberNode;

/// etcd's default `--quota-backend-bytes`.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;

/// A member's configuration, named after etcd's flags.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub data_dir: PathBuf,
    pub listen_client_urls: Vec<String>,
    pub advertise_client_urls: Vec<String>,
    pub listen_peer_urls: Vec<String>,
    pub initial_advertise_peer_urls: Vec<String>,
    /// `name=url,name=url,...`
    pub initial_cluster: String,
    /// `new` or `existing`.
    pub initial_cluster_state: String,
    pub initial_cluster_token: String,
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    pub snapshot_count: u64,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_ms: u64,
    pub progress_notify_interval: Duration,
    /// How often the leader checkpoints leases' remaining TTLs (None: never, so a new
    /// leader gives every lease its full TTL).
    pub lease_checkpoint_interval: Option<Duration>,
    /// How often the leader compares every member's HashKV (None: never).
    pub corrupt_check_interval: Option<Duration>,
    /// TLS for `https://` client URLs (`--cert-file`, `--key-file`, ...).
    pub client_tls: Option<server::tls::TlsFiles>,
    /// TLS for `https://` peer URLs, served and dialled (`--peer-cert-file`, ...).
    pub peer_tls: Option<server::tls::TlsFiles>,
    /// `--quota-backend-bytes`: 0 for the default (2 GiB, as etcd), negative for none.
    pub quota_backend_bytes: i64,
    /// `--auth-token-ttl`: how long tokens from Authenticate are good for.
    pub auth_token_ttl: Duration,
    /// `--bcrypt-cost`: work factor of password hashes (4 to 31).
    pub bcrypt_cost: u32,
    /// Test-only fault: serve linearizable reads from local state without a read index, so
    /// a partitioned member answers stale reads. The chaos suite uses it to prove that its
    /// checker catches the anomaly. Never set in production.
    pub unsafe_stale_reads: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            name: "default".into(),
            data_dir: PathBuf::from("default.flotilla"),
            listen_client_urls: vec!["http://localhost:2379".into()],
            advertise_client_urls: vec!["http://localhost:2379".into()],
            listen_peer_urls: vec!["http://localhost:2380".into()],
            initial_advertise_peer_urls: vec!["http://localhost:2380".into()],
            initial_cluster: "default=http://localhost:2380".into(),
            initial_cluster_state: "new".into(),
            initial_cluster_token: "etcd-cluster".into(),
            max_request_bytes: 1536 * 1024,
            max_txn_ops: 128,
            snapshot_count: 100_000,
            heartbeat_interval_ms: 100,
            election_timeout_ms: 1000,
            progress_notify_interval: Duration::from_secs(600),
            lease_checkpoint_interval: Some(Duration::from_secs(1)),
            quota_backend_bytes: 0,
            auth_token_ttl: Duration::from_secs(auth::DEFAULT_TOKEN_TTL_SECS),
            bcrypt_cost: auth::DEFAULT_BCRYPT_COST,
            client_tls: None,
            peer_tls: None,
            corrupt_check_interval: Some(Duration::from_secs(300)),
            unsafe_stale_reads: false,
        }
    }
}

/// FNV-1a, for stable member and cluster IDs derived from configuration.
fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Prepares a thread that will read or write the store's RocksDB: turns off RocksDB's
/// per-thread perf counters, which it otherwise bumps on every key comparison (a memtable
/// insert makes dozens). Nothing reads them. Call it when each runtime thread starts
/// (`tokio::runtime::Builder::on_thread_start`); RocksDB's own threads keep their default.
pub fn on_thread_start() {
    rocksdb::perf::set_perf_stats(rocksdb::perf::PerfStatsLevel::Disable);
}

/// A member's ID, from its peer URLs and the cluster token (as etcd derives it).
pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let joined = urls.join(",");
    fnv64(&[joined.as_bytes(), token.as_bytes()])
}

/// Parses `--initial-cluster` into members by name, each with its peer URLs.
pub fn parse_initial_cluster(s: &str) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, url)) = part.split_once('=') else {
            bail!("--initial-cluster: {part:?} is not name=url");
        };
        out.entry(name.to_string())
            .or_default()
            .push(url.to_string());
    }
    if out.is_empty() {
        bail!("--initial-cluster is empty");
    }
    Ok(out)
}

/// RocksDB's block cache (uncompressed blocks), shared by the column families.
const BLOCK_CACHE_BYTES: usize = 256 << 20;

pub(crate) fn open_db(dir: &std::path::Path) -> anyhow::Result<Arc<DB>> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    opts.set_bytes_per_sync(1 << 20);
    // Bound the write-ahead log: memtables whose data sits only in old log files are flushed
    // once the log passes this size, so opening after a crash replays at most this much.
    opts.set_max_total_wal_size(64 << 20);
    // One block cache for every family, big enough that paging through a large prefix (an
    // apiserver listing 100,000 objects in pages of 500) finds its blocks decompressed
    // instead of reading and decompressing the rest of the range for every page's count.
    // It fills only as data is read.
    let cache =
        rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES).context("making the block cache")?;
    let families = Mvcc::column_families()
        .into_iter()
        .chain(LogStore::column_families())
        .map(|name| ColumnFamilyDescriptor::new(name, family_options(name, &cache)))
        .collect::<Vec<_>>();
    let db = DB::open_cf_descriptors(&opts, dir, families)
        .with_context(|| format!("opening {}", dir.display()))?;
    Ok(Arc::new(db))
}

/// Bits per key of the kv family's prefix filters: about 1% false positives.
const KV_FILTER_BITS_PER_KEY: f64 = 10.0;
/// The share of a kv memtable's size its prefix filter takes.
const KV_MEMTABLE_FILTER_RATIO: f64 = 0.02;
/// The kv family's memtables: small ones, flushed four at a time (see `family_options`).
const KV_MEMTABLE_BYTES: usize = 8 << 20;
const KV_MEMTABLES_PER_FLUSH: i32 = 4;

/// A column family's options. The kv family filters on each key's prefix without its
/// revision (`mvcc::keys::kv_key_prefix`): a put reads its key's current version first, and
/// for a key never written the filters answer without a seek through the memtable and the
/// files. Its iterators must then say whether they stay within one key's versions
/// (`Mvcc::get_record`) or walk in total order (everything else, `mvcc::total_order`).
pub(crate) fn family_options(name: &str, cache: &rocksdb::Cache) -> Options {
    let mut cf = Options::default();
    cf.set_write_buffer_size(32 << 20);
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(cache);
    if name == mvcc::CF_KV {
        // Table files record the extractor's name, and RocksDB trusts a file's filter when
        // the name matches: change the name whenever `kv_key_prefix` changes.
        cf.set_prefix_extractor(rocksdb::SliceTransform::create(
            "flotilla.kv.user_key.v1",
            mvcc::keys::kv_key_prefix,
            Some(mvcc::keys::is_kv_key),
        ));
        cf.set_memtable_prefix_bloom_ratio(KV_MEMTABLE_FILTER_RATIO);
        // Every put inserts its key at a random place in the memtable's skiplist, and the
        // insert's cost grows with the list (the search from the previous insert climbs
        // further): it was the largest single cost of a member under 256-client puts. Small
        // memtables keep the lists short; flushing four at once keeps the level-0 files (and
        // so compaction's work) as large as one 32 MiB memtable made them. Writing 256-key
        // sorted batches of random keys, CPU per insert including flushes and compactions:
        // 3.2-3.6 µs with one 32 MiB memtable, 2.4-2.6 µs with these (8 MiB alone: 3.4).
        // Point reads skip the extra memtables on their prefix filters.
        cf.set_write_buffer_size(KV_MEMTABLE_BYTES);
        cf.set_min_write_buffer_number_to_merge(KV_MEMTABLES_PER_FLUSH);
        cf.set_max_write_buffer_number(KV_MEMTABLES_PER_FLUSH + 2);
        table.set_bloom_filter(KV_FILTER_BITS_PER_KEY, false);
        table.set_whole_key_filtering(false);
    }
    cf.set_block_based_table_factory(&table);
    cf
}

use mvcc::Mvcc;

/// Runs one member until `shutdown` completes.
/// A listener on each URL's address, with the URL.
async fn bind_all(urls: &[String], who: &str) -> anyhow::Result<Vec<(String, TcpListener)>> {
    let mut out = Vec::with_capacity(urls.len());
    for url in urls {
        let addr = server::listen_addr(url).map_err(anyhow::Error::msg)?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for {who} on {url}"))?;
        out.push((url.clone(), listener));
    }
    Ok(out)
}

pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let cluster = parse_initial_cluster(&config.initial_cluster)?;
    let token = &config.initial_cluster_token;
    let my_peer_urls = cluster.get(&config.name).cloned().with_context(|| {
        format!(
            "--initial-cluster has no member named {:?} (--name)",
            config.name
        )
    })?;
    let id = member_id(&my_peer_urls, token);
    let nodes: BTreeMap<u64, MemberNode> = cluster
        .iter()
        .map(|(name, urls)| {
            (
                member_id(urls, token),
                MemberNode {
                    name: name.clone(),
                    peer_urls: urls.clone(),
                },
            )
        })
        .collect();
    let ids: Vec<String> = nodes.keys().map(|i| i.to_string()).collect();
    let cluster_id = fnv64(&[ids.join(",").as_bytes(), token.as_bytes()]);

    // Listening starts before the data is opened: a client or peer that connects meanwhile
    // waits in the accept queue instead of being refused and backing off (a gRPC client
    // waits a second before it tries again).
    let peer_listeners = bind_all(&config.listen_peer_urls, "peers").await?;
    let client_listeners = bind_all(&config.listen_client_urls, "clients").await?;

    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let db = open_db(&config.data_dir.join("db"))?;
    let mvcc = Mvcc::open(db.clone())?;
    let leases = Arc::new(lease::LeaseKeeper::default());
    leases.reload(&mvcc);
    let state_machine =
        StateMachine::new(mvcc.clone(), leases.clone(), config.data_dir.join("snap"))?;
    let snapshot_machine = state_machine.clone();
    let log = LogStore::open(db.clone(), &config.data_dir.join("log"), id).with_context(|| {
        format!(
            "opening the Raft log in {}",
            config.data_dir.join("log").display()
        )
    })?;
    let peer_client_tls = match &config.peer_tls {
        Some(files) => Some(server::tls::peer_client_config(files).context("peer TLS")?),
        None => None,
    };
    let peer_acceptor = match &config.peer_tls {
        Some(files) => Some(server::tls::acceptor(files).context("peer TLS")?),
        None => None,
    };
    let peers = Arc::new(PeerClients::new(peer_client_tls));

    let raft_config = openraft::Config {
        cluster_name: config.initial_cluster_token.clone(),
        heartbeat_interval: config.heartbeat_interval_ms,
        election_timeout_min: config.election_timeout_ms,
        election_timeout_max: config.election_timeout_ms * 2,
        // Snapshots are taken by commands applied (`snapshot_loop`), as etcd counts
        // requests: one log entry carries up to 2048 commands.
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: 1_000,
        // Fewer, larger chunks when a follower needs the snapshot (a peer message may be up
        // to 64 MiB).
        snapshot_max_chunk_size: 16 << 20,
        // Per chunk, and for the last one the follower's whole load (seconds at 1M keys).
        install_snapshot_timeout: 30_000,
        max_payload_entries: 1_000,
        ..Default::default()
    }
    .validate()
    .context("raft configuration")?;
    let raft = openraft::Raft::new(
        id,
        Arc::new(raft_config),
        Network {
            peers: peers.clone(),
            state_machine: state_machine.clone(),
        },
        log.clone(),
        state_machine,
    )
    .await
    .context("starting raft")?;

    let fresh = !raft
        .is_initialized()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if fresh {
        match config.initial_cluster_state.as_str() {
            "new" => {
                // Every member of a new cluster proposes the same membership; once one of
                // them has, the others' attempts are refused harmlessly.
                if let Err(e) = raft.initialize(nodes.clone()).await {
                    tracing::debug!(error = %e, "cluster already initialized");
                }
            }
            // Added with `member add` first; the leader reaches this member and sends it the
            // log or a snapshot.
            "existing" => tracing::info!("joining an existing cluster; waiting for the leader"),
            other => bail!("--initial-cluster-state must be new or existing, not {other:?}"),
        }
    }

    let limits = Limits {
        max_request_bytes: config.max_request_bytes,
        max_txn_ops: config.max_txn_ops,
        // etcd's minimum lease TTL: 1.5 election timeouts, rounded up to whole seconds.
        min_lease_ttl: (config.election_timeout_ms * 3 / 2).div_ceil(1000) as i64,
        progress_notify_interval: config.progress_notify_interval,
        quota_bytes: match config.quota_backend_bytes {
            0 => Some(DEFAULT_QUOTA_BYTES),
            q if q < 0 => None,
            q => Some(q as u64),
        },
        unsafe_stale_reads: config.unsafe_stale_reads,
        auth_token_ttl: config.auth_token_ttl,
        bcrypt_cost: config.bcrypt_cost,
    };
    if !(4..=31).contains(&config.bcrypt_cost) {
        bail!(
            "--bcrypt-cost must be between 4 and 31, not {}",
            config.bcrypt_cost
        );
    }
    if config.unsafe_stale_reads {
        tracing::warn!(
            "UNSAFE: linearizable reads are served without a read index (test-only fault)"
        );
    }
    let (read_waiters, read_queue) = tokio::sync::mpsc::channel(member::READ_QUEUE);
    let (proposals, proposal_queue) = tokio::sync::mpsc::channel(member::PROPOSAL_QUEUE);
    let (forwards, forward_queue) = tokio::sync::mpsc::channel(member::PROPOSAL_QUEUE);
    // Subscribed before the revision is read: the hub sees every revision after it.
    let fanout = mvcc.subscribe();
    let watch_hub = watch_hub::WatchHub::new(mvcc.current_revision());
    tokio::spawn(watch_hub.clone().run(fanout));
    let member = Arc::new(Member {
        id,
        cluster_id,
        cluster_token: config.initial_cluster_token.clone(),
        name: config.name.clone(),
        raft: raft.clone(),
        mvcc: mvcc.clone(),
        leases: leases.clone(),
        log,
        peers: peers.clone(),
        limits,
        read_waiters,
        proposals,
        forwards,
        forward_streams: forward::ForwardStreams::new(peers.clone()),
        lease_checkpoint_gate: tokio::sync::Mutex::new(()),
        watch_hub,
    });
    tokio::spawn(member::proposal_loop(
        Arc::downgrade(&member),
        proposal_queue,
    ));
    tokio::spawn(member::forward_loop(Arc::downgrade(&member), forward_queue));
    tokio::spawn(member::read_index_loop(Arc::downgrade(&member), read_queue));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (url, listener) in peer_listeners {
        let tls = if url.starts_with("https://") {
            let Some(acceptor) = peer_acceptor.clone() else {
                bail!("{url}: an https peer URL needs --peer-cert-file, --peer-key-file and --peer-trusted-ca-file");
            };
            Some(acceptor)
        } else {
            None
        };
        let m = member.clone();
        let s = stopped(stop_rx.clone());
        tasks.spawn(async move {
            server::serve_peers(m, listener, tls, s)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    let (published_tx, published_rx) = tokio::sync::watch::channel(false);
    let client_tls = match &config.client_tls {
        Some(files) => Some(server::tls::acceptor(files).context("client TLS")?),
        None => None,
    };
    for (url, listener) in client_listeners {
        let tls = if url.starts_with("https://") {
            let Some(acceptor) = client_tls.clone() else {
                bail!("{url}: an https client URL needs --cert-file and --key-file");
            };
            Some(acceptor)
        } else {
            None
        };
        let m = member.clone();
        let s = stopped(stop_rx.clone());
        let mut ready = published_rx.clone();
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            // As etcd, clients are served once this member's name and client URLs are in
            // the cluster state: `member list` and `endpoint status --cluster` then show
            // every member that answers. Connections wait in the accept queue meanwhile.
            tokio::select! {
                r = ready.wait_for(|p| *p) => if r.is_err() { return Ok(()) },
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
            server::serve_clients(m, listener, tls, s)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    tasks.spawn({
        let m = mvcc.clone();
        let rx = stop_rx.clone();
        async move {
            mvcc::compactor::run(m, rx).await;
            Ok(())
        }
    });
    tasks.spawn(size_loop(member.clone(), stop_rx.clone()));
    tasks.spawn(snapshot_loop(
        member.clone(),
        snapshot_machine,
        config.snapshot_count.max(1),
        stop_rx.clone(),
    ));
    if let Some(interval) = config.corrupt_check_interval {
        tasks.spawn(corruption::check_loop(
            member.clone(),
            interval,
            stop_rx.clone(),
        ));
    }
    tasks.spawn(lease_expiry_loop(
        member.clone(),
        config.lease_checkpoint_interval,
        stop_rx.clone(),
    ));
    tasks.spawn(exit_when_removed(member.clone(), stop_rx.clone()));
    tasks.spawn(auth_key_loop(member.clone(), stop_rx.clone()));
    tasks.spawn(publish_attributes(
        member.clone(),
        config.advertise_client_urls.clone(),
        published_tx,
        stop_rx.clone(),
    ));
    tracing::info!(name = %config.name, id = format_args!("{id:x}"), cluster_id = format_args!("{cluster_id:x}"), "member started");

    let mut failure = None;
    tokio::select! {
        _ = shutdown => {}
        Some(res) = tasks.join_next() => {
            if let Ok(Err(e)) = res {
                tracing::error!(error = %e, "stopping");
                failure = Some(e);
            }
        }
    }
    let _ = stop_tx.send(true);
    let _ = raft.shutdown().await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    tracing::info!("member stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Measures the data's on-disk size twice a second, for the quota check and Status.
async fn size_loop(
    member: Arc<Member>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return Ok(()),
        }
        member.mvcc.refresh_size();
    }
}

/// What [`snapshot_loop`] does on a tick.
#[derive(Debug, PartialEq, Eq)]
enum SnapshotStep {
    /// Ask openraft for a snapshot, for this reason.
    Take(&'static str),
    /// Propose a no-op entry first: a snapshot at the latest one's index would be thrown
    /// away, and in a cluster with no writes no other entry comes.
    ProposeNoop,
    Wait,
}

/// Revisions of the latest snapshot's history that the compaction has removed since it was
/// taken: `held` is (its compaction progress, its revision), `done` the state's progress.
fn stale_history(held: (i64, i64), done: i64) -> u64 {
    done.min(held.1).saturating_sub(held.0).max(0) as u64
}

/// `since_last`: commands applied since the last snapshot was asked for; `stale`: see
/// [`stale_history`]; `at_last_applied`: the latest snapshot is at the last applied index;
/// `may_refresh`, `may_nudge`: no snapshot was asked for, no no-op proposed, lately.
fn snapshot_step(
    snapshot_count: u64,
    since_last: u64,
    stale: u64,
    at_last_applied: bool,
    may_refresh: bool,
    may_nudge: bool,
) -> SnapshotStep {
    let refresh = stale >= snapshot_count && may_refresh;
    if refresh && at_last_applied {
        return if may_nudge {
            SnapshotStep::ProposeNoop
        } else {
            SnapshotStep::Wait
        };
    }
    if since_last >= snapshot_count {
        SnapshotStep::Take("applied commands")
    } else if refresh {
        SnapshotStep::Take("compacted history")
    } else {
        SnapshotStep::Wait
    }
}

#[cfg(test)]
mod snapshot_step_tests {
    use super::*;

    #[test]
    fn a_compacted_history_is_refreshed_once_an_entry_gives_it_an_index() {
        // Commands alone.
        assert_eq!(
            snapshot_step(1000, 1000, 0, false, true, true),
            SnapshotStep::Take("applied commands")
        );
        assert_eq!(
            snapshot_step(1000, 999, 999, false, true, true),
            SnapshotStep::Wait
        );
        // The compaction removed the snapshot's history: a new one, if there is an entry
        // past it; else a no-op entry first, once per 30 s.
        assert_eq!(
            snapshot_step(1000, 3, 1000, false, true, true),
            SnapshotStep::Take("compacted history")
        );
        assert_eq!(
            snapshot_step(1000, 3, 1000, true, true, true),
            SnapshotStep::ProposeNoop
        );
        assert_eq!(
            snapshot_step(1000, 3, 1000, true, true, false),
            SnapshotStep::Wait
        );
        // One asked for lately: wait for it to show up.
        assert_eq!(
            snapshot_step(1000, 3, 1000, false, false, true),
            SnapshotStep::Wait
        );
        assert_eq!(
            snapshot_step(1000, 3, 1000, true, false, true),
            SnapshotStep::Wait
        );
    }

    #[test]
    fn only_compacted_revisions_the_snapshot_holds_count() {
        // A snapshot of revisions up to 1500, compacted below 200.
        assert_eq!(stale_history((200, 1500), 200), 0);
        assert_eq!(stale_history((200, 1500), 1200), 1000);
        // Compacting past the snapshot's revision removes nothing more of it.
        assert_eq!(stale_history((200, 1500), 90_000), 1300);
        // A state whose compaction is behind the snapshot's (a reload): nothing.
        assert_eq!(stale_history((200, 1500), 100), 0);
    }
}

/// Takes a Raft snapshot (and so lets the log be purged) every `snapshot_count` applied
/// commands, on every member, as etcd's `--snapshot-count` does; and after a physical
/// compaction that moved the compaction point `snapshot_count` or more revisions into the
/// history the latest snapshot holds. A snapshot is a checkpoint of the table files, so one
/// taken before a compaction keeps the compacted history on disk, and a member that needs
/// it later is sent all of that history.
async fn snapshot_loop(
    member: Arc<Member>,
    state_machine: StateMachine,
    snapshot_count: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let applied = state_machine.applied_commands.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut compaction = member.mvcc.compaction_progress();
    let data = member.raft.data_metrics();
    let mut last = 0u64;
    // The history the latest snapshot holds: revisions up to `held.1`, compacted below
    // `held.0`. Read from the snapshot's own checkpoint when it shows up in the metrics (and
    // at start); a snapshot installed from the leader's file has none, and is taken to hold
    // what the state held when it showed up.
    let history = |snapshot: Option<raft::LogId>| {
        let sm = state_machine.clone();
        async move {
            let read = tokio::task::spawn_blocking(move || sm.snapshot_history(snapshot))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
            read.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "reading what the latest snapshot holds");
                None
            })
        }
    };
    let mut seen = data.borrow_watched().snapshot;
    let mut held = match history(seen).await {
        Some(held) => held,
        None => (*compaction.borrow(), member.mvcc.current_revision()),
    };
    // A snapshot asked for: no refresh is asked for again until it shows up (or 30 s pass).
    let mut asked: Option<tokio::time::Instant> = None;
    // A no-op entry proposed so that a refresh has an index to be taken at.
    let mut nudged: Option<tokio::time::Instant> = None;
    let mut watching = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = compaction.changed(), if watching => watching = r.is_ok(),
            _ = stop.changed() => return Ok(()),
        }
        let (snapshot, last_applied) = {
            let m = data.borrow_watched();
            (m.snapshot, m.last_applied)
        };
        let done = *compaction.borrow_and_update();
        if snapshot != seen {
            seen = snapshot;
            asked = None;
            held = match history(snapshot).await {
                Some(held) => held,
                None => (done, member.mvcc.current_revision()),
            };
        }
        let now = applied.load(std::sync::atomic::Ordering::Relaxed);
        let waited = |since: Option<tokio::time::Instant>| {
            since.is_none_or(|t| t.elapsed() > Duration::from_secs(30))
        };
        let why = match snapshot_step(
            snapshot_count,
            now.saturating_sub(last),
            stale_history(held, done),
            snapshot >= last_applied,
            waited(asked),
            waited(nudged),
        ) {
            SnapshotStep::Take(why) => why,
            SnapshotStep::ProposeNoop => {
                nudged = Some(tokio::time::Instant::now());
                let m = member.clone();
                tokio::spawn(async move {
                    let noop = Command {
                        auth: None,
                        request: Some(command::Request::LeaseCheckpoint(
                            flotilla_proto::etcdserverpb::LeaseCheckpointRequest {
                                checkpoints: Vec::new(),
                            },
                        )),
                    };
                    if let Err(e) = m.propose(noop).await {
                        tracing::debug!(error = %e, "proposing a no-op for a snapshot refresh");
                    }
                });
                continue;
            }
            SnapshotStep::Wait => continue,
        };
        match member.raft.trigger().snapshot().await {
            Ok(()) => {
                tracing::debug!(reason = why, "snapshot triggered");
                last = now;
                asked = Some(tokio::time::Instant::now());
            }
            Err(e) => tracing::warn!(error = %e, "could not start a snapshot"),
        }
    }
}

/// On the leader, revokes leases whose deadline passed and checkpoints remaining TTLs; on
/// becoming leader, restarts every lease's deadline from its checkpoint.
async fn lease_expiry_loop(
    member: Arc<Member>,
    checkpoint_interval: Option<Duration>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Server metrics change with the role and leader only, not with every entry.
    let mut metrics = member.raft.server_metrics();
    let mut was_leader = false;
    let mut last_checkpoint = tokio::time::Instant::now();
    let checkpointing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = metrics.changed() => {}
            _ = stop.changed() => return Ok(()),
        }
        let leader = metrics.borrow_watched().state == ServerState::Leader;
        if leader && !was_leader {
            // Deadlines start from the latest checkpoints: first apply every entry of the
            // earlier terms (what a linearizable read waits for).
            let m = member.clone();
            tokio::spawn(async move {
                match m
                    .raft
                    .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
                    .await
                {
                    Ok(_) if m.is_leader() => m.leases.promote(),
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "lease promotion"),
                }
            });
        }
        if !leader && was_leader {
            member.leases.demote();
        }
        was_leader = leader;
        // Deadlines count only once promoted: before, they are a follower's stale copies.
        if !leader || !member.leases.is_primary() {
            continue;
        }
        if let Some(interval) = checkpoint_interval {
            // One round at a time; a round that cannot commit waits for the next.
            if last_checkpoint.elapsed() >= interval
                && !checkpointing.swap(true, std::sync::atomic::Ordering::AcqRel)
            {
                last_checkpoint = tokio::time::Instant::now();
                let (m, busy) = (member.clone(), checkpointing.clone());
                tokio::spawn(async move {
                    if let Err(e) = m.lease_checkpoint_tick(interval).await {
                        tracing::debug!(error = %e, "checkpointing leases");
                    }
                    busy.store(false, std::sync::atomic::Ordering::Release);
                });
            }
        }
        for id in member.leases.take_expired() {
            let m = member.clone();
            tokio::spawn(async move {
                let revoke = flotilla_proto::etcdserverpb::LeaseRevokeRequest { id };
                let command = Command {
                    auth: None,
                    request: Some(command::Request::LeaseRevoke(revoke)),
                };
                if let Err(e) = m.propose(command).await {
                    tracing::debug!(lease = id, error = %e, "revoking expired lease");
                }
            });
        }
    }
}

/// On the leader: gives auth a new token key when it is on without one (a cluster restored
/// from a backup, which leaves the key out). Every member then signs and checks with it.
async fn auth_key_loop(
    member: Arc<Member>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use rand::RngCore;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return Ok(()),
        }
        if !member.is_leader() || !member.mvcc.auth().needs_token_key() {
            continue;
        }
        let mut token_key = vec![0u8; 32];
        rand::thread_rng().fill_bytes(&mut token_key);
        let command = Command {
            auth: None,
            request: Some(command::Request::AuthChange(
                flotilla_proto::flotillapb::AuthChange {
                    change: Some(flotilla_proto::flotillapb::auth_change::Change::Enable(
                        flotilla_proto::flotillapb::AuthEnable { token_key },
                    )),
                },
            )),
        };
        match member.propose(command).await {
            Ok(_) => {
                tracing::info!("auth is on without a token key (restored backup): chose a new one")
            }
            Err(e) => tracing::debug!(error = %e, "choosing an auth token key"),
        }
    }
}

/// Stops this member once the cluster has removed it, as etcd does: a removed member has
/// no part in the cluster any more, and serving clients would only mislead them. It knows
/// from its own log, or from a leader that refused its vote request (a leader stops
/// replicating to a member it removes, so the last entry may never arrive).
///
/// Either is only a sign until it has lasted `REMOVAL_SETTLE`: a member that rejoins after a
/// removal replays the old removal from the log on its way to the entry that added it back,
/// and a stale leader may not know of a newer membership. A member in the membership that
/// hears from a leader is not removed, whatever it was told.
async fn exit_when_removed(
    member: Arc<Member>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    const REMOVAL_SETTLE: Duration = Duration::from_secs(15);
    let mut metrics = member.raft.server_metrics();
    let mut was_member = false;
    let mut out_since: Option<tokio::time::Instant> = None;
    loop {
        let is_member = {
            let m = metrics.borrow_watched();
            m.membership_config
                .membership()
                .get_node(&member.id)
                .is_some()
        };
        if is_member {
            was_member = true;
        }
        let told = member
            .peers
            .removed
            .swap(false, std::sync::atomic::Ordering::AcqRel);
        let led = metrics
            .borrow_watched()
            .current_leader
            .is_some_and(|l| l != member.id);
        out_since = if (was_member && !is_member) || told {
            Some(out_since.unwrap_or_else(tokio::time::Instant::now))
        } else if is_member && led {
            None
        } else {
            out_since
        };
        if out_since.is_some_and(|t| t.elapsed() >= REMOVAL_SETTLE) {
            anyhow::bail!("the member has been permanently removed from the cluster");
        }
        tokio::select! {
            r = metrics.changed() => if r.is_err() { return Ok(()) },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// Records this member's name and client URLs in the cluster state, so `member list`
/// shows them (etcd's publish step), and then opens the client listeners. A member that
/// restarts with the attributes it already published opens them at once, so a member
/// restarted without a quorum still answers serializable reads and status.
async fn publish_attributes(
    member: Arc<Member>,
    client_urls: Vec<String>,
    published: tokio::sync::watch::Sender<bool>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let attrs = MemberAttributes {
        id: member.id,
        name: member.name.clone(),
        client_urls,
    };
    let recorded: Option<raft::state_machine::MemberAttributes> = member
        .mvcc
        .meta_get(&mvcc::keys::member_meta_key(member.id))
        .ok()
        .flatten()
        .and_then(|v| mvcc::decode("member", &v).ok());
    if recorded.is_some_and(|r| r.name == attrs.name && r.client_urls == attrs.client_urls) {
        tracing::info!("member attributes already published");
        published.send_replace(true);
        let mut stop = stop;
        let _ = stop.wait_for(|s| *s).await;
        return Ok(());
    }
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let command = Command {
            auth: None,
            request: Some(command::Request::MemberAttributes(attrs.clone())),
        };
        match member.propose(command).await {
            Ok(_) => {
                tracing::info!("published member attributes");
                published.send_replace(true);
                // Keep the task alive so its end does not read as a failure.
                let mut stop = stop;
                let _ = stop.wait_for(|s| *s).await;
                return Ok(());
            }
            Err(e) => {
                tracing::debug!(error = %e, "publishing member attributes; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
