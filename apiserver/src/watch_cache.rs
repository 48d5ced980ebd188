//! The watch cache: one store watch per resource per apiserver, shared by every client
//! list and watch of that resource.
//!
//! The cache loads every object of its resource once, then follows the store's changes.
//! It holds the objects (a persistent ordered map, so a snapshot at one revision costs a
//! pointer copy and is kept for the pages of a list that continue it) and a window of
//! recent changes (for watches that start from a resourceVersion), and fans changes out
//! to the watchers. Each object is decoded once and kept as the JSON a client receives,
//! with the few fields selectors read beside it: lists and watch events are written from
//! those bytes, not re-encoded per client. A watch that starts older than the window is
//! served by a store watch of its own, a list the cache cannot serve consistently by the
//! store, so nothing a client may ask for is refused that the store could give.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
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
/// Objects read per store request while the cache loads.
const LOAD_PAGE: i64 = 2_000;
/// How often a wait for the cache to reach a revision asks the store for progress.
const PROGRESS_RETRY: Duration = Duration::from_millis(100);
/// Snapshots kept for lists that continue in pages, and for how long.
const KEEP: usize = 16;
const KEEP_FOR: Duration = Duration::from_secs(75);

/// One object as the cache holds it.
#[derive(Debug)]
pub struct Entry {
    /// The object's JSON as a client receives it (resourceVersion set).
    pub json: Bytes,
    /// What selectors read: `metadata.labels`, `.name`, `.namespace` and the resource's
    /// field labels, at their places in the object.
    pub selectable: Value,
}

impl Entry {
    /// `obj` (resourceVersion set) with the selectable `fields` of its resource.
    pub fn new(obj: &Value, fields: &[&str]) -> Entry {
        let mut selectable = serde_json::json!({"metadata": {}});
        for field in ["metadata.labels", "metadata.name", "metadata.namespace"]
            .iter()
            .chain(fields)
        {
            let pointer = format!("/{}", field.replace('.', "/"));
            if let Some(v) = obj.pointer(&pointer) {
                let mut at = &mut selectable;
                let mut parts = field.split('.').peekable();
                while let Some(part) = parts.next() {
                    if !at.is_object() {
                        break;
                    }
                    if parts.peek().is_none() {
                        at[part] = v.clone();
                    } else {
                        if at.get(part).is_none() {
                            at[part] = serde_json::json!({});
                        }
                        at = &mut at[part];
                    }
                }
            }
        }
        Entry {
            json: Bytes::from(serde_json::to_vec(obj).unwrap_or_default()),
            selectable,
        }
    }

    /// The whole object, decoded (for Tables).
    pub fn object(&self) -> Value {
        serde_json::from_slice(&self.json).unwrap_or(Value::Null)
    }
}

/// Every object of a resource at one revision, by store key.
pub type Snapshot = imbl::OrdMap<String, Arc<Entry>>;

/// One change.
#[derive(Debug)]
pub struct Change {
    /// The store revision of the change.
    pub revision: i64,
    pub key: String,
    pub deleted: bool,
    /// The object after the change (before it, for a delete, with the delete's revision).
    pub object: Arc<Entry>,
    /// The object before the change, if any.
    pub prev: Option<Arc<Entry>>,
}

/// What a watcher receives: a change, or word that the store has reached a revision.
#[derive(Debug, Clone)]
pub enum Item {
    Change(Arc<Change>),
    Progress(i64),
}

struct Inner {
    /// Every object at `revision`.
    objects: Snapshot,
    /// Changes after `complete_after` up to `revision`, oldest first.
    window: VecDeque<Arc<Change>>,
    /// Every change after this revision is in the window: the revision the cache loaded
    /// at, or that of the last change to age out.
    complete_after: i64,
    /// The revision the cache has seen everything up to (0: not loaded yet).
    revision: i64,
    live: broadcast::Sender<Item>,
    /// Snapshots that lists continue from, newest last.
    kept: VecDeque<(i64, Instant, Snapshot)>,
}

/// The cache of one resource.
pub struct Cache {
    inner: Mutex<Inner>,
    /// The revision reached, for waiters.
    reached: tokio::sync::watch::Sender<i64>,
    /// Asks the store watch for progress (set while it runs).
    progress: Mutex<Option<crate::etcd::ProgressRequester>>,
    /// The resource's field labels.
    fields: &'static [&'static str],
}

/// A watcher's start: the changes after its revision, then the live feed.
pub struct Subscription {
    pub backlog: Vec<Arc<Change>>,
    pub live: broadcast::Receiver<Item>,
}

impl Cache {
    fn new(fields: &'static [&'static str], revision: i64) -> Cache {
        let (live, _) = broadcast::channel(FANOUT);
        Cache {
            inner: Mutex::new(Inner {
                objects: Snapshot::new(),
                window: VecDeque::new(),
                complete_after: revision,
                revision,
                live,
                kept: VecDeque::new(),
            }),
            reached: tokio::sync::watch::channel(revision).0,
            progress: Mutex::new(None),
            fields,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits (up to `limit`) until the cache has seen everything up to `revision`, asking
    /// the store for progress: a client that read at the store's latest revision then
    /// lists or watches, and other resources' writes move that revision on.
    pub async fn caught_up(&self, revision: i64, limit: Duration) -> bool {
        let mut reached = self.reached.subscribe();
        let wanted = revision.max(1);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if *reached.borrow_and_update() >= wanted {
                return true;
            }
            // Asked again and again: an answer may come from before the revision wanted
            // (the store's watch stream had not sent it yet).
            if let Some(p) = self
                .progress
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                p.request();
            }
            let step = (tokio::time::Instant::now() + PROGRESS_RETRY).min(deadline);
            match tokio::time::timeout_at(step, reached.wait_for(|r| *r >= wanted)).await {
                Ok(r) => return r.is_ok(),
                Err(_) if step >= deadline => return false,
                Err(_) => {}
            }
        }
    }

    /// The revision the cache has seen everything up to (0: not loaded).
    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// Every object at the cache's revision, or None if it has not loaded.
    pub fn snapshot(&self) -> Option<(i64, Snapshot)> {
        let inner = self.lock();
        (inner.revision > 0).then(|| (inner.revision, inner.objects.clone()))
    }

    /// The objects at `revision`, if the cache is there or kept a snapshot of it.
    pub fn snapshot_at(&self, revision: i64) -> Option<Snapshot> {
        let mut inner = self.lock();
        if inner.revision == revision && revision > 0 {
            return Some(inner.objects.clone());
        }
        inner.kept.retain(|(_, at, _)| at.elapsed() < KEEP_FOR);
        inner
            .kept
            .iter()
            .find(|(r, _, _)| *r == revision)
            .map(|(_, _, s)| s.clone())
    }

    /// Drops the kept snapshots that have expired (the old objects they hold with them).
    fn forget_expired(&self) {
        self.lock()
            .kept
            .retain(|(_, at, _)| at.elapsed() < KEEP_FOR);
    }

    /// Keeps a snapshot a list continues from, for a while.
    pub fn keep(&self, revision: i64, snapshot: Snapshot) {
        let mut inner = self.lock();
        inner
            .kept
            .retain(|(r, at, _)| *r != revision && at.elapsed() < KEEP_FOR);
        if inner.kept.len() >= KEEP {
            inner.kept.pop_front();
        }
        inner.kept.push_back((revision, Instant::now(), snapshot));
    }

    /// Every object at the cache's revision and every change after it, taken together
    /// (a watch that starts with the current objects); None if it has not loaded.
    pub fn start(&self) -> Option<(i64, Snapshot, Subscription)> {
        let inner = self.lock();
        (inner.revision > 0).then(|| {
            (
                inner.revision,
                inner.objects.clone(),
                Subscription {
                    backlog: Vec::new(),
                    live: inner.live.subscribe(),
                },
            )
        })
    }

    /// Changes after `after` and everything from then on, or None if `after` is older than
    /// the window (the caller then watches the store itself).
    pub fn subscribe(&self, after: i64) -> Option<Subscription> {
        let inner = self.lock();
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

/// The caches of this apiserver, by resource; started on first use.
#[derive(Default)]
pub struct Caches {
    by_prefix: Mutex<HashMap<String, Arc<Cache>>>,
}

impl Caches {
    /// The cache of `resource`, started if it was not.
    pub fn get(
        &self,
        resource: &crate::resources::Resource,
        store: &Store,
        codec: &Arc<Codec>,
    ) -> Arc<Cache> {
        let prefix = resource.prefix(None);
        let mut map = self.by_prefix.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&prefix) {
            return c.clone();
        }
        let cache = Arc::new(Cache::new(resource.field_labels, 0));
        map.insert(prefix.clone(), cache.clone());
        tokio::spawn(feed(cache.clone(), prefix, store.clone(), codec.clone()));
        cache
    }
}

fn decode(codec: &Codec, key: &[u8], value: &[u8], revision: i64) -> Option<Value> {
    let value = codec.open(key, value).ok()?;
    let mut obj: Value = serde_json::from_slice(&value).ok()?;
    set_revision(&mut obj, revision);
    Some(obj)
}

fn set_revision(obj: &mut Value, revision: i64) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".into(),
            Value::String(revision.to_string()),
        );
    }
}

/// Every object under `prefix` at one revision, read in pages.
async fn load(
    store: &Store,
    codec: &Codec,
    prefix: &str,
    fields: &[&str],
) -> Result<(i64, Snapshot), crate::status::ApiError> {
    let mut objects = Snapshot::new();
    let (mut start, mut revision) = (Vec::new(), 0);
    loop {
        let (kvs, more, read_at) = store.list(prefix, &start, LOAD_PAGE, revision).await?;
        revision = read_at;
        for kv in &kvs {
            if let Some(obj) = decode(codec, &kv.key, &kv.value, kv.mod_revision) {
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                objects.insert(key, Arc::new(Entry::new(&obj, fields)));
            }
        }
        match (more, kvs.last()) {
            (true, Some(last)) => {
                start = last.key.clone();
                start.push(0);
            }
            _ => return Ok((revision, objects)),
        }
    }
}

/// Follows the store for one resource, for the life of the process. On any break it loads
/// the objects again and starts over from their revision with an empty window, ending its
/// watchers (they re-watch, from the store if their revision is older than the new window).
async fn feed(cache: Arc<Cache>, prefix: String, store: Store, codec: Arc<Codec>) {
    let mut pause = Duration::from_millis(100);
    loop {
        let started = async {
            let (revision, objects) = load(&store, &codec, &prefix, cache.fields).await?;
            let (events, progress) = store.watch(&prefix, revision + 1).await?;
            Ok::<_, crate::status::ApiError>((revision, objects, events, progress))
        }
        .await;
        let (revision, objects, mut events, progress) = match started {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%prefix, error = %e, "loading a watch cache; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        pause = Duration::from_millis(100);
        *cache.progress.lock().unwrap_or_else(|e| e.into_inner()) = Some(progress.clone());
        {
            let mut inner = cache.lock();
            inner.objects = objects;
            inner.window.clear();
            inner.kept.clear();
            inner.complete_after = revision;
            inner.revision = revision;
            // Watchers of the last run end: their feed has a gap.
            let (live, _) = broadcast::channel(FANOUT);
            inner.live = live;
            cache.reached.send_replace(revision);
        }
        // Progress is asked for now and then, so an idle resource's revision keeps up and
        // bookmarks carry a recent one.
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            let msg = tokio::select! {
                m = events.message() => m,
                _ = tick.tick() => {
                    progress.request();
                    cache.forget_expired();
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
            // Decoded before the lock is taken; the previous object of a put is the cache's.
            let mut decoded = Vec::new();
            for ev in &resp.events {
                let Some(kv) = ev.kv.as_ref() else { continue };
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                let (deleted, value) = if ev.r#type == EventType::Delete as i32 {
                    let prev = ev
                        .prev_kv
                        .as_ref()
                        .and_then(|p| decode(&codec, &p.key, &p.value, kv.mod_revision));
                    (true, prev)
                } else {
                    (false, decode(&codec, &kv.key, &kv.value, kv.mod_revision))
                };
                let entry = value.map(|o| Entry::new(&o, cache.fields));
                decoded.push((kv.mod_revision, key, deleted, entry));
            }
            let mut inner = cache.lock();
            for (revision, key, deleted, entry) in decoded {
                inner.revision = inner.revision.max(revision);
                let (object, prev) = match (deleted, entry) {
                    (false, Some(entry)) => {
                        let object = Arc::new(entry);
                        let prev = inner.objects.insert(key.clone(), object.clone());
                        (object, prev)
                    }
                    (true, entry) => {
                        let prev = inner.objects.remove(&key);
                        // The deleted object as it was, at the delete's revision: from the
                        // store's previous value, else the cache's copy.
                        let object = match (entry, &prev) {
                            (Some(e), _) => Arc::new(e),
                            (None, Some(p)) => {
                                let mut o = p.object();
                                set_revision(&mut o, revision);
                                Arc::new(Entry::new(&o, cache.fields))
                            }
                            (None, None) => continue,
                        };
                        let prev = prev.or_else(|| Some(object.clone()));
                        (object, prev)
                    }
                    // A value that does not decode leaves lists (as at load) and goes unseen.
                    (false, None) => {
                        inner.objects.remove(&key);
                        continue;
                    }
                };
                let c = Arc::new(Change {
                    revision,
                    key,
                    deleted,
                    object,
                    prev,
                });
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

    fn change(revision: i64, key: &str, deleted: bool) -> Arc<Change> {
        let obj = serde_json::json!({
            "metadata": {"name": key, "namespace": "default", "labels": {"app": "a"},
                         "resourceVersion": revision.to_string()},
            "spec": {"nodeName": "n1", "containers": []},
        });
        Arc::new(Change {
            revision,
            key: format!("/registry/pods/default/{key}"),
            deleted,
            object: Arc::new(Entry::new(&obj, &["spec.nodeName"])),
            prev: None,
        })
    }

    fn cache(changes: &[i64], complete_after: i64, revision: i64) -> Cache {
        let c = Cache::new(&[], revision);
        {
            let mut inner = c.lock();
            inner.complete_after = complete_after;
            inner.window = changes
                .iter()
                .map(|&r| change(r, &format!("p{r}"), false))
                .collect();
        }
        c
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

    #[test]
    fn entries_keep_what_selectors_read_and_the_json_clients_get() {
        let e = &change(7, "p", false).object;
        assert_eq!(
            e.selectable,
            serde_json::json!({
                "metadata": {"name": "p", "namespace": "default", "labels": {"app": "a"}},
                "spec": {"nodeName": "n1"},
            })
        );
        assert_eq!(e.object()["metadata"]["resourceVersion"], "7");
        assert_eq!(e.object()["spec"]["containers"], serde_json::json!([]));
    }

    #[test]
    fn snapshots_are_kept_for_continued_lists() {
        let c = cache(&[], 0, 5);
        let mut snap = Snapshot::new();
        snap.insert(
            "/registry/pods/default/a".into(),
            change(3, "a", false).object.clone(),
        );
        c.keep(4, snap);
        assert_eq!(c.snapshot_at(4).map(|s| s.len()), Some(1));
        assert_eq!(
            c.snapshot_at(5).map(|s| s.len()),
            Some(0),
            "the current state"
        );
        assert!(c.snapshot_at(3).is_none(), "never kept");
        for r in 10..10 + KEEP as i64 {
            c.keep(r, Snapshot::new());
        }
        assert!(c.snapshot_at(4).is_none(), "the oldest gives way");
    }
}
