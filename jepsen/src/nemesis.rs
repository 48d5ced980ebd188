//! Faults and their schedule: partitions (iptables), kill -9 and restart, pause
//! (SIGSTOP/SIGCONT), leader kill. Every fault window is recorded in the history.

use std::time::Duration;

use anyhow::bail;
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use flotilla_proto::etcdserverpb::StatusRequest;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::db::Cluster;
use crate::net::Net;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One random node cut off from the rest.
    PartitionOne,
    /// The nodes cut into two random halves.
    PartitionHalves,
    /// The current leader cut off from the rest.
    PartitionLeader,
    /// Each node sees only its two ring neighbours: every node has a majority, no two agree.
    PartitionRing,
    /// Two halves joined through one bridge node.
    PartitionBridge,
    /// kill -9 of random nodes, restarted when the fault ends.
    Kill,
    /// kill -9 of the leader.
    LeaderKill,
    /// SIGSTOP of random nodes, SIGCONT when the fault ends.
    Pause,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::PartitionOne => "partition-one",
            Kind::PartitionHalves => "partition-halves",
            Kind::PartitionLeader => "partition-leader",
            Kind::PartitionRing => "partition-ring",
            Kind::PartitionBridge => "partition-bridge",
            Kind::Kill => "kill",
            Kind::LeaderKill => "leader-kill",
            Kind::Pause => "pause",
        }
    }

    /// Parses `--nemesis a,b,c`; `partition` stands for every partition kind, `none` for none.
    pub fn parse_list(s: &str) -> anyhow::Result<Vec<Kind>> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "none" => {}
                "partition" => out.extend([
                    Kind::PartitionOne,
                    Kind::PartitionHalves,
                    Kind::PartitionLeader,
                    Kind::PartitionRing,
                    Kind::PartitionBridge,
                ]),
                "partition-one" => out.push(Kind::PartitionOne),
                "partition-halves" => out.push(Kind::PartitionHalves),
                "partition-leader" => out.push(Kind::PartitionLeader),
                "partition-ring" => out.push(Kind::PartitionRing),
                "partition-bridge" => out.push(Kind::PartitionBridge),
                "kill" => out.push(Kind::Kill),
                "leader-kill" => out.push(Kind::LeaderKill),
                "pause" => out.push(Kind::Pause),
                other => bail!(
                    "unknown nemesis {other:?}: use partition, partition-one, partition-halves, partition-leader, \
                     partition-ring, partition-bridge, kill, leader-kill, pause or none"
                ),
            }
        }
        Ok(out)
    }
}

/// A fault as applied: which kind, and which nodes it hit.
#[derive(Debug, Clone)]
pub struct Applied {
    pub kind: Kind,
    pub targets: Vec<usize>,
}

/// The node the cluster reports as leader, if any answers.
pub async fn leader(nodes: usize) -> Option<usize> {
    for i in 1..=nodes {
        let Ok(ep) = tonic::transport::Endpoint::from_shared(Cluster::endpoint(i)) else {
            continue;
        };
        let ep = ep
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(1));
        let Ok(ch) = ep.connect().await else { continue };
        let Ok(s) = MaintenanceClient::new(ch).status(StatusRequest {}).await else {
            continue;
        };
        let s = s.into_inner();
        if s.leader == 0 {
            continue;
        }
        // Find which node has the leader's member id.
        for j in 1..=nodes {
            let Ok(ep) = tonic::transport::Endpoint::from_shared(Cluster::endpoint(j)) else {
                continue;
            };
            let ep = ep
                .connect_timeout(Duration::from_millis(500))
                .timeout(Duration::from_secs(1));
            let Ok(ch) = ep.connect().await else { continue };
            if let Ok(t) = MaintenanceClient::new(ch).status(StatusRequest {}).await {
                if t.into_inner().header.map(|h| h.member_id) == Some(s.leader) {
                    return Some(j);
                }
            }
        }
    }
    None
}

fn random_nodes(rng: &mut StdRng, nodes: usize, at_most: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (1..=nodes).collect();
    all.shuffle(rng);
    let n = rng.gen_range(1..=at_most.max(1));
    all.truncate(n);
    all.sort();
    all
}

/// Applies one fault of `kind`.
pub async fn start(
    kind: Kind,
    net: &Net,
    cluster: &mut Cluster,
    rng: &mut StdRng,
) -> anyhow::Result<Applied> {
    let n = net.nodes();
    let minority = (n - 1) / 2;
    let targets = match kind {
        Kind::PartitionOne => {
            let one = rng.gen_range(1..=n);
            net.cut(|i, j| i != one && j != one)?;
            vec![one]
        }
        Kind::PartitionHalves => {
            let side = random_nodes(rng, n, n / 2);
            net.cut(|i, j| side.contains(&i) == side.contains(&j))?;
            side
        }
        Kind::PartitionLeader => {
            let l = leader(n).await.unwrap_or_else(|| rng.gen_range(1..=n));
            net.cut(|i, j| i != l && j != l)?;
            vec![l]
        }
        Kind::PartitionRing => {
            let mut order: Vec<usize> = (1..=n).collect();
            order.shuffle(rng);
            let pos = |x: usize| {
                order
                    .iter()
                    .position(|&y| y == x)
                    .expect("every node is in the ring")
            };
            net.cut(|i, j| {
                let d = (pos(i) as i64 - pos(j) as i64).rem_euclid(n as i64);
                d <= 1 || d >= n as i64 - 1
            })?;
            order
        }
        Kind::PartitionBridge => {
            let mut order: Vec<usize> = (1..=n).collect();
            order.shuffle(rng);
            let bridge = order[n / 2];
            let left: Vec<usize> = order[..n / 2].to_vec();
            net.cut(|i, j| i == bridge || j == bridge || left.contains(&i) == left.contains(&j))?;
            vec![bridge]
        }
        Kind::Kill => {
            let victims = random_nodes(rng, n, minority.max(1));
            for &v in &victims {
                cluster.kill(v);
            }
            victims
        }
        Kind::LeaderKill => {
            let l = leader(n).await.unwrap_or_else(|| rng.gen_range(1..=n));
            cluster.kill(l);
            vec![l]
        }
        Kind::Pause => {
            let victims = random_nodes(rng, n, minority.max(1));
            for &v in &victims {
                cluster.pause(v);
            }
            victims
        }
    };
    Ok(Applied { kind, targets })
}

/// Ends every fault: heals the network, resumes and restarts members.
pub fn stop(net: &Net, cluster: &mut Cluster) -> anyhow::Result<()> {
    net.heal()?;
    cluster.recover(net)
}
