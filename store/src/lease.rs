//! Lease expiry bookkeeping: which lease expires when.
//!
//! Every member mirrors the granted leases from the applied log; only the leader's deadlines
//! count. Keep-alives renew on the leader only and are not written to the log, as in etcd.
//!
//! **Checkpoints.** So that a failover does not hand every lease a fresh TTL, the leader
//! periodically writes through Raft the remaining TTL of leases that have not been renewed
//! lately (`Command::LeaseCheckpoint`, etcd's LeaseCheckpoint). A new leader starts each
//! lease from its checkpointed remaining TTL, or the full TTL when there is none.
//!
//! The invariant that keeps this safe: a checkpoint in the log is never smaller than the
//! lease's true remaining TTL at the time it takes effect. A renewal raises the true
//! remaining TTL, so a renewal of a lease with a checkpoint in the log (or on its way there)
//! writes a clearing checkpoint (remaining 0) and answers only once that is committed; the
//! member orders the two through one gate (`Member::lease_checkpoint_gate`).
//!
//! What gets checkpointed: leases with less than half their TTL left (clients renew at a
//! third of the TTL, so healthy keep-alives cost no Raft writes), and leases not renewed at
//! all under the current leader; each again only after its remaining TTL dropped by the
//! interval or a tenth of its TTL, whichever is more. A new leader may so give a lease up to
//! half its TTL more than it had, never less, and a lease nobody renews still runs out when
//! leaders change often. A leader starts its deadlines (`promote`) only once the entries of
//! earlier terms are applied, so it starts from the latest checkpoints; renewals wait for it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::mvcc::Mvcc;

/// Largest TTL etcd accepts (`MaxLeaseTTL`), in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// A proposed revoke that has not applied within this time is proposed again.
const REVOKE_RETRY: Duration = Duration::from_secs(5);

/// Checkpoints per Raft command, as etcd's `maxLeaseCheckpointBatchSize`.
pub const CHECKPOINT_BATCH: usize = 1000;

#[derive(Debug, Clone, Copy)]
struct Deadline {
    ttl: i64,
    expires: Instant,
    revoke_proposed: Option<Instant>,
    /// Remaining TTL in the applied state (None: full TTL).
    checkpoint: Option<i64>,
    /// Leader only: the last remaining TTL this leader proposed (or found applied) and not
    /// yet known to be cleared, with a number that tells proposals apart; Some means a
    /// renewal must clear it.
    proposed: Option<(i64, u64)>,
    /// Leader only: renewed since this member became leader.
    renewed: bool,
}

#[derive(Default)]
pub struct LeaseKeeper {
    deadlines: Mutex<HashMap<i64, Deadline>>,
    proposals: std::sync::atomic::AtomicU64,
    /// True while this member leads and has started its deadlines (`promote`); renewals wait
    /// for it, as etcd's lessor answers only once it is primary.
    primary: tokio::sync::watch::Sender<bool>,
}

fn seconds(ttl: i64) -> Duration {
    Duration::from_secs(ttl.clamp(0, MAX_LEASE_TTL) as u64)
}

/// Whole seconds left, rounded up (a fresh lease reports its full TTL, as in etcd).
fn seconds_left(expires: Instant, now: Instant) -> i64 {
    let left = expires.saturating_duration_since(now);
    left.as_secs() as i64 + i64::from(left.subsec_nanos() > 0)
}

/// What a renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewed {
    pub ttl: i64,
    /// A checkpoint smaller than the full TTL is in the log (or on its way): clear it before
    /// answering, then report `cleared` with this number.
    pub clear_checkpoint: Option<u64>,
}

impl LeaseKeeper {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Deadline>> {
        // A panic while holding this lock leaves plain data behind; keep using it.
        self.deadlines.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn granted(&self, id: i64, ttl: i64) {
        let now = Instant::now();
        self.lock().insert(
            id,
            Deadline {
                ttl,
                expires: now + seconds(ttl),
                revoke_proposed: None,
                checkpoint: None,
                proposed: None,
                renewed: false,
            },
        );
    }

    pub fn revoked(&self, id: i64) {
        self.lock().remove(&id);
    }

    /// A checkpoint applied (on every member).
    pub fn checkpointed(&self, id: i64, remaining: i64) {
        if let Some(d) = self.lock().get_mut(&id) {
            d.checkpoint = (remaining > 0).then_some(remaining);
        }
    }

    /// Rebuilds the table from the state machine (start-up, snapshot install).
    pub fn reload(&self, mvcc: &Mvcc) {
        let loaded = mvcc
            .leases()
            .and_then(|l| Ok((l, mvcc.lease_checkpoints()?)));
        let (leases, checkpoints) = match loaded {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot read leases from the state machine");
                return;
            }
        };
        let now = Instant::now();
        let mut table = self.lock();
        table.clear();
        for (id, record) in leases {
            let checkpoint = checkpoints.get(&id).copied().filter(|r| *r > 0);
            table.insert(
                id,
                Deadline {
                    ttl: record.ttl,
                    expires: now + seconds(checkpoint.unwrap_or(record.ttl).min(record.ttl)),
                    revoke_proposed: None,
                    checkpoint,
                    proposed: checkpoint.map(|c| (c, 0)),
                    renewed: false,
                },
            );
        }
    }

    /// On becoming leader, once every entry of earlier terms is applied (so the checkpoints
    /// here are the latest): every lease lives on from its checkpointed remaining TTL, or
    /// gets its full TTL from now when it has none.
    pub fn promote(&self) {
        let now = Instant::now();
        for d in self.lock().values_mut() {
            let left = d.checkpoint.unwrap_or(d.ttl).min(d.ttl);
            d.expires = now + seconds(left);
            d.revoke_proposed = None;
            d.proposed = d.checkpoint.map(|c| (c, 0));
            d.renewed = false;
        }
        self.primary.send_replace(true);
    }

    /// On losing leadership.
    pub fn demote(&self) {
        self.primary.send_replace(false);
    }

    pub fn is_primary(&self) -> bool {
        *self.primary.borrow()
    }

    /// Waits (at most `timeout`) until this member is the primary lessor.
    pub async fn wait_primary(&self, timeout: Duration) -> bool {
        // Every renewal asks: answer the usual case without a subscription.
        if self.is_primary() {
            return true;
        }
        let mut rx = self.primary.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|p| *p))
            .await
            .map(|r| r.is_ok());
        waited.unwrap_or(false)
    }

    /// Renews a lease; None when no such lease exists.
    pub fn keep_alive(&self, id: i64) -> Option<Renewed> {
        let now = Instant::now();
        let mut table = self.lock();
        let d = table.get_mut(&id)?;
        d.expires = now + seconds(d.ttl);
        d.renewed = true;
        // A checkpoint proposed by this leader, or one in the applied state: clear it.
        let pending = d.proposed.or(d.checkpoint.map(|c| (c, 0)));
        Some(Renewed {
            ttl: d.ttl,
            clear_checkpoint: pending.map(|(_, n)| n),
        })
    }

    /// A clearing checkpoint committed: renewals need not clear again, unless a checkpoint
    /// was proposed since the one that was cleared.
    pub fn cleared(&self, id: i64, proposal: u64) {
        if let Some(d) = self.lock().get_mut(&id) {
            if d.proposed.is_some_and(|(_, n)| n == proposal) {
                d.proposed = None;
            }
        }
    }

    /// Leader: the leases whose remaining TTL is worth writing down now (see the module
    /// notes). Marks them as proposed; the caller proposes the result in this order.
    pub fn due_checkpoints(&self, interval: Duration) -> Vec<(i64, i64)> {
        let now = Instant::now();
        let mut out = Vec::new();
        for (id, d) in self.lock().iter_mut() {
            if d.revoke_proposed.is_some() {
                continue;
            }
            let step = (interval.as_secs().max(1) as i64).max(d.ttl / 10);
            let left = seconds_left(d.expires, now);
            // Past half its TTL; or not renewed under this leader at all (so that leaders
            // changing faster than TTL/2 cannot keep an abandoned lease alive for ever).
            let stale = (2 * left <= d.ttl || !d.renewed) && left + step <= d.ttl;
            let moved = d.proposed.is_none_or(|(p, _)| p - left >= step);
            if left > 0 && stale && moved {
                let n = self
                    .proposals
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                d.proposed = Some((left, n));
                out.push((*id, left));
            }
        }
        out
    }

    /// (granted TTL, remaining seconds) of a lease.
    pub fn time_to_live(&self, id: i64) -> Option<(i64, i64)> {
        let now = Instant::now();
        let table = self.lock();
        let d = table.get(&id)?;
        Some((d.ttl, seconds_left(d.expires, now).min(d.ttl)))
    }

    /// Leases past their deadline that need a revoke proposed now.
    pub fn take_expired(&self) -> Vec<i64> {
        let now = Instant::now();
        let mut out = Vec::new();
        for (id, d) in self.lock().iter_mut() {
            let due = d.expires <= now;
            let retry = d
                .revoke_proposed
                .map(|t| now.duration_since(t) >= REVOKE_RETRY)
                .unwrap_or(true);
            if due && retry {
                d.revoke_proposed = Some(now);
                out.push(*id);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lease_expires_after_ttl_unless_kept_alive() {
        let k = LeaseKeeper::default();
        k.granted(7, 10);
        assert_eq!(k.time_to_live(7), Some((10, 10)));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(k.take_expired().is_empty());
        assert_eq!(k.time_to_live(7), Some((10, 4)));
        assert_eq!(k.keep_alive(7).map(|r| r.ttl), Some(10));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(k.take_expired().is_empty());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(k.take_expired(), vec![7]);
        assert!(
            k.take_expired().is_empty(),
            "a proposed revoke is not proposed again at once"
        );
        tokio::time::advance(REVOKE_RETRY).await;
        assert_eq!(k.take_expired(), vec![7]);
        k.revoked(7);
        assert_eq!(k.keep_alive(7), None);
    }

    #[tokio::test(start_paused = true)]
    async fn checkpoints_carry_the_remaining_ttl_to_a_new_leader() {
        let leader = LeaseKeeper::default();
        let follower = LeaseKeeper::default();
        for k in [&leader, &follower] {
            k.granted(1, 10);
            k.granted(2, 10);
        }
        leader.promote();
        leader.keep_alive(1);
        leader.keep_alive(2);
        let interval = Duration::from_secs(2);
        tokio::time::advance(Duration::from_millis(4500)).await;
        assert!(
            leader.due_checkpoints(interval).is_empty(),
            "more than half the TTL is left"
        );
        // Lease 2 is renewed all along; lease 1 is not.
        assert_eq!(leader.keep_alive(2).map(|r| r.clear_checkpoint), Some(None));
        tokio::time::advance(Duration::from_millis(2500)).await;
        assert_eq!(leader.keep_alive(2).map(|r| r.clear_checkpoint), Some(None));
        let due = leader.due_checkpoints(interval);
        assert_eq!(due, vec![(1, 3)]);
        for (id, left) in due {
            follower.checkpointed(id, left);
        }
        // Not moved enough since the last one: nothing new.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(leader.due_checkpoints(interval).is_empty());

        // The follower takes over: lease 1 keeps its 3 s, lease 2 gets its full TTL.
        follower.promote();
        assert!(follower.wait_primary(Duration::from_millis(1)).await);
        assert_eq!(follower.time_to_live(1), Some((10, 3)));
        assert_eq!(follower.time_to_live(2), Some((10, 10)));
        // A renewal of a checkpointed lease must clear the checkpoint, and every renewal
        // does until the clearing is committed.
        let clear = follower.keep_alive(1).and_then(|r| r.clear_checkpoint);
        assert!(clear.is_some());
        assert_eq!(
            follower.keep_alive(1).and_then(|r| r.clear_checkpoint),
            clear
        );
        follower.checkpointed(1, 0);
        follower.cleared(1, clear.unwrap_or_default());
        assert_eq!(
            follower.keep_alive(1).and_then(|r| r.clear_checkpoint),
            None
        );
        follower.promote();
        assert_eq!(follower.time_to_live(1), Some((10, 10)));
    }
}
