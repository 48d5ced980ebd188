//! `flotilla-jepsen`: chaos tests of the store in network namespaces, and re-checks of
//! stored histories. Needs root (namespaces, veth, iptables).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use flotilla_jepsen::db::Db;
use flotilla_jepsen::nemesis::Kind;
use flotilla_jepsen::report::Verdict;
use flotilla_jepsen::runner::{self, TestOptions};
use flotilla_jepsen::workload::Workload;

#[derive(Parser)]
#[command(
    name = "flotilla-jepsen",
    version,
    about = "Chaos and partition tests for Flotilla's store (and etcd)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one test and check it; exits 0 only when the history is valid.
    Test {
        /// register, append, watch or lease.
        #[arg(long, default_value = "register")]
        workload: Workload,
        /// Faults, comma-separated: partition (all kinds), partition-one, partition-halves,
        /// partition-leader, partition-ring, partition-bridge, kill, leader-kill, pause, member, none.
        #[arg(long, default_value = "partition,kill")]
        nemesis: String,
        /// Nodes (3 or 5 usually).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Seconds of workload.
        #[arg(long, default_value_t = 60)]
        time_limit: u64,
        /// Client processes.
        #[arg(long, default_value_t = 10)]
        concurrency: usize,
        /// Operations per second over all processes (0: unthrottled).
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Seed for the workload and the nemesis schedule.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where results go: <out>/<workload>/<timestamp>/.
        #[arg(long, default_value = "jepsen-results")]
        out: PathBuf,
        /// flotilla or etcd.
        #[arg(long, default_value = "flotilla")]
        db: Db,
        /// The database binary (default: flotilla next to this binary, or etcd on PATH).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Seconds between faults.
        #[arg(long, default_value_t = 5)]
        nemesis_interval: u64,
        /// Seconds each fault lasts.
        #[arg(long, default_value_t = 8)]
        nemesis_duration: u64,
        /// Faults applied at once (e.g. 2: a partition together with kills or pauses).
        #[arg(long, default_value_t = 1)]
        combine: usize,
        /// Extra flags for every member, e.g. --member-arg=--experimental-unsafe-stale-reads.
        #[arg(long = "member-arg", allow_hyphen_values = true)]
        member_args: Vec<String>,
        /// Which namespaces and subnet to use (0-9): runs with different ids can go on at once.
        #[arg(long, default_value_t = 0)]
        net_id: usize,
    },
    /// Check a stored run again and rewrite its results.json.
    Check {
        /// The run's directory (holding history.jsonl and run.json).
        dir: PathBuf,
    },
}

fn default_binary(db: Db) -> PathBuf {
    match db {
        Db::Flotilla => std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("flotilla")))
            .unwrap_or_else(|| PathBuf::from("flotilla")),
        Db::Etcd => PathBuf::from("/usr/bin/etcd"),
    }
}

fn exit_for(verdict: Verdict) -> std::process::ExitCode {
    match verdict {
        Verdict::Valid => {
            println!("valid");
            std::process::ExitCode::SUCCESS
        }
        Verdict::Invalid => {
            println!("INVALID");
            std::process::ExitCode::from(1)
        }
        Verdict::Unknown => {
            println!("unknown");
            std::process::ExitCode::from(2)
        }
    }
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { dir } => Ok(exit_for(flotilla_jepsen::report::check_dir(&dir)?)),
        Command::Test {
            workload,
            nemesis,
            nodes,
            time_limit,
            concurrency,
            rate,
            seed,
            out,
            db,
            binary,
            nemesis_interval,
            nemesis_duration,
            member_args,
            net_id,
            combine,
        } => {
            flotilla_jepsen::net::set_net_id(net_id)?;
            let opts = TestOptions {
                workload,
                nemesis: Kind::parse_list(&nemesis)?,
                nodes,
                time_limit: Duration::from_secs(time_limit),
                concurrency: concurrency.max(1),
                rate,
                seed,
                out,
                db,
                binary: binary.unwrap_or_else(|| default_binary(db)),
                member_args,
                nemesis_interval: Duration::from_secs(nemesis_interval),
                nemesis_duration: Duration::from_secs(nemesis_duration),
                combine,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let result = runtime.block_on(async {
                tokio::select! {
                    r = runner::run(opts) => r,
                    _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; the network and members were torn down")),
                }
            });
            // Dropping the run tears the namespaces down; make sure nothing is left either way.
            flotilla_jepsen::net::Net::remove_leftovers();
            let result = result?;
            println!("results in {}", result.dir.display());
            Ok(exit_for(result.verdict))
        }
    }
}
