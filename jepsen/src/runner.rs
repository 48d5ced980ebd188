//! One test run: build the network, start the cluster, run the workload's processes and the
//! nemesis until the time limit, heal, take the final reads, then check and report.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::client::Client;
use crate::db::{self, Cluster, Db};
use crate::history::{Nemesis, Op, OpKind, Phase};
use crate::nemesis::{self, Kind};
use crate::net::Net;
use crate::workload::{watch, Outcome, Workload};

#[derive(Debug, Clone)]
pub struct TestOptions {
    pub workload: Workload,
    pub nemesis: Vec<Kind>,
    pub nodes: usize,
    pub time_limit: Duration,
    pub concurrency: usize,
    /// Operations per second over all processes (0: as fast as they go).
    pub rate: f64,
    pub seed: u64,
    pub out: PathBuf,
    pub db: Db,
    pub binary: PathBuf,
    /// Extra flags for every member (e.g. a test-only fault switch).
    pub member_args: Vec<String>,
    /// Seconds between faults, and how long each lasts.
    pub nemesis_interval: Duration,
    pub nemesis_duration: Duration,
    /// Faults applied at once (1: one at a time).
    pub combine: usize,
}

/// The recorded history, shared by the processes and the nemesis.
pub struct Recorder {
    start: Instant,
    ops: Mutex<Vec<Op>>,
    nemesis: Mutex<Vec<Nemesis>>,
}

impl Recorder {
    fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
            nemesis: Mutex::new(Vec::new()),
        })
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    pub(crate) async fn op(
        &self,
        process: u64,
        kind: OpKind,
        f: &str,
        key: Option<String>,
        value: serde_json::Value,
        error: Option<String>,
    ) {
        let mut ops = self.ops.lock().await;
        let index = ops.len() as u64;
        ops.push(Op {
            index,
            process,
            kind,
            f: f.to_string(),
            key,
            value,
            time_ns: self.now_ns(),
            error,
        });
    }

    async fn fault(&self, fault: &str, phase: Phase, targets: Vec<usize>) {
        self.nemesis.lock().await.push(Nemesis {
            time_ns: self.now_ns(),
            fault: fault.to_string(),
            phase,
            targets,
        });
    }
}

/// Where this run's files go: `<out>/<workload>/<timestamp>/`.
fn run_dir(out: &Path, workload: Workload) -> anyhow::Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let dir = out.join(workload.name()).join(stamp.to_string());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// What a run left: its directory and the verdict.
pub struct RunResult {
    pub dir: PathBuf,
    pub verdict: crate::report::Verdict,
}

pub async fn run(opts: TestOptions) -> anyhow::Result<RunResult> {
    let dir = run_dir(&opts.out, opts.workload)?;
    let net = Net::create(opts.nodes)?;
    let mut cluster = Cluster::new(
        opts.db,
        opts.binary.clone(),
        &dir.join("data"),
        opts.nodes,
        opts.member_args.clone(),
    );
    cluster.start_all(&net)?;
    db::wait_ready(opts.nodes, Duration::from_secs(30)).await?;
    tracing::info!(dir = %dir.display(), "cluster up; running {} for {:?}", opts.workload.name(), opts.time_limit);

    let recorder = Recorder::new();
    let deadline = Instant::now() + opts.time_limit;

    // Watchers follow the prefix for the whole run (watch workload only).
    let (final_rev_tx, final_rev_rx) = tokio::sync::watch::channel(None);
    let mut watchers = Vec::new();
    if opts.workload == Workload::Watch {
        for w in 0..opts.nodes.max(2) {
            let rx = final_rev_rx.clone();
            watchers.push(tokio::spawn(watch::follow(
                w,
                opts.nodes,
                1,
                rx,
                deadline + Duration::from_secs(60),
            )));
        }
    }

    let mut processes = Vec::new();
    for p in 0..opts.concurrency {
        let rec = recorder.clone();
        let workload = opts.workload;
        let concurrency = opts.concurrency as u64;
        let nodes = opts.nodes;
        let pause = if opts.rate > 0.0 {
            Duration::from_secs_f64(opts.concurrency as f64 / opts.rate)
        } else {
            Duration::ZERO
        };
        let mut rng = StdRng::seed_from_u64(opts.seed.wrapping_add(p as u64 + 1));
        processes.push(tokio::spawn(async move {
            let mut process = p as u64;
            let mut counter = 0u64;
            let mut client = Client::connect(&Cluster::endpoint(p % nodes + 1))?;
            if workload == Workload::Lease {
                crate::workload::lease::run_process(
                    &rec,
                    process,
                    concurrency,
                    &mut client,
                    &mut rng,
                    deadline,
                )
                .await;
                return anyhow::Ok(());
            }
            while Instant::now() < deadline {
                let inv = workload.generate(&mut rng, process, counter);
                counter += 1;
                rec.op(
                    process,
                    OpKind::Invoke,
                    &inv.f,
                    inv.key.clone(),
                    inv.value.clone(),
                    None,
                )
                .await;
                match workload.invoke(&mut client, &inv).await {
                    Outcome::Ok { value } => {
                        rec.op(process, OpKind::Ok, &inv.f, inv.key.clone(), value, None)
                            .await
                    }
                    Outcome::Fail { value, error } => {
                        rec.op(
                            process,
                            OpKind::Fail,
                            &inv.f,
                            inv.key.clone(),
                            value,
                            Some(error),
                        )
                        .await
                    }
                    Outcome::Info { value, error } => {
                        rec.op(
                            process,
                            OpKind::Info,
                            &inv.f,
                            inv.key.clone(),
                            value,
                            Some(error),
                        )
                        .await;
                        // An operation with an unknown outcome may still take effect at any
                        // time: its process is retired and a new one takes over.
                        process += concurrency;
                    }
                }
                if !pause.is_zero() {
                    tokio::time::sleep(pause.mul_f64(rng.gen_range(0.5..1.5))).await;
                }
            }
            anyhow::Ok(())
        }));
    }

    // The nemesis: quiet, fault, heal, until the deadline.
    let mut rng = StdRng::seed_from_u64(opts.seed);
    if !opts.nemesis.is_empty() {
        loop {
            tokio::time::sleep(opts.nemesis_interval).await;
            if Instant::now() + opts.nemesis_duration >= deadline {
                break;
            }
            // One fault, or several at once: at most one network partition (a new cut
            // replaces the old) plus process faults.
            let mut kinds: Vec<Kind> = Vec::new();
            for _ in 0..opts.combine.max(1) * 4 {
                if kinds.len() >= opts.combine.max(1) {
                    break;
                }
                let k = opts.nemesis[rng.gen_range(0..opts.nemesis.len())];
                let partition = |k: &Kind| k.name().starts_with("partition");
                if kinds.contains(&k) || (partition(&k) && kinds.iter().any(partition)) {
                    continue;
                }
                kinds.push(k);
            }
            let mut applied = Vec::new();
            for kind in kinds {
                let a = nemesis::start(kind, &net, &mut cluster, &mut rng).await?;
                tracing::info!(fault = kind.name(), targets = ?a.targets, "fault");
                recorder
                    .fault(kind.name(), Phase::Start, a.targets.clone())
                    .await;
                applied.push(a);
            }
            tokio::time::sleep(opts.nemesis_duration).await;
            nemesis::stop(&net, &mut cluster).await?;
            for a in applied {
                recorder.fault(a.kind.name(), Phase::Stop, a.targets).await;
            }
            for (node, status) in cluster.crashed() {
                tracing::error!(node, %status, "a member exited by itself");
                recorder.fault("crash", Phase::Start, vec![node]).await;
            }
        }
    }
    for p in processes {
        p.await??;
    }
    nemesis::stop(&net, &mut cluster).await?;
    db::wait_ready(opts.nodes, Duration::from_secs(60)).await?;

    // Final reads after healing: the state every acknowledged write must be in.
    let mut finals = json!(null);
    match opts.workload {
        Workload::Watch => {
            let mut c = Client::connect(&Cluster::endpoint(1))?;
            let (_, rev) = c
                .get_prefix(watch::PREFIX)
                .await
                .map_err(|e| anyhow::anyhow!(e.message().to_string()))?;
            final_rev_tx.send_replace(Some(rev));
            let reference = watch::follow(
                usize::MAX % opts.nodes,
                opts.nodes,
                1,
                final_rev_rx.clone(),
                Instant::now() + Duration::from_secs(60),
            )
            .await;
            let mut observed = Vec::new();
            for w in watchers {
                observed.push(w.await?);
            }
            finals = json!({ "final_revision": rev, "reference": reference, "watchers": observed });
        }
        Workload::Register | Workload::Append | Workload::Lease => {}
    }
    let crashed = cluster.crashed();
    cluster.stop_all();
    drop(net);

    let ops = std::mem::take(&mut *recorder.ops.lock().await);
    let faults = std::mem::take(&mut *recorder.nemesis.lock().await);
    crate::report::write_all(&dir, opts.workload, &ops, &faults, &finals, &crashed)?;
    let verdict = crate::report::check_dir(&dir)?;
    Ok(RunResult { dir, verdict })
}
