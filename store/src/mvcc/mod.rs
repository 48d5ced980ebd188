//! The MVCC key-value state: etcd's revision semantics on RocksDB column families.
//!
//! Owns the `kv`, `rev` and `meta` column families. Reads run at a revision without locks: a
//! revision becomes visible (the `current` counter moves) only after its WriteBatch is in the
//! database, and everything newer is filtered out by revision. Writes happen only through
//! [`apply::Applier`], driven by the Raft state machine.

pub mod apply;
pub mod compactor;
pub mod keys;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use flotilla_proto::etcdserverpb::{range_request, RangeRequest, RangeResponse, ResponseHeader};
use flotilla_proto::mvccpb::{event::EventType, Event, KeyValue};
use rocksdb::{ColumnFamily, WriteBatch, DB};
use tokio::sync::{broadcast, watch};

use crate::auth::AuthState;
use crate::error::{EtcdError, StorageError};
use keys::*;

pub const CF_KV: &str = "kv";
pub const CF_REV: &str = "rev";
pub const CF_META: &str = "meta";

/// How many revisions of events the in-memory fan-out holds for watchers that are behind;
/// a watcher further behind catches up from the `rev` family instead.
const EVENT_FANOUT_CAPACITY: usize = 4096;

/// The events of one revision, as published to watchers once durable in the state machine.
/// An event carries its `prev_kv` when the apply path had it at hand (a delete, a put that
/// asked for it); a watcher that wants it otherwise reads it with [`Mvcc::prev_kv_of`].
#[derive(Debug)]
pub struct RevisionEvents {
    pub revision: i64,
    pub events: Vec<Event>,
}

pub struct Mvcc {
    db: Arc<DB>,
    current: AtomicI64,
    compacted: AtomicI64,
    events: broadcast::Sender<Arc<RevisionEvents>>,
    /// The compaction revision the compactor should reach; the compactor reports progress on
    /// `compact_done`.
    compact_target: watch::Sender<i64>,
    compact_done: watch::Sender<i64>,
    /// Raised alarms (member id, alarm type), as the applied state holds them.
    alarms: std::sync::RwLock<Vec<(u64, i32)>>,
    /// Users, roles and permissions, as the applied state holds them.
    auth: std::sync::RwLock<Arc<AuthState>>,
    /// On-disk size (bytes) as last measured by `refresh_size`.
    size: AtomicI64,
    in_use: AtomicI64,
    /// The newest version of keys the apply path wrote lately.
    latest: std::sync::Mutex<LatestCache>,
}

/// A key's newest version without its value: what a put needs to know of the version it
/// replaces (the value only when the put asks for `prev_kv` or `ignore_value`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub mod_revision: i64,
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
}

impl Head {
    pub(crate) fn of(mod_revision: i64, record: &KvRecord) -> Head {
        Head {
            mod_revision,
            create_revision: record.create_revision,
            version: record.version,
            lease: record.lease,
        }
    }
}

/// The newest version (`None`: deleted) of keys the apply path wrote lately, without values.
/// A put or delete reads its key's current version from here instead of seeking the `kv`
/// family through every memtable and level. Only the apply path uses it: it is updated after
/// each group's write and cleared when a snapshot install replaces the state. Compaction
/// never removes a live newest version (a deleted key only loses its tombstone), so it never
/// makes an entry wrong. Values stay out: a put reads the value it replaces only when it
/// asks for it. Without them an entry of a 16-byte key costs about 120 bytes, so the cache
/// holds some 250k keys where with 256-byte values it held a third as many, and no put
/// copies the old value out.
#[derive(Default)]
pub(crate) struct LatestCache {
    entries: HashMap<Vec<u8>, Option<Head>>,
    bytes: usize,
}

#[cfg(test)]
mod latest_cache_tests {
    use super::*;

    fn head(rev: i64) -> Option<Head> {
        Some(Head {
            mod_revision: rev,
            create_revision: rev,
            version: 1,
            lease: 0,
        })
    }

    /// The cache stays within its byte bound, forgets what it drops, and a newer write
    /// replaces an older one.
    #[test]
    fn the_latest_cache_is_bounded_and_replaces_versions() {
        let mut cache = LatestCache::default();
        for i in 0..600_000i64 {
            cache.insert(format!("key-{i}").into_bytes(), head(i));
            assert!(cache.bytes <= LATEST_CACHE_BYTES);
        }
        let accounted: usize = cache
            .entries
            .iter()
            .map(|(k, _)| LatestCache::cost(k))
            .sum();
        assert_eq!(accounted, cache.bytes);
        assert!(cache.entries.len() > 200_000, "{}", cache.entries.len());

        cache.insert(b"a".to_vec(), head(7));
        assert_eq!(cache.get(b"a"), Some(head(7)));
        cache.insert(b"a".to_vec(), None);
        assert_eq!(cache.get(b"a"), Some(None));
    }
}

/// Reads key versions with one iterator until anything writes to the database: the apply
/// path looks up the keys of many commands between two writes, and an iterator made for
/// each lookup was a fifth of the apply path's CPU under puts of new keys (entries of 256
/// puts: 8.2 → 6.6 µs a put). An iterator sees the database as it was when it was made; the
/// database's sequence number moves with every write (the compactor's too), and a lookup
/// after one makes a new iterator.
pub(crate) struct KvReader<'a> {
    mvcc: &'a Mvcc,
    /// The iterator, and the sequence number read before it was made.
    it: std::cell::RefCell<Option<(u64, rocksdb::DBRawIterator<'a>)>>,
}

/// Where the apply path reads key versions from the database. A trait object rather than
/// `&KvReader<'a>`: the reader's iterator borrows the database for as long as the `Mvcc`
/// borrow, and an `Applier` holding it directly would keep the entry's group borrowed for
/// that long too, so the group could not take the next command's writes.
pub(crate) trait VersionReader {
    /// What [`Mvcc::get_record`] answers.
    fn get_record(
        &self,
        key: &[u8],
        revision: i64,
    ) -> Result<Option<(i64, KvRecord)>, StorageError>;
}

impl VersionReader for KvReader<'_> {
    fn get_record(
        &self,
        key: &[u8],
        revision: i64,
    ) -> Result<Option<(i64, KvRecord)>, StorageError> {
        // Read before the iterator is made: a write in between leaves the iterator newer
        // than its number, never older, and only costs the next lookup a new iterator.
        let sequence = self.mvcc.db.latest_sequence_number();
        let mut slot = self.it.borrow_mut();
        let it = match &mut *slot {
            Some((made, it)) if *made == sequence => it,
            _ => &mut slot.insert((sequence, self.mvcc.versions_iterator())).1,
        };
        let found = Mvcc::seek_record(it, key, revision);
        if found.is_err() {
            // The next lookup starts from a new iterator, not one in an error state.
            *slot = None;
        }
        found
    }
}

/// Bytes the latest-version cache holds at most, its map's overhead counted.
const LATEST_CACHE_BYTES: usize = 32 << 20;

impl LatestCache {
    fn cost(key: &[u8]) -> usize {
        // The map's own overhead per entry, roughly, and the head.
        64 + std::mem::size_of::<Option<Head>>() + key.len()
    }

    fn get(&self, key: &[u8]) -> Option<Option<Head>> {
        self.entries.get(key).copied()
    }

    fn insert(&mut self, key: Vec<u8>, head: Option<Head>) {
        // One hash of the key whether it is new or replaced.
        match self.entries.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                e.insert(head);
                return;
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                self.bytes += Self::cost(e.key());
                e.insert(head);
            }
        }
        if self.bytes > LATEST_CACHE_BYTES {
            // Drop a quarter, in the map's (arbitrary) order.
            let mut excess = self.bytes - LATEST_CACHE_BYTES * 3 / 4;
            let mut freed = 0;
            self.entries.retain(|k, _| {
                if excess == 0 {
                    return true;
                }
                let c = Self::cost(k);
                excess = excess.saturating_sub(c);
                freed += c;
                false
            });
            self.bytes -= freed;
        }
    }
}

/// Alarm types (etcd's `AlarmType`).
pub const ALARM_NOSPACE: i32 = 1;
pub const ALARM_CORRUPT: i32 = 2;

/// Read options for an iterator that walks keys in order across user keys. The kv family's
/// prefix filters would otherwise let an iterator skip files that hold later keys.
pub(crate) fn total_order() -> rocksdb::ReadOptions {
    let mut read = rocksdb::ReadOptions::default();
    read.set_total_order_seek(true);
    read
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StorageError> {
    bincode::deserialize(bytes).map_err(|e| StorageError::Corrupt {
        what,
        detail: e.to_string(),
    })
}

/// The `version` field of an encoded `KvRecord` (bincode: create_revision, then version,
/// each 8 bytes little-endian) without decoding the rest; 0 marks a tombstone.
fn raw_version(raw: &[u8]) -> Option<i64> {
    let bytes: [u8; 8] = raw.get(8..16)?.try_into().ok()?;
    Some(i64::from_le_bytes(bytes))
}

pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    bincode::serialize(value).expect("bincode encoding of in-memory records cannot fail")
}

pub fn to_key_value(key: Vec<u8>, mod_revision: i64, record: KvRecord) -> KeyValue {
    KeyValue {
        key,
        create_revision: record.create_revision,
        mod_revision,
        version: record.version,
        value: record.value,
        lease: record.lease,
    }
}

/// The end of a range in etcd's terms: empty means the single key, `\0` means no upper bound.
#[derive(Debug, Clone, Copy)]
pub enum RangeEnd<'a> {
    Single,
    Unbounded,
    Before(&'a [u8]),
}

impl<'a> RangeEnd<'a> {
    pub fn of(range_end: &'a [u8]) -> RangeEnd<'a> {
        match range_end {
            [] => RangeEnd::Single,
            [0] => RangeEnd::Unbounded,
            end => RangeEnd::Before(end),
        }
    }

    pub fn contains(&self, start: &[u8], key: &[u8]) -> bool {
        match self {
            RangeEnd::Single => key == start,
            RangeEnd::Unbounded => key >= start,
            RangeEnd::Before(end) => key >= start && key < *end,
        }
    }
}

impl Mvcc {
    pub fn column_families() -> [&'static str; 3] {
        [CF_KV, CF_REV, CF_META]
    }

    pub fn open(db: Arc<DB>) -> Result<Arc<Mvcc>, StorageError> {
        let meta = db
            .cf_handle(CF_META)
            .expect("meta column family is created at open");
        let read_i64 = |key: &[u8], default: i64| -> Result<i64, StorageError> {
            Ok(match db.get_cf(meta, key)? {
                Some(v) => decode::<i64>("meta", &v)?,
                None => default,
            })
        };
        let current = read_i64(META_REVISION, 1)?;
        let compacted = read_i64(META_COMPACT, 0)?;
        let compact_done = read_i64(META_COMPACT_DONE, 0)?;
        let (events, _) = broadcast::channel(EVENT_FANOUT_CAPACITY);
        let mvcc = Arc::new(Mvcc {
            db,
            current: AtomicI64::new(current),
            compacted: AtomicI64::new(compacted),
            events,
            compact_target: watch::Sender::new(compacted),
            compact_done: watch::Sender::new(compact_done),
            alarms: std::sync::RwLock::new(Vec::new()),
            auth: std::sync::RwLock::new(Arc::new(AuthState::initial())),
            size: AtomicI64::new(0),
            in_use: AtomicI64::new(0),
            latest: Default::default(),
        });
        mvcc.load_alarms()?;
        mvcc.load_auth()?;
        mvcc.refresh_size();
        Ok(mvcc)
    }

    fn load_alarms(&self) -> Result<(), StorageError> {
        let mut out = Vec::new();
        let mut it = self.db.raw_iterator_cf(self.cf(CF_META));
        it.seek(META_ALARM_PREFIX);
        while let Some(k) = it.key() {
            let Some(rest) = k.strip_prefix(META_ALARM_PREFIX) else {
                break;
            };
            let (member, alarm) = match (rest.get(..8), rest.get(8..12)) {
                (Some(m), Some(a)) if rest.len() == 12 => (
                    u64::from_be_bytes(m.try_into().unwrap_or_default()),
                    i32::from_be_bytes(a.try_into().unwrap_or_default()),
                ),
                _ => {
                    return Err(StorageError::Corrupt {
                        what: "alarm key",
                        detail: format!("{k:?}"),
                    })
                }
            };
            out.push((member, alarm));
            it.next();
        }
        it.status()?;
        self.set_alarms(out);
        Ok(())
    }

    fn load_auth(&self) -> Result<(), StorageError> {
        let state = match self.meta_get(META_AUTH)? {
            Some(v) => AuthState::new(decode("auth", &v)?),
            None => AuthState::initial(),
        };
        self.set_auth(Arc::new(state));
        Ok(())
    }

    fn set_auth(&self, state: Arc<AuthState>) {
        *self.auth.write().unwrap_or_else(|p| p.into_inner()) = state;
    }

    /// The auth state as of the last applied command.
    pub fn auth(&self) -> Arc<AuthState> {
        self.auth.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_alarms(&self, alarms: Vec<(u64, i32)>) {
        *self.alarms.write().unwrap_or_else(|p| p.into_inner()) = alarms;
    }

    /// Raised alarms: (member id, alarm type).
    pub fn alarms(&self) -> Vec<(u64, i32)> {
        self.alarms
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether an alarm of this type is raised for any member.
    fn alarm_raised(&self, alarm: i32) -> bool {
        self.alarms
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(_, a)| *a == alarm)
    }

    /// Whether a NOSPACE alarm is raised anywhere in the cluster: writes that add data are
    /// refused until it is disarmed.
    pub fn nospace(&self) -> bool {
        self.alarm_raised(ALARM_NOSPACE)
    }

    /// Whether a CORRUPT alarm is raised: the cluster refuses writes until it is disarmed.
    pub fn corrupt(&self) -> bool {
        self.alarm_raised(ALARM_CORRUPT)
    }

    /// Measures the on-disk size of the data (SST files and memtables of `kv` and `rev`) and
    /// the part of it that is live; `size()` then answers from the measurement.
    pub fn refresh_size(&self) -> (i64, i64) {
        let prop = |name: &str| -> i64 {
            [CF_KV, CF_REV]
                .iter()
                .filter_map(|cf| {
                    self.db
                        .property_int_value_cf(self.cf(cf), name)
                        .ok()
                        .flatten()
                })
                .sum::<u64>() as i64
        };
        let total = prop("rocksdb.total-sst-files-size") + prop("rocksdb.cur-size-all-mem-tables");
        let live =
            prop("rocksdb.estimate-live-data-size") + prop("rocksdb.cur-size-all-mem-tables");
        let live = live.min(total);
        self.size.store(total, Ordering::Release);
        self.in_use.store(live, Ordering::Release);
        (total, live)
    }

    /// Rewrites every family in full (RocksDB manual compaction), dropping deleted data.
    pub fn compact_storage(&self) {
        for name in Self::column_families() {
            let mut opts = rocksdb::CompactOptions::default();
            opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
            opts.set_exclusive_manual_compaction(false);
            self.db
                .compact_range_cf_opt(self.cf(name), None::<&[u8]>, None::<&[u8]>, &opts);
        }
    }

    /// (on-disk size, size in use) as last measured.
    pub fn size(&self) -> (i64, i64) {
        (
            self.size.load(Ordering::Acquire),
            self.in_use.load(Ordering::Acquire),
        )
    }

    pub(crate) fn db(&self) -> &DB {
        &self.db
    }

    pub(crate) fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    /// The newest revision whose changes are readable.
    pub fn current_revision(&self) -> i64 {
        self.current.load(Ordering::Acquire)
    }

    /// Revisions below this one are compacted and can no longer be read or watched.
    pub fn compact_revision(&self) -> i64 {
        self.compacted.load(Ordering::Acquire)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<RevisionEvents>> {
        self.events.subscribe()
    }

    pub fn compaction_progress(&self) -> watch::Receiver<i64> {
        self.compact_done.subscribe()
    }

    /// Checks a requested read revision against the compacted and current revisions;
    /// `revision <= 0` means the current one.
    pub fn resolve_revision(&self, revision: i64) -> Result<i64, EtcdError> {
        let current = self.current_revision();
        if revision <= 0 {
            return Ok(current);
        }
        if revision > current {
            return Err(EtcdError::FutureRevision);
        }
        if revision < self.compact_revision() {
            return Err(EtcdError::Compacted);
        }
        Ok(revision)
    }

    /// The version of `key` visible at `revision` (tombstones included).
    pub fn get_record(
        &self,
        key: &[u8],
        revision: i64,
    ) -> Result<Option<(i64, KvRecord)>, StorageError> {
        Self::seek_record(&mut self.versions_iterator(), key, revision)
    }

    /// An iterator for reading one key's versions: the prefix filters skip what never held
    /// the key.
    fn versions_iterator(&self) -> rocksdb::DBRawIterator<'_> {
        let mut read = rocksdb::ReadOptions::default();
        read.set_prefix_same_as_start(true);
        self.db.raw_iterator_cf_opt(self.cf(CF_KV), read)
    }

    /// A reader of key versions for the commands of one entry (see [`KvReader`]).
    pub(crate) fn reader(&self) -> KvReader<'_> {
        KvReader {
            mvcc: self,
            it: std::cell::RefCell::new(None),
        }
    }

    fn seek_record(
        it: &mut rocksdb::DBRawIterator<'_>,
        key: &[u8],
        revision: i64,
    ) -> Result<Option<(i64, KvRecord)>, StorageError> {
        it.seek(kv_key(key, revision));
        if let (Some(k), Some(v)) = (it.key(), it.value()) {
            if let Some((user_key, rev)) = decode_kv_key(k) {
                if user_key == key {
                    return Ok(Some((rev, decode("kv", v)?)));
                }
            }
        }
        it.status()?;
        Ok(None)
    }

    /// The live value of `key` at `revision`, if any.
    pub fn get(&self, key: &[u8], revision: i64) -> Result<Option<KeyValue>, StorageError> {
        Ok(self
            .get_record(key, revision)?
            .filter(|(_, r)| !r.is_tombstone())
            .map(|(rev, r)| to_key_value(key.to_vec(), rev, r)))
    }

    /// Visits every live key in `[key, end)` at `revision`, in key order.
    pub fn scan(
        &self,
        key: &[u8],
        end: RangeEnd<'_>,
        revision: i64,
        visit: &mut dyn FnMut(Vec<u8>, i64, KvRecord) -> ControlFlow<()>,
    ) -> Result<(), StorageError> {
        self.scan_raw(key, end, revision, &mut |k, rev, raw| {
            if raw_version(raw) == Some(0) {
                return Ok(ControlFlow::Continue(()));
            }
            let record: KvRecord = decode("kv", raw)?;
            if record.is_tombstone() {
                return Ok(ControlFlow::Continue(()));
            }
            Ok(visit(k, rev, record))
        })
    }

    /// Visits the version of every key in `[key, end)` visible at `revision` (tombstones
    /// too), undecoded: callers that only count need not copy values.
    fn scan_raw(
        &self,
        key: &[u8],
        end: RangeEnd<'_>,
        revision: i64,
        visit: &mut dyn FnMut(Vec<u8>, i64, &[u8]) -> Result<ControlFlow<()>, StorageError>,
    ) -> Result<(), StorageError> {
        if let RangeEnd::Single = end {
            if let Some((rev, record)) = self.get_record(key, revision)? {
                let raw = encode(&record);
                let _ = visit(key.to_vec(), rev, &raw)?;
            }
            return Ok(());
        }
        if let RangeEnd::Before(e) = end {
            if e <= key {
                return Ok(());
            }
        }
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_KV), total_order());
        it.seek(seek_key(key));
        while let Some(k) = it.key() {
            let Some((user_key, rev)) = decode_kv_key(k) else {
                return Err(StorageError::Corrupt {
                    what: "kv key",
                    detail: format!("{k:?}"),
                });
            };
            if !end.contains(key, &user_key) {
                break;
            }
            if rev > revision {
                it.seek(kv_key(&user_key, revision));
                continue; // re-examine: either this key at an older revision, or the next key
            }
            let flow = visit(user_key.clone(), rev, it.value().unwrap_or_default())?;
            if let ControlFlow::Break(()) = flow {
                return Ok(());
            }
            // Older versions usually sit right behind; step before seeking.
            let mut stepped = 0;
            loop {
                it.next();
                match it.key().and_then(decode_kv_key) {
                    Some((next_key, _)) if next_key == user_key && stepped < 4 => stepped += 1,
                    Some((next_key, _)) if next_key == user_key => {
                        it.seek(past_key(&user_key));
                        break;
                    }
                    _ => break,
                }
            }
        }
        it.status()?;
        Ok(())
    }

    /// Serves a Range request at an already resolved revision.
    pub fn range(&self, req: &RangeRequest, revision: i64) -> Result<RangeResponse, EtcdError> {
        let plan = RangePlan::of(req);
        let mut kvs = Vec::new();
        let mut count = 0i64;
        if let RangeEnd::Single = RangeEnd::of(&req.range_end) {
            if let Some((rev, record)) = self.get_record(&req.key, revision)? {
                if !record.is_tombstone() {
                    count = 1;
                    if !plan.count_only && plan.wants(rev, &record) {
                        kvs.push(to_key_value(req.key.clone(), rev, record));
                    }
                }
            }
            return Ok(plan.finish(kvs, count, revision));
        }
        // Every live key is counted (the response's `count`); only those returned are
        // decoded: past the limit a key costs a look at its version field.
        self.scan_raw(
            &req.key,
            RangeEnd::of(&req.range_end),
            revision,
            &mut |key, rev, raw| {
                match raw_version(raw) {
                    Some(0) => return Ok(ControlFlow::Continue(())),
                    Some(_) => {}
                    // Too short to be a record: decoding it reports the corruption.
                    None => {
                        let _: KvRecord = decode("kv", raw)?;
                    }
                }
                if plan.count_only || plan.enough(kvs.len()) {
                    count += 1;
                    return Ok(ControlFlow::Continue(()));
                }
                let record: KvRecord = decode("kv", raw)?;
                if record.is_tombstone() {
                    return Ok(ControlFlow::Continue(()));
                }
                count += 1;
                if plan.wants(rev, &record) {
                    kvs.push(to_key_value(key, rev, record));
                }
                Ok(ControlFlow::Continue(()))
            },
        )?;
        Ok(plan.finish(kvs, count, revision))
    }

    /// The events of revisions `[from, to]`, at most about `limit` events (whole revisions).
    pub fn events_between(
        &self,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<Vec<RevisionEvents>, StorageError> {
        let mut out: Vec<RevisionEvents> = Vec::new();
        let mut total = 0usize;
        let mut it = self.db.raw_iterator_cf(self.cf(CF_REV));
        it.seek(rev_key(from, 0));
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let Some((rev, _sub)) = decode_rev_key(k) else {
                return Err(StorageError::Corrupt {
                    what: "rev key",
                    detail: format!("{k:?}"),
                });
            };
            if rev > to {
                break;
            }
            let is_new_revision = out.last().map(|r| r.revision != rev).unwrap_or(true);
            if is_new_revision {
                if total >= limit {
                    break;
                }
                out.push(RevisionEvents {
                    revision: rev,
                    events: Vec::new(),
                });
            }
            let record: EventRecord = decode("rev", v)?;
            let event = self.event_at(record, rev)?;
            out.last_mut().expect("pushed above").events.push(event);
            total += 1;
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// The version `event`'s key held before it, for a watcher that asks for `prev_kv` of a
    /// live event the apply path sent without it: read at the revision before, as etcd's
    /// watch reads it. Nothing when the event made the key, or when a compaction has since
    /// removed that version (etcd leaves it out then too).
    pub fn prev_kv_of(&self, event: &Event) -> Option<KeyValue> {
        let kv = event.kv.as_ref()?;
        let put = event.r#type == EventType::Put as i32;
        if event.prev_kv.is_some() || (put && kv.create_revision == kv.mod_revision) {
            return event.prev_kv.clone();
        }
        match self.get(&kv.key, kv.mod_revision - 1) {
            Ok(prev) => prev,
            Err(e) => {
                tracing::warn!(error = %e, revision = kv.mod_revision, "reading a watch event's prev_kv");
                None
            }
        }
    }

    fn event_at(&self, record: EventRecord, revision: i64) -> Result<Event, StorageError> {
        let prev_kv = self.get(&record.key, revision - 1)?;
        let kv = match record.kind {
            EventKind::Put => match self.get_record(&record.key, revision)? {
                Some((rev, r)) if rev == revision => to_key_value(record.key, rev, r),
                _ => {
                    return Err(StorageError::Corrupt {
                        what: "rev",
                        detail: format!("event at revision {revision} has no value"),
                    })
                }
            },
            EventKind::Delete => KeyValue {
                key: record.key,
                mod_revision: revision,
                ..Default::default()
            },
        };
        let kind = match record.kind {
            EventKind::Put => EventType::Put,
            EventKind::Delete => EventType::Delete,
        };
        Ok(Event {
            r#type: kind as i32,
            kv: Some(kv),
            prev_kv,
        })
    }

    /// A hash of the key-value history visible at `revision`, equal on every member that
    /// applied the same log, whatever its physical compaction has reached: every version
    /// above the compaction revision, plus each key's newest live version at or below it.
    /// Returns the hash and the compaction revision it assumed.
    pub fn hash_kv(&self, revision: i64) -> Result<(u32, i64), StorageError> {
        // Snapshot first, then the compaction revision: any deletion the snapshot shows
        // belongs to a compaction at or below the revision read.
        let snapshot = self.db.snapshot();
        let compacted = self.compact_revision();
        let mut hasher = crc32fast::Hasher::new();
        let mut it = snapshot.raw_iterator_cf_opt(self.cf(CF_KV), total_order());
        it.seek_to_first();
        let mut current_key: Option<Vec<u8>> = None;
        let mut seen_at_or_below = false;
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let Some((user_key, rev)) = decode_kv_key(k) else {
                return Err(StorageError::Corrupt {
                    what: "kv key",
                    detail: format!("{k:?}"),
                });
            };
            if current_key.as_deref() != Some(user_key.as_slice()) {
                current_key = Some(user_key);
                seen_at_or_below = false;
            }
            let include = if rev > revision {
                false
            } else if rev > compacted {
                true
            } else if !seen_at_or_below {
                seen_at_or_below = true;
                !decode::<KvRecord>("kv", v)?.is_tombstone()
            } else {
                false
            };
            if include {
                hasher.update(k);
                hasher.update(v);
            }
            it.next();
        }
        it.status()?;
        Ok((hasher.finalize(), compacted))
    }

    pub fn lease(&self, id: i64) -> Result<Option<LeaseRecord>, StorageError> {
        match self.db.get_cf(self.cf(CF_META), lease_meta_key(id))? {
            Some(v) => Ok(Some(decode("lease", &v)?)),
            None => Ok(None),
        }
    }

    /// Every lease the state machine holds, with its granted TTL.
    pub fn leases(&self) -> Result<Vec<(i64, LeaseRecord)>, StorageError> {
        let mut out = Vec::new();
        let mut it = self.db.raw_iterator_cf(self.cf(CF_META));
        it.seek(META_LEASE_PREFIX);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let Some(id) = k.strip_prefix(META_LEASE_PREFIX) else {
                break;
            };
            let id: [u8; 8] = id.try_into().map_err(|_| StorageError::Corrupt {
                what: "lease key",
                detail: format!("{k:?}"),
            })?;
            out.push((i64::from_be_bytes(id), decode("lease", v)?));
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Remaining TTLs a leader checkpointed, by lease: what a new leader starts from.
    pub fn lease_checkpoints(&self) -> Result<HashMap<i64, i64>, StorageError> {
        let mut out = HashMap::new();
        let mut it = self.db.raw_iterator_cf(self.cf(CF_META));
        it.seek(META_LEASE_CHECKPOINT_PREFIX);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let Some(id) = k.strip_prefix(META_LEASE_CHECKPOINT_PREFIX) else {
                break;
            };
            let corrupt = || StorageError::Corrupt {
                what: "lease checkpoint",
                detail: format!("{k:?}"),
            };
            let id: [u8; 8] = id.try_into().map_err(|_| corrupt())?;
            let remaining: [u8; 8] = v.try_into().map_err(|_| corrupt())?;
            out.insert(i64::from_be_bytes(id), i64::from_be_bytes(remaining));
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// The keys attached to lease `id`.
    pub fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>, StorageError> {
        let prefix = lease_key_prefix(id);
        let mut out = Vec::new();
        let mut it = self.db.raw_iterator_cf(self.cf(CF_META));
        it.seek(&prefix);
        while let Some(k) = it.key() {
            let Some(user_key) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            out.push(user_key.to_vec());
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    pub fn meta_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.get_cf(self.cf(CF_META), key)?)
    }

    /// Writes a [`apply::Group`]'s batch (plus whatever the caller added to it) and then, for
    /// each command in order, makes its revision visible and publishes its events.
    pub fn commit(
        &self,
        batch: WriteBatch,
        outcomes: Vec<apply::Outcome>,
    ) -> Result<(), StorageError> {
        self.db.write_without_wal_sync(batch)?;
        for outcome in outcomes {
            self.publish(outcome);
        }
        Ok(())
    }

    /// [`Self::commit`] for a group of commands, then remembers the newest version of every key
    /// the group wrote (see [`LatestCache`]).
    pub fn commit_group(
        &self,
        batch: WriteBatch,
        outcomes: Vec<apply::Outcome>,
        latest: impl IntoIterator<Item = (Vec<u8>, Option<(i64, KvRecord)>)>,
    ) -> Result<(), StorageError> {
        self.commit(batch, outcomes)?;
        let mut cache = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        for (key, version) in latest {
            cache.insert(key, version.map(|(rev, r)| Head::of(rev, &r)));
        }
        Ok(())
    }

    /// The newest version of `key` (`Some(None)`: deleted) if the apply path wrote it lately.
    pub(crate) fn cached_latest(&self, key: &[u8]) -> Option<Option<Head>> {
        self.latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
    }

    fn publish(&self, outcome: apply::Outcome) {
        if let Some(revision) = outcome.revision {
            self.current.store(revision, Ordering::Release);
            if !outcome.events.is_empty() {
                // No receiver is fine: nobody watches.
                let _ = self.events.send(Arc::new(RevisionEvents {
                    revision,
                    events: outcome.events,
                }));
            }
        }
        if let Some(compact) = outcome.compaction {
            self.compacted.store(compact, Ordering::Release);
            self.compact_target.send_replace(compact);
        }
        if let Some(alarms) = outcome.alarms {
            self.set_alarms(alarms);
        }
        if let Some(auth) = outcome.auth {
            self.set_auth(auth);
        }
    }

    /// Reloads the counters after the whole state was replaced (a Raft snapshot install).
    pub(crate) fn reload(&self) -> Result<(), StorageError> {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = LatestCache::default();
        let meta = self.cf(CF_META);
        let get = |key: &[u8], default: i64| -> Result<i64, StorageError> {
            Ok(match self.db.get_cf(meta, key)? {
                Some(v) => decode::<i64>("meta", &v)?,
                None => default,
            })
        };
        self.current
            .store(get(META_REVISION, 1)?, Ordering::Release);
        let compacted = get(META_COMPACT, 0)?;
        self.compacted.store(compacted, Ordering::Release);
        // What the new state's own physical compaction reached, so the compactor finishes
        // it rather than take the replaced state's progress for it.
        self.compact_done.send_replace(get(META_COMPACT_DONE, 0)?);
        self.compact_target.send_replace(compacted);
        self.load_alarms()?;
        self.load_auth()?;
        Ok(())
    }

    pub(crate) fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            revision,
            ..Default::default()
        })
    }
}

trait WriteWithoutSync {
    fn write_without_wal_sync(&self, batch: WriteBatch) -> Result<(), rocksdb::Error>;
}

impl WriteWithoutSync for DB {
    fn write_without_wal_sync(&self, batch: WriteBatch) -> Result<(), rocksdb::Error> {
        // The Raft log is the durable record; a state-machine batch lost in a crash is applied
        // again from the log, and the applied index travels in the same batch.
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(false);
        self.write_opt(batch, &opts)
    }
}

/// What a Range request asks beyond the key range: filters, order, limit.
pub(crate) struct RangePlan {
    limit: usize,
    sort: Option<(range_request::SortTarget, bool)>,
    filtered: bool,
    min_mod: i64,
    max_mod: i64,
    min_create: i64,
    max_create: i64,
    keys_only: bool,
    count_only: bool,
}

impl RangePlan {
    pub(crate) fn of(req: &RangeRequest) -> RangePlan {
        use range_request::{SortOrder, SortTarget};
        let target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
        let order = SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None);
        // As etcd: no order with a target other than the key means ascending; ascending by key
        // is the natural order.
        let sort = match (order, target) {
            (SortOrder::None, SortTarget::Key) | (SortOrder::Ascend, SortTarget::Key) => None,
            (SortOrder::None, t) | (SortOrder::Ascend, t) => Some((t, true)),
            (SortOrder::Descend, t) => Some((t, false)),
        };
        RangePlan {
            limit: if req.limit > 0 { req.limit as usize } else { 0 },
            sort,
            filtered: req.min_mod_revision > 0
                || req.max_mod_revision > 0
                || req.min_create_revision > 0
                || req.max_create_revision > 0,
            min_mod: req.min_mod_revision,
            max_mod: req.max_mod_revision,
            min_create: req.min_create_revision,
            max_create: req.max_create_revision,
            keys_only: req.keys_only,
            count_only: req.count_only,
        }
    }

    pub(crate) fn wants(&self, mod_revision: i64, record: &KvRecord) -> bool {
        !(self.min_mod > 0 && mod_revision < self.min_mod
            || self.max_mod > 0 && mod_revision > self.max_mod
            || self.min_create > 0 && record.create_revision < self.min_create
            || self.max_create > 0 && record.create_revision > self.max_create)
    }

    /// Whether enough values are gathered: one past the limit tells `more`, unless the
    /// result still has to be sorted.
    pub(crate) fn enough(&self, gathered: usize) -> bool {
        self.limit > 0 && self.sort.is_none() && gathered > self.limit
    }

    pub(crate) fn finish(
        &self,
        mut kvs: Vec<KeyValue>,
        count: i64,
        revision: i64,
    ) -> RangeResponse {
        use range_request::SortTarget;
        if let Some((target, ascending)) = self.sort {
            let key = |kv: &KeyValue| -> (i64, Vec<u8>) {
                match target {
                    SortTarget::Key => (0, kv.key.clone()),
                    SortTarget::Version => (kv.version, Vec::new()),
                    SortTarget::Create => (kv.create_revision, Vec::new()),
                    SortTarget::Mod => (kv.mod_revision, Vec::new()),
                    SortTarget::Value => (0, kv.value.clone()),
                }
            };
            kvs.sort_by_key(key); // stable: ties stay in key order, as etcd's
            if !ascending {
                kvs.reverse();
            }
        }
        let mut more = false;
        if self.limit > 0 && kvs.len() > self.limit {
            kvs.truncate(self.limit);
            more = true;
        }
        if self.keys_only {
            for kv in &mut kvs {
                kv.value.clear();
            }
        }
        let _ = self.filtered;
        RangeResponse {
            header: Some(ResponseHeader {
                revision,
                ..Default::default()
            }),
            kvs,
            more,
            count,
        }
    }
}
