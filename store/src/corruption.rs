//! The periodic corruption check (etcd's `--experimental-corrupt-check-time`).
//!
//! Every interval the leader asks each member for its HashKV at the leader's current
//! revision (over the peer connection, so with peer TLS and whatever auth the client URLs ask) and compares
//! the answers of members at the same compaction revision. A member whose hash differs from
//! the one a majority of the answers agree on gets a CORRUPT alarm, raised through Raft. With
//! a CORRUPT alarm raised the cluster refuses writes, and the corrupt member refuses reads
//! too, until an operator disarms it (after replacing the member's data).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::etcdserverpb::{alarm_request, AlarmRequest, HashKvRequest};
use flotilla_proto::flotillapb::{command, Command};

use crate::member::Member;
use crate::mvcc::ALARM_CORRUPT;

/// How long one member's answer may take (a HashKV reads the whole key space).
const ASK_TIMEOUT: Duration = Duration::from_secs(30);

/// A member's (hash, compaction revision) at a revision, if it answered.
async fn ask(member: &Member, url: &str, revision: i64) -> Option<(u32, i64)> {
    let mut client = member.peers.client(url).ok()?;
    // A follower may not have applied the revision yet: give it a moment.
    for _ in 0..10 {
        let mut request = tonic::Request::new(HashKvRequest { revision });
        request.set_timeout(ASK_TIMEOUT);
        match client.hash_kv(request).await {
            Ok(r) => {
                let r = r.into_inner();
                return Some((r.hash, r.compact_revision));
            }
            Err(s) if s.message().contains("future revision") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => return None,
        }
    }
    None
}

/// The members whose hash disagrees with the majority's, among those that answered at the
/// same compaction revision as the leader.
pub fn outliers(leader_compact: i64, answers: &[(u64, u32, i64)]) -> Vec<u64> {
    let comparable: Vec<&(u64, u32, i64)> = answers
        .iter()
        .filter(|(_, _, compact)| *compact == leader_compact)
        .collect();
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for (_, hash, _) in &comparable {
        *counts.entry(*hash).or_default() += 1;
    }
    let Some((&majority, &n)) = counts.iter().max_by_key(|(_, n)| **n) else {
        return Vec::new();
    };
    if comparable.len() < 2 || n * 2 <= comparable.len() {
        // No majority to trust.
        return Vec::new();
    }
    comparable
        .iter()
        .filter(|(_, hash, _)| *hash != majority)
        .map(|(id, _, _)| *id)
        .collect()
}

/// One round on the leader. Returns the members found corrupt (already alarmed).
pub async fn check_once(member: &Member) -> anyhow::Result<Vec<u64>> {
    let revision = member.mvcc.current_revision();
    let mvcc = member.mvcc.clone();
    let (own_hash, own_compact) =
        tokio::task::spawn_blocking(move || mvcc.hash_kv(revision)).await??;
    let mut answers = vec![(member.id, own_hash, own_compact)];
    for m in member.member_list() {
        if m.id == member.id || m.is_learner {
            continue;
        }
        let Some(url) = m.peer_ur_ls.first() else {
            continue;
        };
        match ask(member, url, revision).await {
            Some((hash, compact)) => answers.push((m.id, hash, compact)),
            None => tracing::warn!(
                member = format!("{:x}", m.id),
                url = %url,
                "corruption check: could not get this member's HashKV; it is not compared"
            ),
        }
    }
    let corrupt = outliers(own_compact, &answers);
    let raised = member.mvcc.alarms();
    for &id in &corrupt {
        if raised.contains(&(id, ALARM_CORRUPT)) {
            continue;
        }
        tracing::error!(
            member = format!("{id:x}"),
            revision,
            "found data inconsistency with peers (HashKV differs); raising the CORRUPT alarm"
        );
        let command = Command {
            auth: None,
            request: Some(command::Request::Alarm(AlarmRequest {
                action: alarm_request::AlarmAction::Activate as i32,
                member_id: id,
                alarm: ALARM_CORRUPT,
            })),
        };
        member.propose(command).await?;
    }
    Ok(corrupt)
}

/// Runs `check_once` every `interval` while this member leads.
pub async fn check_loop(
    member: Arc<Member>,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return Ok(()),
        }
        if !member.is_leader() {
            continue;
        }
        if let Err(e) = check_once(&member).await {
            tracing::warn!(error = %e, "corruption check");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_member_out_of_line_with_the_majority_is_corrupt() {
        assert_eq!(outliers(5, &[(1, 7, 5), (2, 7, 5), (3, 9, 5)]), vec![3]);
        assert_eq!(outliers(5, &[(1, 9, 5), (2, 7, 5), (3, 7, 5)]), vec![1]);
        // All agree.
        assert!(outliers(5, &[(1, 7, 5), (2, 7, 5), (3, 7, 5)]).is_empty());
        // A member at another compaction revision is not compared.
        assert!(outliers(5, &[(1, 7, 5), (2, 7, 5), (3, 9, 4)]).is_empty());
        // Two members that disagree: no majority, nobody is blamed.
        assert!(outliers(5, &[(1, 7, 5), (2, 9, 5)]).is_empty());
    }
}
