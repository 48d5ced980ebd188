//! Lease expiry bookkeeping: which lease expires when.
//!
//! Every member mirrors the granted leases from the applied log; only the leader's deadlines
//! count. A member that becomes leader gives every lease a full TTL again (etcd does the same
//! when checkpointing is off; TTL checkpoints through Raft are future work). Keep-alives renew
//! on the leader only and are not written to the log, as in etcd.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::mvcc::Mvcc;

/// Largest TTL etcd accepts (`MaxLeaseTTL`), in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// A proposed revoke that has not applied within this time is proposed again.
const REVOKE_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
struct Deadline {
    ttl: i64,
    expires: Instant,
    revoke_proposed: Option<Instant>,
}

#[derive(Default)]
pub struct LeaseKeeper {
    deadlines: Mutex<HashMap<i64, Deadline>>,
}

fn seconds(ttl: i64) -> Duration {
    Duration::from_secs(ttl.clamp(0, MAX_LEASE_TTL) as u64)
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
            },
        );
    }

    pub fn revoked(&self, id: i64) {
        self.lock().remove(&id);
    }

    /// Rebuilds the table from the state machine (start-up, snapshot install).
    pub fn reload(&self, mvcc: &Mvcc) {
        let leases = match mvcc.leases() {
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
            table.insert(
                id,
                Deadline {
                    ttl: record.ttl,
                    expires: now + seconds(record.ttl),
                    revoke_proposed: None,
                },
            );
        }
    }

    /// On becoming leader: every lease gets its full TTL from now.
    pub fn promote(&self) {
        let now = Instant::now();
        for d in self.lock().values_mut() {
            d.expires = now + seconds(d.ttl);
            d.revoke_proposed = None;
        }
    }

    /// Renews a lease; returns its TTL, or None when no such lease exists.
    pub fn keep_alive(&self, id: i64) -> Option<i64> {
        let now = Instant::now();
        let mut table = self.lock();
        let d = table.get_mut(&id)?;
        d.expires = now + seconds(d.ttl);
        Some(d.ttl)
    }

    /// (granted TTL, remaining seconds) of a lease.
    pub fn time_to_live(&self, id: i64) -> Option<(i64, i64)> {
        let now = Instant::now();
        let table = self.lock();
        let d = table.get(&id)?;
        let left = d.expires.saturating_duration_since(now);
        // Round up as etcd does, so a fresh lease reports its full TTL.
        let left_s = left.as_secs() as i64 + i64::from(left.subsec_nanos() > 0);
        Some((d.ttl, left_s.min(d.ttl)))
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
        assert_eq!(k.keep_alive(7), Some(10));
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
}
