//! The database under test: a member of `flotilla store` (or Debian's etcd, for comparison)
//! on every node of the test network, with kill, restart, pause and resume.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::net::Net;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Flotilla,
    Etcd,
}

impl std::str::FromStr for Db {
    type Err = String;
    fn from_str(s: &str) -> Result<Db, String> {
        match s {
            "flotilla" => Ok(Db::Flotilla),
            "etcd" => Ok(Db::Etcd),
            other => Err(format!("--db must be flotilla or etcd, not {other:?}")),
        }
    }
}

pub struct Cluster {
    db: Db,
    binary: PathBuf,
    dir: PathBuf,
    nodes: usize,
    extra_args: Vec<String>,
    members: Vec<Option<Child>>,
    paused: Vec<bool>,
    /// Nodes the membership nemesis removed from the cluster (data wiped, not running).
    removed: Vec<bool>,
    /// For a node re-added to the cluster: the `--initial-cluster` it joins with
    /// (`--initial-cluster-state existing`).
    joins: Vec<Option<String>>,
}

pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;

impl Cluster {
    pub fn new(
        db: Db,
        binary: PathBuf,
        dir: &Path,
        nodes: usize,
        extra_args: Vec<String>,
    ) -> Cluster {
        Cluster {
            db,
            binary,
            dir: dir.to_path_buf(),
            nodes,
            extra_args,
            members: (0..nodes).map(|_| None).collect(),
            paused: vec![false; nodes],
            removed: vec![false; nodes],
            joins: vec![None; nodes],
        }
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }

    pub fn endpoint(i: usize) -> String {
        format!("http://{}:{CLIENT_PORT}", Net::ip(i))
    }

    pub fn peer_url(i: usize) -> String {
        format!("http://{}:{PEER_PORT}", Net::ip(i))
    }

    /// The node whose peer URL this is.
    pub fn node_of_peer_url(&self, url: &str) -> Option<usize> {
        (1..=self.nodes).find(|&i| Cluster::peer_url(i) == url)
    }

    /// Node `i` was removed from the cluster: it is stopped (it exits by itself once it learns
    /// of the removal; killed if it has not within `wait`) and its data is wiped.
    pub async fn removed(&mut self, i: usize, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let exited = match self.members[i - 1].as_mut() {
                Some(c) => !matches!(c.try_wait(), Ok(None)),
                None => true,
            };
            if exited || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.kill(i);
        let _ = std::fs::remove_dir_all(self.dir.join(format!("n{i}")));
        self.removed[i - 1] = true;
    }

    /// Nodes removed and not yet added back.
    pub fn removed_nodes(&self) -> Vec<usize> {
        (1..=self.nodes).filter(|&i| self.removed[i - 1]).collect()
    }

    /// Starts a removed node again as a newcomer (after `member add`), joining with
    /// `initial_cluster`.
    pub fn rejoin(&mut self, net: &Net, i: usize, initial_cluster: String) -> anyhow::Result<()> {
        self.removed[i - 1] = false;
        self.joins[i - 1] = Some(initial_cluster);
        self.start(net, i)
    }

    fn args(&self, i: usize) -> Vec<String> {
        let ip = Net::ip(i);
        let cluster: Vec<String> = (1..=self.nodes)
            .map(|j| format!("n{j}=http://{}:{PEER_PORT}", Net::ip(j)))
            .collect();
        let mut args = vec![];
        if self.db == Db::Flotilla {
            args.push("store".to_string());
        }
        args.extend(
            [
                "--name",
                &format!("n{i}"),
                "--data-dir",
                &self.dir.join(format!("n{i}")).display().to_string(),
                "--listen-client-urls",
                &format!("http://{ip}:{CLIENT_PORT}"),
                "--advertise-client-urls",
                &format!("http://{ip}:{CLIENT_PORT}"),
                "--listen-peer-urls",
                &format!("http://{ip}:{PEER_PORT}"),
                "--initial-advertise-peer-urls",
                &format!("http://{ip}:{PEER_PORT}"),
                "--initial-cluster",
                self.joins[i - 1].as_deref().unwrap_or(&cluster.join(",")),
                "--initial-cluster-token",
                "jepsen",
                "--initial-cluster-state",
                if self.joins[i - 1].is_some() {
                    "existing"
                } else {
                    "new"
                },
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Starts (or restarts) node `i`'s member, logging to `<dir>/n<i>.log`. A node removed
    /// from the cluster stays down until `rejoin`.
    pub fn start(&mut self, net: &Net, i: usize) -> anyhow::Result<()> {
        if self.members[i - 1].is_some() || self.removed[i - 1] {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("n{i}.log")))?;
        let child = net
            .command(i, &self.binary.display().to_string())
            .args(self.args(i))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.members[i - 1] = Some(child);
        self.paused[i - 1] = false;
        Ok(())
    }

    pub fn start_all(&mut self, net: &Net) -> anyhow::Result<()> {
        for i in 1..=self.nodes {
            self.start(net, i)?;
        }
        Ok(())
    }

    /// kill -9.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i - 1].take() {
            if self.paused[i - 1] {
                signal(c.id(), "CONT");
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused[i - 1] = false;
    }

    pub fn pause(&mut self, i: usize) {
        if let Some(c) = &self.members[i - 1] {
            signal(c.id(), "STOP");
            self.paused[i - 1] = true;
        }
    }

    pub fn resume(&mut self, i: usize) {
        if let Some(c) = &self.members[i - 1] {
            signal(c.id(), "CONT");
        }
        self.paused[i - 1] = false;
    }

    /// Whether node `i`'s process exited by itself (it stays recorded until reaped).
    pub fn has_exited(&mut self, i: usize) -> bool {
        match self.members[i - 1].as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.members[i - 1].is_some()
    }

    /// Brings every node back: resumes paused members and starts killed ones.
    pub fn recover(&mut self, net: &Net) -> anyhow::Result<()> {
        for i in 1..=self.nodes {
            if self.paused[i - 1] {
                self.resume(i);
            }
            self.start(net, i)?;
        }
        Ok(())
    }

    /// Any member that exited by itself (a crash) is an error worth reporting.
    pub fn crashed(&mut self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for (idx, m) in self.members.iter_mut().enumerate() {
            if let Some(c) = m {
                if let Ok(Some(status)) = c.try_wait() {
                    out.push((idx + 1, status.to_string()));
                    *m = None;
                }
            }
        }
        out
    }

    pub fn stop_all(&mut self) {
        for i in 1..=self.nodes {
            self.kill(i);
        }
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{i}.log"))
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Waits until every node answers a request, or fails after `timeout`.
pub async fn wait_ready(nodes: usize, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    for i in 1..=nodes {
        let mut client = crate::client::Client::connect(&Cluster::endpoint(i))?;
        while client.ping().await.is_err() {
            if tokio::time::Instant::now() > deadline {
                bail!("node {i} did not come up within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}
