//! Hands each applied revision only to the watch streams with a watcher on one of its keys.
//!
//! Every watch stream subscribes once and registers the key or range of each of its
//! watchers. The hub takes every revision from the member's fan-out, looks up the streams
//! whose watchers match one of its events (a hash lookup for single keys, a scan of the
//! registered ranges), and puts the revision in those streams' mailboxes; a stream nothing
//! matches is not woken, so the cost of a write no longer grows with the number of streams.
//!
//! `dispatched` is the newest revision handed out. Revisions a stream did not receive had
//! nothing for it, with two exceptions that the stream repairs from disk: its mailbox was
//! full (a slow client), or the hub itself missed revisions (it fell behind the fan-out, or a
//! snapshot install replaced the state). Then the stream's `lagged` mark holds the newest
//! revision it may have missed, set before `dispatched` moves past it, so a stream that has
//! read `dispatched`, emptied its mailbox and found no mark has seen everything up to it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc, Notify};

use crate::mvcc::{RangeEnd, RevisionEvents};

/// Revisions waiting in one stream's mailbox before the stream is marked lagged.
pub const MAILBOX: usize = 1024;

type StreamId = u64;

pub struct WatchHub {
    index: Mutex<Index>,
    dispatched: AtomicI64,
    next_stream: AtomicU64,
}

#[derive(Default)]
struct Index {
    /// Single-key watchers: key → stream → how many of its watchers.
    keys: HashMap<Vec<u8>, HashMap<StreamId, usize>>,
    /// Range and prefix watchers: (key, range_end, stream), one per watcher.
    ranges: Vec<(Vec<u8>, Vec<u8>, StreamId)>,
    streams: HashMap<StreamId, Arc<Slot>>,
}

struct Slot {
    mailbox: mpsc::Sender<Arc<RevisionEvents>>,
    /// The newest revision this stream may have missed (0: none).
    lagged: AtomicI64,
    wake: Notify,
}

impl WatchHub {
    /// A hub that has handed out everything up to `revision`.
    pub fn new(revision: i64) -> Arc<WatchHub> {
        Arc::new(WatchHub {
            index: Mutex::new(Index::default()),
            dispatched: AtomicI64::new(revision),
            next_stream: AtomicU64::new(1),
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dispatched(&self) -> i64 {
        self.dispatched.load(Ordering::SeqCst)
    }

    /// Registers a stream; revisions for its watchers arrive on the receiver.
    pub fn subscribe(self: &Arc<Self>) -> (Subscription, mpsc::Receiver<Arc<RevisionEvents>>) {
        let (tx, rx) = mpsc::channel(MAILBOX);
        let slot = Arc::new(Slot {
            mailbox: tx,
            lagged: AtomicI64::new(0),
            wake: Notify::new(),
        });
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        self.index().streams.insert(id, slot.clone());
        let sub = Subscription {
            hub: self.clone(),
            id,
            slot,
        };
        (sub, rx)
    }

    /// Takes revisions from `fanout` until it closes. `last` is the newest revision already
    /// applied when `fanout` was subscribed.
    pub async fn run(self: Arc<Self>, mut fanout: broadcast::Receiver<Arc<RevisionEvents>>) {
        let mut last = self.dispatched();
        let mut missed = false;
        loop {
            let batch = match fanout.recv().await {
                Ok(b) => b,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    missed = true;
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if batch.revision <= last && !missed {
                continue;
            }
            // Every revision with events is published, in order: a gap means revisions the
            // hub never saw, which every stream reads back from disk.
            if missed || batch.revision != last + 1 {
                self.all_lagged(batch.revision - 1);
                missed = false;
            }
            self.dispatch(&batch);
            last = batch.revision;
        }
    }

    fn dispatch(&self, batch: &Arc<RevisionEvents>) {
        let targets: Vec<Arc<Slot>> = {
            let index = self.index();
            let mut ids: Vec<StreamId> = Vec::new();
            for kv in batch.events.iter().filter_map(|e| e.kv.as_ref()) {
                if let Some(streams) = index.keys.get(&kv.key) {
                    ids.extend(streams.keys());
                }
                for (start, end, id) in &index.ranges {
                    if RangeEnd::of(end).contains(start, &kv.key) {
                        ids.push(*id);
                    }
                }
            }
            ids.sort_unstable();
            ids.dedup();
            ids.iter()
                .filter_map(|id| index.streams.get(id).cloned())
                .collect()
        };
        let mut full = Vec::new();
        for slot in targets {
            if let Err(mpsc::error::TrySendError::Full(_)) = slot.mailbox.try_send(batch.clone()) {
                // Marked before `dispatched` moves past the revision (see the module doc).
                slot.lagged.fetch_max(batch.revision, Ordering::SeqCst);
                full.push(slot);
            }
        }
        self.dispatched.store(batch.revision, Ordering::SeqCst);
        for slot in full {
            slot.wake.notify_one();
        }
    }

    fn all_lagged(&self, through: i64) {
        let slots: Vec<Arc<Slot>> = self.index().streams.values().cloned().collect();
        for slot in &slots {
            slot.lagged.fetch_max(through, Ordering::SeqCst);
        }
        self.dispatched.fetch_max(through, Ordering::SeqCst);
        for slot in &slots {
            slot.wake.notify_one();
        }
    }
}

/// One stream's registration; dropping it removes the stream and its watchers from the hub.
pub struct Subscription {
    hub: Arc<WatchHub>,
    id: StreamId,
    slot: Arc<Slot>,
}

impl Subscription {
    /// Revisions with an event in `[key, range_end)` (etcd's range terms) reach this stream
    /// from now on.
    pub fn watch(&self, key: &[u8], range_end: &[u8]) {
        let mut index = self.hub.index();
        if range_end.is_empty() {
            *index
                .keys
                .entry(key.to_vec())
                .or_default()
                .entry(self.id)
                .or_default() += 1;
        } else {
            index
                .ranges
                .push((key.to_vec(), range_end.to_vec(), self.id));
        }
    }

    /// Undoes one `watch` of the same key and range.
    pub fn unwatch(&self, key: &[u8], range_end: &[u8]) {
        let mut index = self.hub.index();
        if range_end.is_empty() {
            if let Some(streams) = index.keys.get_mut(key) {
                if let Some(n) = streams.get_mut(&self.id) {
                    *n -= 1;
                    if *n == 0 {
                        streams.remove(&self.id);
                    }
                }
                if streams.is_empty() {
                    index.keys.remove(key);
                }
            }
        } else if let Some(at) = index
            .ranges
            .iter()
            .position(|(k, e, id)| *id == self.id && k == key && e == range_end)
        {
            index.ranges.swap_remove(at);
        }
    }

    /// The newest revision handed out by the hub.
    pub fn dispatched(&self) -> i64 {
        self.hub.dispatched()
    }

    /// The newest revision this stream may have missed, if any; clears the mark.
    pub fn take_lagged(&self) -> Option<i64> {
        match self.slot.lagged.swap(0, Ordering::SeqCst) {
            0 => None,
            r => Some(r),
        }
    }

    /// Completes when the hub marks this stream lagged.
    pub async fn lag_notified(&self) {
        self.slot.wake.notified().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut index = self.hub.index();
        index.streams.remove(&self.id);
        let id = self.id;
        index.keys.retain(|_, streams| {
            streams.remove(&id);
            !streams.is_empty()
        });
        index.ranges.retain(|(_, _, s)| *s != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::mvccpb::{Event, KeyValue};

    fn revision(revision: i64, keys: &[&str]) -> Arc<RevisionEvents> {
        Arc::new(RevisionEvents {
            revision,
            events: keys
                .iter()
                .map(|k| Event {
                    kv: Some(KeyValue {
                        key: k.as_bytes().to_vec(),
                        mod_revision: revision,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        })
    }

    fn received(rx: &mut mpsc::Receiver<Arc<RevisionEvents>>) -> Vec<i64> {
        let mut out = Vec::new();
        while let Ok(b) = rx.try_recv() {
            out.push(b.revision);
        }
        out
    }

    #[tokio::test]
    async fn only_streams_watching_a_key_of_the_revision_receive_it() {
        let hub = WatchHub::new(1);
        let (a, mut a_rx) = hub.subscribe();
        let (b, mut b_rx) = hub.subscribe();
        let (c, mut c_rx) = hub.subscribe();
        a.watch(b"k1", b"");
        b.watch(b"k2", b"");
        // A prefix watch on "k" (range_end "l").
        c.watch(b"k", b"l");
        hub.dispatch(&revision(2, &["k1"]));
        hub.dispatch(&revision(3, &["k2", "k1"]));
        hub.dispatch(&revision(4, &["other"]));
        assert_eq!(received(&mut a_rx), vec![2, 3]);
        assert_eq!(received(&mut b_rx), vec![3]);
        assert_eq!(received(&mut c_rx), vec![2, 3]);
        assert_eq!(hub.dispatched(), 4);

        // Two watchers of one key on a stream: it keeps receiving until both are gone.
        a.watch(b"k1", b"");
        a.unwatch(b"k1", b"");
        hub.dispatch(&revision(5, &["k1"]));
        assert_eq!(received(&mut a_rx), vec![5]);
        assert_eq!(received(&mut c_rx), vec![5]);
        // No watcher of "k1" left on `a`; `c` now watches everything from "k3".
        a.unwatch(b"k1", b"");
        c.unwatch(b"k", b"l");
        c.watch(b"k3", b"\0");
        hub.dispatch(&revision(6, &["k1", "k2"]));
        hub.dispatch(&revision(7, &["z"]));
        assert_eq!(received(&mut a_rx), Vec::<i64>::new());
        assert_eq!(received(&mut b_rx), vec![6]);
        assert_eq!(received(&mut c_rx), vec![7]);
        assert!(a.take_lagged().is_none() && b.take_lagged().is_none());

        // A dropped stream leaves nothing behind.
        drop(b);
        let index = hub.index();
        assert!(index.keys.is_empty(), "{:?}", index.keys.keys());
        assert_eq!(index.ranges.len(), 1);
        assert_eq!(index.streams.len(), 2);
    }

    #[tokio::test]
    async fn a_full_mailbox_marks_the_stream_lagged_before_the_revision_is_published() {
        let hub = WatchHub::new(1);
        let (a, mut a_rx) = hub.subscribe();
        a.watch(b"k", b"");
        for r in 0..MAILBOX as i64 {
            hub.dispatch(&revision(2 + r, &["k"]));
        }
        assert!(a.take_lagged().is_none());
        let over = 2 + MAILBOX as i64;
        hub.dispatch(&revision(over, &["k"]));
        hub.dispatch(&revision(over + 1, &["other"]));
        assert_eq!(a.take_lagged(), Some(over));
        assert!(a.take_lagged().is_none(), "taking the mark clears it");
        // The wake-up is kept for a stream that was not waiting.
        tokio::time::timeout(std::time::Duration::from_secs(1), a.lag_notified())
            .await
            .expect("the lagged stream is woken");
        assert_eq!(received(&mut a_rx).len(), MAILBOX);
    }

    #[tokio::test]
    async fn revisions_the_hub_missed_mark_every_stream() {
        let (tx, rx) = broadcast::channel(4);
        let hub = WatchHub::new(1);
        let (a, mut a_rx) = hub.subscribe();
        let (b, mut b_rx) = hub.subscribe();
        a.watch(b"k", b"");
        let task = tokio::spawn(hub.clone().run(rx));
        // A revision already counted when the hub started is skipped.
        tx.send(revision(1, &["k"])).unwrap();
        tx.send(revision(2, &["k"])).unwrap();
        // A gap (a snapshot install): 3..=9 never came through the fan-out.
        tx.send(revision(10, &["k"])).unwrap();
        drop(tx);
        task.await.unwrap();
        assert_eq!(received(&mut a_rx), vec![2, 10]);
        assert_eq!(received(&mut b_rx), Vec::<i64>::new());
        assert_eq!(a.take_lagged(), Some(9));
        assert_eq!(b.take_lagged(), Some(9));
        assert_eq!(hub.dispatched(), 10);

        // The hub falling behind the fan-out (a lagged receiver) marks every stream too.
        let (tx, rx) = broadcast::channel(2);
        let hub = WatchHub::new(1);
        let (c, _c_rx) = hub.subscribe();
        for r in 2..=6 {
            tx.send(revision(r, &["x"])).unwrap();
        }
        drop(tx);
        hub.clone().run(rx).await;
        assert_eq!(c.take_lagged(), Some(4));
        assert_eq!(hub.dispatched(), 6);
    }
}
