//! Faults and their schedule: partitions (iptables), kill -9 and restart, pause
//! (SIGSTOP/SIGCONT), leader kill. Every fault window is recorded in the history.

use std::time::Duration;

use anyhow::bail;
use flotilla_proto::etcdserverpb::cluster_client::ClusterClient;
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use flotilla_proto::etcdserverpb::{self as pb, StatusRequest};
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
    /// A random node removed from the cluster (member remove; it stops, its data is wiped),
    /// and added back empty when the fault ends (member add, then it joins and catches up).
    Member,
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
            Kind::Member => "member",
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
                "member" => out.push(Kind::Member),
                other => bail!(
                    "unknown nemesis {other:?}: use partition, partition-one, partition-halves, partition-leader, \
                     partition-ring, partition-bridge, kill, leader-kill, pause, member or none"
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
        Kind::Member => {
            // One node out of the cluster at a time.
            let v = rng.gen_range(1..=n);
            if cluster.removed_nodes().is_empty() && remove_member(cluster, v).await {
                cluster.removed(v, MEMBER_TIMEOUT).await;
                vec![v]
            } else {
                Vec::new()
            }
        }
    };
    Ok(Applied { kind, targets })
}

/// How long one membership call may take.
const MEMBER_TIMEOUT: Duration = Duration::from_secs(10);

async fn cluster_client(i: usize) -> Option<ClusterClient<tonic::transport::Channel>> {
    let ep = tonic::transport::Endpoint::from_shared(Cluster::endpoint(i))
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(MEMBER_TIMEOUT);
    Some(ClusterClient::new(ep.connect().await.ok()?))
}

/// Clients of the running nodes other than `except`, in node order, skipping any that
/// cannot be reached.
async fn clients_except(
    cluster: &Cluster,
    except: usize,
) -> Vec<(usize, ClusterClient<tonic::transport::Channel>)> {
    let mut out = Vec::new();
    for j in (1..=cluster.nodes()).filter(|&j| j != except && cluster.is_running(j)) {
        if let Some(c) = cluster_client(j).await {
            out.push((j, c));
        }
    }
    out
}

/// The member list as some running node other than `except` reports it.
async fn member_list(cluster: &Cluster, except: usize) -> Option<Vec<pb::Member>> {
    for (_, mut c) in clients_except(cluster, except).await {
        if let Ok(r) = c
            .member_list(pb::MemberListRequest { linearizable: true })
            .await
        {
            return Some(r.into_inner().members);
        }
    }
    None
}

fn member_of(list: &[pb::Member], v: usize) -> Option<u64> {
    let url = Cluster::peer_url(v);
    list.iter()
        .find(|m| m.peer_ur_ls.contains(&url))
        .map(|m| m.id)
}

/// Removes node `v` through another node; true if it is out of the cluster afterwards.
async fn remove_member(cluster: &mut Cluster, v: usize) -> bool {
    let Some(list) = member_list(cluster, v).await else {
        return false;
    };
    let Some(id) = member_of(&list, v) else {
        return false;
    };
    if let Some((j, mut c)) = clients_except(cluster, v).await.into_iter().next() {
        match c.member_remove(pb::MemberRemoveRequest { id }).await {
            Ok(_) => return true,
            Err(e) => {
                tracing::info!(node = v, via = j, error = %e.message(), "member remove failed")
            }
        }
    }
    // The answer may have been lost (removing the leader, say). Only the node itself
    // stopping counts as proof (a member list may come from a lagging member): a removed
    // member stops once its removal has lasted its settle time.
    let deadline = tokio::time::Instant::now() + 2 * MEMBER_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        if cluster.has_exited(v) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    false
}

/// Adds removed node `v` back (a member add, retried until the cluster takes it) and
/// starts it as a newcomer.
async fn add_member_back(net: &Net, cluster: &mut Cluster, v: usize) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        if tokio::time::Instant::now() > deadline {
            bail!("node {v} could not be added back to the cluster");
        }
        if let Some(list) = member_list(cluster, v).await {
            if member_of(&list, v).is_some() {
                let initial_cluster: Vec<String> = list
                    .iter()
                    .flat_map(|m| {
                        m.peer_ur_ls.iter().filter_map(|u| {
                            cluster
                                .node_of_peer_url(u)
                                .map(|node| format!("n{node}={u}"))
                        })
                    })
                    .collect();
                return cluster.rejoin(net, v, initial_cluster.join(","));
            }
            if let Some((j, mut c)) = clients_except(cluster, v).await.into_iter().next() {
                let add = pb::MemberAddRequest {
                    peer_ur_ls: vec![Cluster::peer_url(v)],
                    is_learner: false,
                };
                if let Err(e) = c.member_add(add).await {
                    tracing::info!(node = v, via = j, error = %e.message(), "member add failed");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Ends every fault: heals the network, resumes and restarts members, adds removed members
/// back.
pub async fn stop(net: &Net, cluster: &mut Cluster) -> anyhow::Result<()> {
    net.heal()?;
    cluster.recover(net)?;
    // A removal that timed out may still have taken effect once the faults healed: a node
    // that stopped by itself and that the cluster no longer lists is treated as removed, and
    // added back like the others. (Never wipe a node on a member list alone.)
    if let Some(list) = member_list(cluster, 0).await {
        for j in 1..=cluster.nodes() {
            if !cluster.removed_nodes().contains(&j)
                && cluster.has_exited(j)
                && member_of(&list, j).is_none()
            {
                tracing::info!(node = j, "found removed by an earlier membership fault");
                cluster.removed(j, Duration::from_secs(1)).await;
            }
        }
    }
    for v in cluster.removed_nodes() {
        add_member_back(net, cluster, v).await?;
    }
    Ok(())
}
