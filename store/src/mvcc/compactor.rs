//! Physical compaction: removes versions no read at or above the compaction revision can see.
//!
//! Runs in the background on every member, in small batches, so writes never wait for it
//! (etcd's compaction also runs in batches, but its space only returns after a blocking
//! defrag; RocksDB reclaims it in its own compactions).

use std::sync::Arc;
use std::time::Duration;

use rocksdb::WriteBatch;

use super::keys::*;
use super::{decode, encode, Mvcc, CF_KV, CF_META, CF_REV};
use crate::error::StorageError;

/// Deletions per WriteBatch.
const BATCH_DELETES: usize = 1000;
/// Entries examined between pauses, and the pause: compaction is background work and must
/// not take the CPU and disk from client writes (on two cores it otherwise doubles their
/// p99). etcd pauses between batches the same way.
const SCAN_STEP: usize = 1_000;
const PAUSE: std::time::Duration = std::time::Duration::from_millis(10);
/// Old versions of one key removed one by one; past this many, one range deletion removes
/// the rest of the key's history and the scan skips it. A hot key's thousands of versions
/// then cost one write and one seek instead of a tombstone and a step each, while the many
/// keys with a version or two leave no range tombstones for reads to step over.
const POINT_DELETES_PER_KEY: usize = 8;

/// Compacts to every new target revision until `shutdown` fires.
pub async fn run(mvcc: Arc<Mvcc>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut target = mvcc.compact_target.subscribe();
    loop {
        let want = *target.borrow_and_update();
        let done = *mvcc.compact_done.borrow();
        if want > done {
            let m = mvcc.clone();
            let started = std::time::Instant::now();
            match tokio::task::spawn_blocking(move || compact(&m, want)).await {
                Ok(Ok(())) => {
                    mvcc.compact_done.send_replace(want);
                    tracing::info!(revision = want, took = ?started.elapsed(), "finished compaction");
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, revision = want, "compaction failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(e) => tracing::error!(error = %e, "compaction task died"),
            }
            continue;
        }
        tokio::select! {
            r = target.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

/// Keeps, for every key, all versions above `revision` and the newest one at or below it
/// (unless that one is a tombstone); deletes the rest and the change log below `revision`.
fn compact(mvcc: &Mvcc, revision: i64) -> Result<(), StorageError> {
    let db = mvcc.db();
    let kv = mvcc.cf(CF_KV);
    let mut batch = WriteBatch::default();
    // A scan of every version must not push the working set out of the block cache.
    let mut read = super::total_order();
    read.fill_cache(false);
    let mut it = db.raw_iterator_cf_opt(kv, read);
    it.seek_to_first();
    let mut current_key: Option<Vec<u8>> = None;
    let mut kept_at_or_below = false;
    let mut deleted_of_key = 0usize;
    let mut scanned = 0usize;
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        scanned += 1;
        if scanned % SCAN_STEP == 0 {
            std::thread::sleep(PAUSE);
        }
        let Some((user_key, rev)) = decode_kv_key(k) else {
            return Err(StorageError::Corrupt {
                what: "kv key",
                detail: format!("{k:?}"),
            });
        };
        if current_key.as_deref() != Some(user_key.as_slice()) {
            current_key = Some(user_key.clone());
            kept_at_or_below = false;
            deleted_of_key = 0;
        }
        if rev <= revision {
            if kept_at_or_below && deleted_of_key >= POINT_DELETES_PER_KEY {
                // Versions come newest first: everything from here to the next key is older.
                let past = past_key(&user_key);
                batch.delete_range_cf(kv, k, &past[..]);
                it.seek(&past);
                continue;
            }
            if kept_at_or_below {
                batch.delete_cf(kv, k);
                deleted_of_key += 1;
            } else {
                kept_at_or_below = true;
                let record: KvRecord = decode("kv", v)?;
                if record.is_tombstone() {
                    batch.delete_cf(kv, k);
                }
            }
        }
        if batch.len() >= BATCH_DELETES {
            db.write(std::mem::take(&mut batch))?;
        }
        it.next();
    }
    it.status()?;
    drop(it);
    batch.delete_range_cf(mvcc.cf(CF_REV), rev_key(0, 0), rev_key(revision, 0));
    batch.put_cf(mvcc.cf(CF_META), META_COMPACT_DONE, encode(&revision));
    db.write(batch)?;
    Ok(())
}

#[cfg(test)]
pub(crate) fn compact_for_tests(mvcc: &Mvcc, revision: i64) {
    compact(mvcc, revision).expect("compaction");
}
