//! The watch cache: one store watch per resource per apiserver, shared by every client
//! watch of that resource.
//!
//! Each event is read and decoded once, kept in a window of recent events (for watches that
//! start from a resourceVersion) and fanned out to the watchers. A watch that starts from a
//! revision older than the window (or before the cache began) is served by a store watch of
//! its own instead, so nothing a client may ask for is refused that the store could give.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use flotilla_proto::mvccpb::event::EventType;
use serde_json::Value;
use tokio::sync::broadcast;

use crate::crypt::Codec;
use crate::etcd::Store;

/// Events kept for watches that start in the past.
const WINDOW: usize = 10_000;
/// Events a live watcher may fall behind by before it is cut off (it re-watches from its
/// last resourceVersion, served from the window).
const FANOUT: usize = 4096;

/// One change, decoded.
#[derive(Debug)]
pub struct Change {
    /// The store revision of the change.
    pub revision: i64,
    pub key: String,
    pub deleted: bool,
    /// The object after the change (before it, for a delete), resourceVersion set.
    pub object: Value,
    /// The object before the change, if any.
    pub prev: Option<Value>,
}

/// What a watcher receives: a change, or word that the store has reached a revision.
#[derive(Debug, Clone)]
pub enum Item {
    Change(Arc<Change>),
    Progress(i64),
}

struct Inner {
    /// Changes after `start` up to `revision`, oldest first.
    window: VecDeque<Arc<Change>>,
    /// Every change after this revision is in the window: the revision the cache began at,
    /// or that of the last change to age out.
    complete_after: i64,
    /// The revision the cache has seen everything up to.
    revision: i64,
    live: broadcast::Sender<Item>,
}

/// The cache of one resource.
pub struct Cache {
    inner: Mutex<Inner>,
    /// The revision reached, for waiters.
    reached: tokio::sync::watch::Sender<i64>,
    /// Asks the store watch for progress (set while it runs).
    progress: Mutex<Option<crate::etcd::ProgressRequester>>,
}

/// A watcher's start: the changes after its revision, then the live feed.
pub struct Subscription {
    pub backlog: Vec<Arc<Change>>,
    pub live: broadcast::Receiver<Item>,
}

impl Cache {
    /// Waits (up to `limit`) until the cache has seen everything up to `revision`, asking
    /// the store for progress: a client that read at the store's latest revision (a list)
    /// then watches from it, and other resources' writes move that revision on.
    pub async fn caught_up(&self, revision: i64, limit: std::time::Duration) -> bool {
        let mut reached = self.reached.subscribe();
        if let Some(p) = self
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            p.request();
        }
        tokio::time::timeout(limit, reached.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The revision the cache has seen everything up to (0: not started).
    pub fn revision(&self) -> i64 {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .revision
    }

    /// Changes after `after` and everything from then on, or None if `after` is older than
    /// the window (the caller then watches the store itself).
    pub fn subscribe(&self, after: i64) -> Option<Subscription> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.revision == 0 || after < inner.complete_after || after > inner.revision {
            return None;
        }
        let backlog = inner
            .window
            .iter()
            .filter(|c| c.revision > after)
            .cloned()
            .collect();
        Some(Subscription {
            backlog,
            live: inner.live.subscribe(),
        })
    }
}

/// The caches of this apiserver, by resource prefix; started on first use.
#[derive(Default)]
pub struct Caches {
    by_prefix: Mutex<HashMap<String, Arc<Cache>>>,
}

impl Caches {
    /// The cache of the resource under `prefix`, started if it was not.
    pub fn get(&self, prefix: &str, store: &Store, codec: &Arc<Codec>) -> Arc<Cache> {
        let mut map = self.by_prefix.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(prefix) {
            return c.clone();
        }
        let (live, _) = broadcast::channel(FANOUT);
        let cache = Arc::new(Cache {
            inner: Mutex::new(Inner {
                window: VecDeque::new(),
                complete_after: 0,
                revision: 0,
                live,
            }),
            reached: tokio::sync::watch::channel(0).0,
            progress: Mutex::new(None),
        });
        map.insert(prefix.to_string(), cache.clone());
        tokio::spawn(feed(
            cache.clone(),
            prefix.to_string(),
            store.clone(),
            codec.clone(),
        ));
        cache
    }
}

fn decode(codec: &Codec, key: &[u8], value: &[u8], revision: i64) -> Option<Value> {
    let value = codec.open(key, value).ok()?;
    let mut obj: Value = serde_json::from_slice(&value).ok()?;
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".into(),
            Value::String(revision.to_string()),
        );
    }
    Some(obj)
}

/// Follows the store for one resource, for the life of the process. On any break it
/// starts over from the current revision with an empty window, ending its watchers (they
/// re-watch, from the store if their revision is older than the new window).
async fn feed(cache: Arc<Cache>, prefix: String, store: Store, codec: Arc<Codec>) {
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        let started = async {
            let (_, _, revision) = store.list(&prefix, &[], 1, 0).await?;
            let (events, progress) = store.watch(&prefix, revision + 1).await?;
            Ok::<_, crate::status::ApiError>((revision, events, progress))
        }
        .await;
        let (revision, mut events, progress) = match started {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%prefix, error = %e, "starting a watch cache; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
                continue;
            }
        };
        pause = std::time::Duration::from_millis(100);
        *cache.progress.lock().unwrap_or_else(|e| e.into_inner()) = Some(progress.clone());
        {
            let mut inner = cache.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.window.clear();
            inner.complete_after = revision;
            cache.reached.send_replace(revision);
            inner.revision = revision;
            // Watchers of the last run end: their feed has a gap.
            let (live, _) = broadcast::channel(FANOUT);
            inner.live = live;
        }
        // Progress is asked for now and then, so an idle resource's revision keeps up and
        // bookmarks carry a recent one.
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            let msg = tokio::select! {
                m = events.message() => m,
                _ = tick.tick() => {
                    progress.request();
                    continue;
                }
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                _ => break,
            };
            if resp.canceled {
                break;
            }
            // The answer to the watch's creation carries the store's revision, not one this
            // watch has delivered everything up to.
            if resp.created && resp.events.is_empty() {
                continue;
            }
            let header_rev = resp.header.as_ref().map_or(0, |h| h.revision);
            let mut changes = Vec::new();
            for ev in &resp.events {
                let Some(kv) = ev.kv.as_ref() else { continue };
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                let prev = ev
                    .prev_kv
                    .as_ref()
                    .and_then(|p| decode(&codec, &p.key, &p.value, p.mod_revision));
                let deleted = ev.r#type == EventType::Delete as i32;
                let object = if deleted {
                    match &prev {
                        Some(p) => {
                            let mut p = p.clone();
                            if let Some(meta) = p.get_mut("metadata").and_then(Value::as_object_mut)
                            {
                                meta.insert(
                                    "resourceVersion".into(),
                                    Value::String(kv.mod_revision.to_string()),
                                );
                            }
                            p
                        }
                        None => continue,
                    }
                } else {
                    match decode(&codec, &kv.key, &kv.value, kv.mod_revision) {
                        Some(o) => o,
                        None => continue,
                    }
                };
                changes.push(Arc::new(Change {
                    revision: kv.mod_revision,
                    key,
                    deleted,
                    object,
                    prev,
                }));
            }
            let mut inner = cache.inner.lock().unwrap_or_else(|e| e.into_inner());
            for c in changes {
                inner.revision = inner.revision.max(c.revision);
                inner.window.push_back(c.clone());
                if inner.window.len() > WINDOW {
                    if let Some(old) = inner.window.pop_front() {
                        inner.complete_after = old.revision;
                    }
                }
                let _ = inner.live.send(Item::Change(c));
            }
            if resp.events.is_empty() && header_rev > inner.revision {
                inner.revision = header_rev;
            }
            if resp.events.is_empty() {
                let _ = inner.live.send(Item::Progress(inner.revision));
            }
            cache.reached.send_replace(inner.revision);
        }
        tracing::debug!(%prefix, "a watch cache's store watch ended; starting over");
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(changes: &[i64], complete_after: i64, revision: i64) -> Cache {
        let (live, _) = broadcast::channel(16);
        let window = changes
            .iter()
            .map(|&r| {
                Arc::new(Change {
                    revision: r,
                    key: format!("/registry/pods/default/p{r}"),
                    deleted: false,
                    object: Value::Null,
                    prev: None,
                })
            })
            .collect();
        Cache {
            inner: Mutex::new(Inner {
                window,
                complete_after,
                revision,
                live,
            }),
            reached: tokio::sync::watch::channel(revision).0,
            progress: Mutex::new(None),
        }
    }

    #[test]
    fn a_watch_is_served_only_from_a_complete_window() {
        let c = cache(&[11, 12, 12, 15], 10, 16);
        let sub = c.subscribe(11).expect("in the window");
        let revs: Vec<i64> = sub.backlog.iter().map(|c| c.revision).collect();
        assert_eq!(revs, [12, 12, 15]);
        assert!(c.subscribe(10).is_some(), "everything after 10 is kept");
        assert!(
            c.subscribe(9).is_none(),
            "older than the window: the store serves it"
        );
        assert!(c.subscribe(17).is_none(), "newer than the cache has seen");
        assert!(cache(&[], 0, 0).subscribe(0).is_none(), "not started");
    }
}
