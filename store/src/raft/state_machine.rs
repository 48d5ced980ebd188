//! The Raft state machine: applies committed entries to the MVCC store, and builds and
//! installs snapshots.
//!
//! The applied log id and membership are written in the same WriteBatch as the changes of the
//! entry they describe, so replaying the log after a crash is idempotent.
//!
//! Building a snapshot copies nothing: it is a RocksDB checkpoint (`snap/ckpt-<term>-<index>`,
//! hard links to the database's table files, made after a memtable flush), and
//! `snap/current.snap` holds only its meta. The records a follower needs are written out
//! from the checkpoint when a leader first sends it ([`StateMachine::sendable`]): one file,
//! `snap/send-<term>-<index>.snap`, its meta then every record of the `kv`, `rev` and `meta`
//! families, streamed to and from disk (never held in memory) and sent in chunks. A member
//! that installs a received file keeps that file as its current snapshot.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use flotilla_proto::etcdserverpb::{request_op, TxnRequest};
use flotilla_proto::flotillapb::{
    command, command_result, BatchResult, Command, CommandBatch, CommandResult, Empty, Error,
};
use futures::StreamExt;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use openraft_legacy::network_v1::SnapshotReceiverFactory;
use prost::Message;
use rocksdb::{WriteBatch, DB};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{
    io_error, read_error, Entry, LogId, RaftResponse, Snapshot, SnapshotMeta, StoredMembership,
    TypeConfig,
};
use crate::error::EtcdError;
use crate::lease::LeaseKeeper;
use crate::mvcc::apply::{Applier, Group};
use crate::mvcc::keys::{
    member_meta_key, META_APPLIED, META_APPLIED_PARTIAL, META_COMPACT_DONE, META_MEMBERSHIP,
    META_REVISION,
};
use crate::mvcc::{decode, encode, Mvcc, CF_KV, CF_META, CF_REV};

/// Whether a command reads and writes only keys: a put, delete or txn that attaches no
/// lease (the permission check of a put with a lease reads the lease's attached keys from
/// the database). Such commands of one entry are written together.
fn is_key_value(command: &Command) -> bool {
    fn txn_attaches(t: &TxnRequest) -> bool {
        t.success
            .iter()
            .chain(&t.failure)
            .any(|op| match &op.request {
                Some(request_op::Request::RequestPut(p)) => p.lease != 0,
                Some(request_op::Request::RequestTxn(t)) => txn_attaches(t),
                _ => false,
            })
    }
    match &command.request {
        Some(command::Request::Put(p)) => p.lease == 0,
        Some(command::Request::DeleteRange(_)) => true,
        Some(command::Request::Txn(t)) => !txn_attaches(t),
        _ => false,
    }
}

/// Attributes a member publishes through Raft once it runs (etcd's "publish").
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberAttributes {
    pub name: String,
    pub client_urls: Vec<String>,
}

#[derive(Clone)]
pub struct StateMachine {
    mvcc: Arc<Mvcc>,
    leases: Arc<LeaseKeeper>,
    snapshot_dir: PathBuf,
    /// Serializes replacing the current snapshot file (builds run beside installs).
    snapshot_lock: Arc<tokio::sync::Mutex<()>>,
    /// Serializes writing out checkpoints' records (two followers need one file).
    write_out_lock: Arc<tokio::sync::Mutex<()>>,
    /// Names of snapshots whose checkpoint is being read: [`Self::prune`] leaves them.
    reading: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Held for writing while an install replaces the state, for reading while a build
    /// takes its RocksDB snapshot: a build never dumps a half-loaded state.
    state_lock: Arc<std::sync::RwLock<()>>,
    /// The file the latest incoming snapshot is being written to (one per transfer, so a
    /// late write of an abandoned transfer cannot land in the next one).
    incoming: Arc<std::sync::Mutex<Option<PathBuf>>>,
    /// Commands applied since start, for the snapshot trigger (`--snapshot-count`).
    pub applied_commands: Arc<AtomicU64>,
    /// False once the state is known to hold no `applied_partial` marker (the last write
    /// finished its entry), so applying an entry need not look for one.
    partial_marker: Arc<AtomicBool>,
}

const SNAPSHOT_FAMILIES: [&str; 3] = [CF_KV, CF_REV, CF_META];

impl StateMachine {
    pub fn new(
        mvcc: Arc<Mvcc>,
        leases: Arc<LeaseKeeper>,
        snapshot_dir: PathBuf,
    ) -> std::io::Result<StateMachine> {
        std::fs::create_dir_all(&snapshot_dir)?;
        let sm = StateMachine {
            mvcc,
            leases,
            snapshot_dir,
            snapshot_lock: Arc::default(),
            write_out_lock: Arc::default(),
            reading: Arc::default(),
            state_lock: Arc::default(),
            incoming: Arc::default(),
            applied_commands: Arc::default(),
            partial_marker: Arc::new(AtomicBool::new(true)),
        };
        sm.finish_interrupted_install()?;
        // Nothing is being built or written out yet: what such work left goes too.
        sm.prune_files(true)?;
        Ok(sm)
    }

    fn install_marker(&self) -> PathBuf {
        self.snapshot_dir.join("installing")
    }

    fn sync_snapshot_dir(&self) -> std::io::Result<()> {
        std::fs::File::open(&self.snapshot_dir)?.sync_all()
    }

    /// Replaces the state with the snapshot file at `path` and records it as applied, all
    /// synced. A durable marker naming the file comes first: replacing the state is many
    /// writes, and a member that crashes among them finishes the install from the same file
    /// when it starts again ([`Self::finish_interrupted_install`]) instead of running on a
    /// half-replaced state.
    fn install_from(&self, path: &Path, meta: &SnapshotMeta) -> std::io::Result<()> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| std::io::Error::other("snapshot file name"))?;
        let marker = self.install_marker();
        let staged = self.snapshot_dir.join("installing.tmp");
        {
            let mut f = std::fs::File::create(&staged)?;
            f.write_all(name.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&staged, &marker)?;
        self.sync_snapshot_dir()?;
        // A checkpoint taken meanwhile would hold new records under the old applied id.
        let _installing = self.state_lock.write().unwrap_or_else(|e| e.into_inner());
        self.load_from(path)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.mvcc.cf(CF_META),
            META_APPLIED,
            encode(&meta.last_log_id),
        );
        batch.put_cf(
            self.mvcc.cf(CF_META),
            META_MEMBERSHIP,
            encode(&meta.last_membership),
        );
        // Synced: openraft replays the log from the applied id, and entries the snapshot
        // holds must never be applied twice.
        let mut synced = rocksdb::WriteOptions::default();
        synced.set_sync(true);
        self.db().write_opt(batch, &synced).map_err(io_error)
    }

    /// Drops the install marker once the installed file is the current snapshot.
    fn clear_install_marker(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.install_marker()) {
            Ok(()) => self.sync_snapshot_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// At start: completes a snapshot install a crash interrupted, from the received file
    /// the marker names, and removes files of transfers that never finished.
    fn finish_interrupted_install(&self) -> std::io::Result<()> {
        match std::fs::read_to_string(self.install_marker()) {
            Ok(name) => {
                let path = self.snapshot_dir.join(name.trim());
                // Gone once the install reached the rename that made it current.
                if path.try_exists()? {
                    let (meta, _) = read_snapshot_header(&mut std::io::BufReader::new(
                        std::fs::File::open(&path)?,
                    ))?;
                    tracing::warn!(
                        snapshot = %snapshot_name(&meta),
                        "a snapshot install was interrupted; finishing it"
                    );
                    self.install_from(&path, &meta)?;
                    let current = std::fs::File::open(self.data_path())
                        .and_then(|f| read_snapshot_header(&mut std::io::BufReader::new(f)));
                    match current {
                        Ok((c, _)) if c.last_log_id > meta.last_log_id => {
                            std::fs::remove_file(&path)?
                        }
                        _ => std::fs::rename(&path, self.data_path())?,
                    }
                    self.sync_snapshot_dir()?;
                }
                self.clear_install_marker()?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        for entry in std::fs::read_dir(&self.snapshot_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("incoming-") || name == "installing.tmp" {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn db(&self) -> &DB {
        self.mvcc.db()
    }

    fn data_path(&self) -> PathBuf {
        self.snapshot_dir.join("current.snap")
    }

    fn apply_command(
        &self,
        applier: &mut Applier<'_>,
        command: &Command,
    ) -> Result<command_result::Result, EtcdError> {
        use command::Request;
        use command_result::Result as R;
        if self.mvcc.corrupt() {
            let refused = matches!(
                &command.request,
                Some(
                    Request::Put(_)
                        | Request::DeleteRange(_)
                        | Request::Txn(_)
                        | Request::Compaction(_)
                        | Request::LeaseGrant(_)
                        | Request::LeaseRevoke(_)
                )
            );
            if refused {
                return Err(EtcdError::Corrupt);
            }
        }
        if self.mvcc.nospace() {
            let adds_data = match &command.request {
                Some(Request::Put(_)) | Some(Request::LeaseGrant(_)) => true,
                Some(Request::Txn(t)) => crate::mvcc::apply::txn_has_put(t),
                _ => false,
            };
            if adds_data {
                return Err(EtcdError::NoSpace);
            }
        }
        self.mvcc
            .auth()
            .check_command(command, &|lease| Ok(self.mvcc.lease_keys(lease)?))?;
        Ok(match &command.request {
            Some(Request::Put(r)) => R::Put(applier.put(r)?),
            Some(Request::DeleteRange(r)) => R::DeleteRange(applier.delete_range(r)?),
            Some(Request::Txn(r)) => R::Txn(applier.txn(r)?),
            Some(Request::Compaction(r)) => R::Compaction(applier.compact(r)?),
            Some(Request::LeaseGrant(r)) => R::LeaseGrant(applier.lease_grant(r)?),
            Some(Request::LeaseRevoke(r)) => R::LeaseRevoke(applier.lease_revoke(r)?),
            Some(Request::LeaseCheckpoint(r)) => R::LeaseCheckpoint(applier.lease_checkpoint(r)?),
            Some(Request::Alarm(r)) => R::Alarm(applier.alarm(r)?),
            Some(Request::AuthChange(c)) => {
                let change = c
                    .change
                    .as_ref()
                    .ok_or_else(|| EtcdError::Internal("empty auth change".into()))?;
                if let Some(next) = self.mvcc.auth().apply(change)? {
                    applier.set_auth(next);
                }
                R::AuthChange(Empty {})
            }
            Some(Request::MemberAttributes(a)) => {
                let attrs = MemberAttributes {
                    name: a.name.clone(),
                    client_urls: a.client_urls.clone(),
                };
                applier.put_meta(&member_meta_key(a.id), &encode(&attrs));
                R::MemberAttributes(Empty {})
            }
            None => return Err(EtcdError::Internal("empty command".into())),
        })
    }

    /// How many commands of entry `log_id` were applied before a crash cut its batch short.
    fn commands_already_applied(&self, log_id: LogId) -> Result<usize, std::io::Error> {
        if !self.partial_marker.load(Ordering::Acquire) {
            return Ok(0);
        }
        match self
            .mvcc
            .meta_get(META_APPLIED_PARTIAL)
            .map_err(read_error)?
        {
            Some(v) => {
                let (partial, done): (LogId, u64) =
                    decode("partial apply", &v).map_err(read_error)?;
                Ok(if partial == log_id { done as usize } else { 0 })
            }
            None => Ok(0),
        }
    }

    /// Applies one entry; returns what the proposer gets back.
    ///
    /// Consecutive key-value commands of a batch are written in one WriteBatch (one RocksDB
    /// write for many clients' puts); each write also records how far the entry got.
    fn apply_entry(&self, entry: Entry) -> Result<RaftResponse, std::io::Error> {
        let log_id = entry.log_id;
        let meta = self.mvcc.cf(CF_META);
        let finished = |mut batch: WriteBatch| {
            self.entry_applied(&mut batch, log_id);
            batch
        };
        let commands = match entry.payload {
            EntryPayload::Blank => Vec::new(),
            EntryPayload::Membership(m) => {
                let mut batch = WriteBatch::default();
                batch.put_cf(
                    meta,
                    META_MEMBERSHIP,
                    encode(&StoredMembership::new(Some(log_id), m)),
                );
                self.mvcc
                    .commit(finished(batch), Vec::new())
                    .map_err(io_error)?;
                self.partial_marker.store(false, Ordering::Release);
                return Ok(RaftResponse::default());
            }
            EntryPayload::Normal(cmd) => match CommandBatch::decode(cmd.0.as_slice()) {
                Ok(b) => b.commands,
                Err(e) => {
                    // Every member reads the same bytes, so every member skips it alike.
                    tracing::error!(log_id = %log_id, error = %e, "undecodable log entry; skipped");
                    Vec::new()
                }
            },
        };
        if commands.is_empty() {
            self.mvcc
                .commit(finished(WriteBatch::default()), Vec::new())
                .map_err(io_error)?;
            self.partial_marker.store(false, Ordering::Release);
            return Ok(RaftResponse::default());
        }
        self.applied_commands
            .fetch_add(commands.len() as u64, Ordering::Relaxed);
        let skip = self.commands_already_applied(log_id)?;
        let last = commands.len() - 1;
        let mut results = Vec::with_capacity(commands.len());
        // Commands applied since the last write, which the next write covers.
        let mut group = Group::default();
        let reader = self.mvcc.reader();
        let mut unwritten = false;
        for (i, command) in commands.iter().enumerate() {
            if i < skip {
                results.push(CommandResult::default());
                continue;
            }
            // Key-value commands read only keys, which the group holds for them; any other
            // command reads state the group's writes change (lease attachments, revisions),
            // so it goes after a write and is written alone.
            let alone = !is_key_value(command);
            if alone && unwritten {
                self.write_group(&mut group, log_id, i - 1, last)?;
            }
            let mut applier = Applier::after(&self.mvcc, Some(&group)).reading_with(&reader);
            let result = self.apply_command(&mut applier, command);
            if result.is_ok() {
                let applied = applier.finish();
                group.add(applied);
            }
            unwritten = true;
            if alone || i == last {
                self.write_group(&mut group, log_id, i, last)?;
                unwritten = false;
            }
            results.push(match result {
                Ok(r) => {
                    self.note_leases(command);
                    CommandResult { result: Some(r) }
                }
                Err(e) => CommandResult {
                    result: Some(command_result::Result::Error(Error {
                        code: e.code() as i32,
                        message: e.to_string(),
                    })),
                },
            });
        }
        Ok(RaftResponse(BatchResult { results }))
    }

    /// Records in `batch` that entry `log_id` is wholly applied.
    fn entry_applied(&self, batch: &mut WriteBatch, log_id: LogId) {
        let meta = self.mvcc.cf(CF_META);
        batch.put_cf(meta, META_APPLIED, encode(&Some(log_id)));
        batch.delete_cf(meta, META_APPLIED_PARTIAL);
    }

    /// Writes the group, which covers the entry's commands up to `upto`, with how far the
    /// entry got: the entry's log id once its `last` command is in, else `applied_partial`.
    /// A crash inside a batch therefore resumes after the last command written.
    fn write_group(
        &self,
        group: &mut Group,
        log_id: LogId,
        upto: usize,
        last: usize,
    ) -> Result<(), std::io::Error> {
        let (mut batch, outcomes, latest) = group.take(&self.mvcc);
        let finishes = upto == last;
        if finishes {
            self.entry_applied(&mut batch, log_id);
        } else {
            self.partial_marker.store(true, Ordering::Release);
            batch.put_cf(
                self.mvcc.cf(CF_META),
                META_APPLIED_PARTIAL,
                encode(&(log_id, (upto + 1) as u64)),
            );
        }
        self.mvcc
            .commit_group(batch, outcomes, latest)
            .map_err(io_error)?;
        if finishes {
            self.partial_marker.store(false, Ordering::Release);
        }
        Ok(())
    }

    fn note_leases(&self, command: &Command) {
        match &command.request {
            Some(command::Request::LeaseGrant(g)) => self.leases.granted(g.id, g.ttl),
            Some(command::Request::LeaseRevoke(r)) => self.leases.revoked(r.id),
            Some(command::Request::LeaseCheckpoint(r)) => {
                for cp in &r.checkpoints {
                    self.leases.checkpointed(cp.id, cp.remaining_ttl);
                }
            }
            _ => {}
        }
    }

    /// Replaces the whole state with the snapshot file at `path`, then reloads the in-memory
    /// counters.
    fn load_from(&self, path: &Path) -> Result<(), std::io::Error> {
        let corrupt = |what: &str| read_error(std::io::Error::other(format!("snapshot: {what}")));
        let file = std::fs::File::open(path).map_err(read_error)?;
        let mut input = std::io::BufReader::with_capacity(1 << 20, file);
        let (_, kind) = read_snapshot_header(&mut input).map_err(read_error)?;
        if kind != SnapshotKind::Records {
            return Err(corrupt("a checkpoint's meta, not its records"));
        }
        for name in SNAPSHOT_FAMILIES {
            let cf = self.mvcc.cf(name);
            let mut it = self
                .db()
                .raw_iterator_cf_opt(cf, crate::mvcc::total_order());
            it.seek_to_last();
            if let Some(last) = it.key() {
                let mut end = last.to_vec();
                end.push(0);
                let mut batch = WriteBatch::default();
                batch.delete_range_cf(cf, Vec::<u8>::new(), end);
                self.db().write(batch).map_err(io_error)?;
            }
        }
        // The records skip RocksDB's log: the families are flushed to their files before the
        // install records the snapshot as applied, which is what makes it durable.
        let mut unlogged = rocksdb::WriteOptions::default();
        unlogged.disable_wal(true);
        let mut batch = WriteBatch::default();
        let (mut key, mut value) = (Vec::new(), Vec::new());
        loop {
            let mut tag = [0u8; 1];
            match input.read_exact(&mut tag) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(read_error(e)),
            }
            let name = SNAPSHOT_FAMILIES
                .get(tag[0] as usize)
                .ok_or_else(|| corrupt("unknown family"))?;
            for buf in [&mut key, &mut value] {
                let mut len = [0u8; 4];
                input
                    .read_exact(&mut len)
                    .map_err(|_| corrupt("truncated"))?;
                let len = u32::from_be_bytes(len) as usize;
                if len > MAX_SNAPSHOT_RECORD {
                    return Err(corrupt("record too large"));
                }
                buf.resize(len, 0);
                input.read_exact(buf).map_err(|_| corrupt("truncated"))?;
            }
            batch.put_cf(self.mvcc.cf(name), &key, &value);
            if batch.len() >= 10_000 {
                self.db()
                    .write_opt(std::mem::take(&mut batch), &unlogged)
                    .map_err(io_error)?;
            }
        }
        self.db().write_opt(batch, &unlogged).map_err(io_error)?;
        for name in SNAPSHOT_FAMILIES {
            self.db().flush_cf(self.mvcc.cf(name)).map_err(io_error)?;
        }
        self.db().flush_wal(true).map_err(io_error)?;
        // The replaced state's meta came with it, marker and all.
        self.partial_marker.store(true, Ordering::Release);
        self.mvcc.reload().map_err(io_error)?;
        self.leases.reload(&self.mvcc);
        Ok(())
    }

    /// Makes the snapshot file at `from` the current one, unless the current one is newer
    /// (a build that started before an install finished after it), then removes the
    /// checkpoints and sent files of every other snapshot.
    async fn publish_snapshot(
        &self,
        from: &Path,
        meta: &SnapshotMeta,
    ) -> Result<(), std::io::Error> {
        let _one_at_a_time = self.snapshot_lock.lock().await;
        self.publish_locked(from, meta).await
    }

    /// [`Self::publish_snapshot`] with the snapshot lock held.
    async fn publish_locked(&self, from: &Path, meta: &SnapshotMeta) -> std::io::Result<()> {
        let newer = matches!(
            self.current_snapshot_meta().await?,
            Some((current, _)) if current.last_log_id > meta.last_log_id
        );
        if newer {
            let _ = tokio::fs::remove_file(from).await;
        } else {
            tokio::fs::rename(from, self.data_path())
                .await
                .map_err(io_error)?;
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            // The rename is durable before the log behind the snapshot may be purged.
            this.sync_snapshot_dir()?;
            // Leftovers cost only disk; the next publication tries again.
            if let Err(e) = this.prune() {
                tracing::warn!(error = %e, "could not remove the files of older snapshots");
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(|e| io_error(std::io::Error::other(e.to_string())))?
        .map_err(io_error)
    }

    /// Removes checkpoints and sent files that are not of the current snapshot, and
    /// checkpoints a build left unfinished. Called with the snapshot lock held, or at start.
    fn prune(&self) -> std::io::Result<()> {
        self.prune_files(false)
    }

    /// [`Self::prune`], and with `unfinished` the leftovers of builds and write-outs too.
    fn prune_files(&self, unfinished: bool) -> std::io::Result<()> {
        let current = match std::fs::File::open(self.data_path()) {
            Ok(f) => Some(read_snapshot_header(&mut std::io::BufReader::new(f))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let mut keep: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
        if let Some((meta, SnapshotKind::Checkpoint)) = &current {
            keep.insert(self.checkpoint_dir(meta));
            keep.insert(self.sent_path(meta));
        }
        for name in self
            .reading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            keep.insert(self.snapshot_dir.join(format!("ckpt-{name}")));
            keep.insert(self.snapshot_dir.join(format!("send-{name}.snap")));
        }
        for entry in std::fs::read_dir(&self.snapshot_dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if keep.contains(&path) {
                continue;
            }
            if name.contains("building") {
                if !unfinished {
                    continue;
                }
                if path.is_dir() {
                    std::fs::remove_dir_all(&path)?;
                } else {
                    std::fs::remove_file(&path)?;
                }
            } else if name.starts_with("ckpt-") {
                std::fs::remove_dir_all(&path)?;
            } else if name.starts_with("send-") {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    fn checkpoint_dir(&self, meta: &SnapshotMeta) -> PathBuf {
        self.snapshot_dir
            .join(format!("ckpt-{}", snapshot_name(meta)))
    }

    /// The history the snapshot at `last` holds, read from its checkpoint's own `meta`
    /// family: how far its physical compaction had got, and its revision. `None` when this
    /// member has no checkpoint at `last`: a snapshot installed from the leader's file, or
    /// one a newer snapshot has replaced meanwhile. Blocking: opens the checkpoint.
    pub fn snapshot_history(&self, last: Option<LogId>) -> std::io::Result<Option<(i64, i64)>> {
        let dir = self.checkpoint_dir(&SnapshotMeta {
            last_log_id: last,
            ..Default::default()
        });
        if !dir.try_exists()? {
            return Ok(None);
        }
        let db = match open_checkpoint(&dir) {
            Ok(db) => db,
            // Pruned while it was being opened: a newer snapshot replaced it.
            Err(_) if !dir.try_exists()? => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta_cf = family(&db, CF_META)?;
        let counter = |key: &[u8], default: i64| -> std::io::Result<i64> {
            match db.get_cf(meta_cf, key).map_err(read_error)? {
                Some(v) => decode::<i64>("meta", &v).map_err(read_error),
                None => Ok(default),
            }
        };
        Ok(Some((
            counter(META_COMPACT_DONE, 0)?,
            counter(META_REVISION, 1)?,
        )))
    }

    fn sent_path(&self, meta: &SnapshotMeta) -> PathBuf {
        self.snapshot_dir
            .join(format!("send-{}.snap", snapshot_name(meta)))
    }

    /// Takes a RocksDB checkpoint of the state: a memtable flush and hard links to the
    /// table files, whatever the size of the state. Returns its meta, read from the
    /// checkpoint itself (entries are applied while it is taken).
    fn checkpoint(&self) -> std::io::Result<SnapshotMeta> {
        let building = self.snapshot_dir.join("ckpt-building");
        // RocksDB stages a checkpoint in `<dir>.tmp`; a failed build may leave either.
        for stale in [
            building.clone(),
            self.snapshot_dir.join("ckpt-building.tmp"),
        ] {
            if stale.try_exists()? {
                std::fs::remove_dir_all(&stale)?;
            }
        }
        {
            let _not_installing = self.state_lock.read().unwrap_or_else(|e| e.into_inner());
            rocksdb::checkpoint::Checkpoint::new(self.db())
                .and_then(|c| c.create_checkpoint(&building))
                .map_err(io_error)?;
        }
        // The checkpoint copies the write-ahead log, applied entries openraft never asked to
        // sync among it: synced here too, the database never restarts behind its snapshot.
        self.db().flush_wal(true).map_err(io_error)?;
        let meta = {
            let db = open_checkpoint(&building)?;
            let meta_cf = family(&db, CF_META)?;
            recorded_meta(|key| db.get_cf(meta_cf, key))?
        };
        let dir = self.checkpoint_dir(&meta);
        if dir.try_exists()? {
            // Nothing was applied since the last one.
            std::fs::remove_dir_all(&building)?;
        } else {
            std::fs::rename(&building, &dir)?;
            self.sync_snapshot_dir()?;
        }
        Ok(meta)
    }

    /// The snapshot as a follower installs it: `snapshot` itself when it holds records, else
    /// the records of its checkpoint, written out to a file on first use and kept for the
    /// next follower until a newer snapshot replaces it. Runs on the sender's task, never
    /// the state machine's, and holds no lock a build or an install waits on while it writes.
    pub async fn sendable(&self, mut snapshot: Snapshot) -> std::io::Result<Snapshot> {
        let (meta, kind) = read_header_async(&mut snapshot.snapshot).await?;
        snapshot.snapshot.seek(std::io::SeekFrom::Start(0)).await?;
        if kind == SnapshotKind::Records {
            return Ok(snapshot);
        }
        let name = snapshot_name(&meta);
        let _one_write_out = self.write_out_lock.lock().await;
        {
            let _no_prune = self.snapshot_lock.lock().await;
            if let Ok(file) = tokio::fs::File::open(self.sent_path(&meta)).await {
                return Ok(Snapshot {
                    meta,
                    snapshot: file,
                });
            }
            if !self.checkpoint_dir(&meta).try_exists()? {
                return Err(std::io::Error::other(format!(
                    "snapshot {name} was replaced by a newer one"
                )));
            }
            self.reading
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name);
        }
        let this = self.clone();
        let announced = meta.clone();
        // Everything after the pin happens on the blocking thread, so the pin is released
        // even if the sender stops waiting.
        let file = tokio::task::spawn_blocking(move || {
            let result = this.write_out(&announced);
            let _no_publish = this.snapshot_lock.blocking_lock();
            this.reading
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&snapshot_name(&announced));
            let file = result.and_then(|()| std::fs::File::open(this.sent_path(&announced)));
            // A newer snapshot may have been published meanwhile.
            if let Err(e) = this.prune() {
                tracing::warn!(error = %e, "could not remove the files of older snapshots");
            }
            file
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        Ok(Snapshot {
            meta,
            snapshot: tokio::fs::File::from_std(file),
        })
    }

    /// Writes the records of the checkpoint of `meta` to its sent file.
    fn write_out(&self, meta: &SnapshotMeta) -> std::io::Result<()> {
        let started = std::time::Instant::now();
        let staged = self.snapshot_dir.join("send-building");
        let written = match open_checkpoint(&self.checkpoint_dir(meta))
            .and_then(|db| dump_db(&db, &staged))
        {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&staged);
                return Err(e);
            }
        };
        if written.last_log_id != meta.last_log_id {
            let _ = std::fs::remove_file(&staged);
            return Err(std::io::Error::other(format!(
                "the checkpoint of {} holds {}",
                snapshot_name(meta),
                snapshot_name(&written)
            )));
        }
        std::fs::rename(&staged, self.sent_path(meta))?;
        self.sync_snapshot_dir()?;
        let bytes = std::fs::metadata(self.sent_path(meta))
            .map(|m| m.len())
            .unwrap_or(0);
        tracing::info!(
            snapshot = %snapshot_name(meta),
            bytes,
            ms = started.elapsed().as_millis() as u64,
            "wrote snapshot records to send"
        );
        Ok(())
    }

    async fn current_snapshot_meta(
        &self,
    ) -> Result<Option<(SnapshotMeta, SnapshotKind)>, std::io::Error> {
        match snapshot_file_meta(self.data_path()).await {
            Ok(meta) => Ok(Some(meta)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(read_error(e)),
        }
    }
}

/// The applied log id and membership the `meta` family of a database records.
fn recorded_meta(
    get: impl Fn(&[u8]) -> Result<Option<Vec<u8>>, rocksdb::Error>,
) -> std::io::Result<SnapshotMeta> {
    let last_log_id: Option<LogId> = match get(META_APPLIED).map_err(read_error)? {
        Some(v) => decode("applied", &v).map_err(read_error)?,
        None => None,
    };
    let last_membership: StoredMembership = match get(META_MEMBERSHIP).map_err(read_error)? {
        Some(v) => decode("membership", &v).map_err(read_error)?,
        None => StoredMembership::default(),
    };
    Ok(SnapshotMeta {
        last_log_id,
        last_membership,
    })
}

fn family<'a>(db: &'a DB, name: &str) -> std::io::Result<&'a rocksdb::ColumnFamily> {
    db.cf_handle(name)
        .ok_or_else(|| std::io::Error::other(format!("no {name} column family")))
}

/// One record of a snapshot or backup file: the family's tag, then the key and the value,
/// each after its length (u32, big-endian).
pub(crate) fn write_record(
    out: &mut impl Write,
    tag: usize,
    key: &[u8],
    value: &[u8],
) -> std::io::Result<()> {
    out.write_all(&[tag as u8])?;
    out.write_all(&(key.len() as u32).to_be_bytes())?;
    out.write_all(key)?;
    out.write_all(&(value.len() as u32).to_be_bytes())?;
    out.write_all(value)
}

/// Writes the three families of `db`, read from one consistent RocksDB snapshot, to `path`
/// (see [`write_snapshot_header`] for the layout), synced. Returns the snapshot's meta.
fn dump_db(db: &DB, path: &Path) -> std::io::Result<SnapshotMeta> {
    let snap = db.snapshot();
    let meta_cf = family(db, CF_META)?;
    let meta = recorded_meta(|key| snap.get_cf(meta_cf, key))?;
    let file = PacedFile::new(std::fs::File::create(path)?);
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    write_snapshot_header(&mut out, &meta, SnapshotKind::Records)?;
    for (tag, name) in SNAPSHOT_FAMILIES.iter().enumerate() {
        // A scan of everything must not push the working set out of the block cache.
        let mut read = crate::mvcc::total_order();
        read.fill_cache(false);
        let mut it = snap.raw_iterator_cf_opt(family(db, name)?, read);
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            write_record(&mut out, tag, k, v)?;
            it.next();
        }
        it.status().map_err(read_error)?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.file.sync_all()?;
    Ok(meta)
}

/// Opens a checkpoint's database to read it.
fn open_checkpoint(dir: &Path) -> std::io::Result<DB> {
    let opts = rocksdb::Options::default();
    DB::open_cf_for_read_only(&opts, dir, SNAPSHOT_FAMILIES, false).map_err(read_error)
}

/// What a snapshot file holds after its meta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnapshotKind {
    /// Every record of the state: the file a follower installs.
    Records,
    /// Nothing: the state is the checkpoint directory the meta names.
    Checkpoint,
}

/// Largest key or value a snapshot record may carry (a value is at most
/// --max-request-bytes; this only stops a corrupt length from allocating without bound).
const MAX_SNAPSHOT_RECORD: usize = 256 << 20;
const SNAPSHOT_MAGIC: &[u8; 8] = b"FLSNAP01";
/// The magic of a file that holds only the meta of a checkpoint.
const CHECKPOINT_MAGIC: &[u8; 8] = b"FLCKPT01";

/// A snapshot file: `FLSNAP01`, the meta's length (u32 BE) and bincode, then records
/// `[family u8][key len u32 BE][key][value len u32 BE][value]` to the end. Meta and data in
/// one file, replaced by one rename, can never disagree. A checkpoint's meta file is
/// `FLCKPT01` and the meta, with no records.
///
/// Dirty bytes of a snapshot file written before they are synced.
const SNAPSHOT_SYNC_BYTES: u64 = 4 << 20;

/// A file synced every [`SNAPSHOT_SYNC_BYTES`] as it is written. A snapshot of a large state
/// is hundreds of MiB; left dirty until one final sync, the kernel writes it back in one burst
/// that the Raft log's own syncs wait behind (ext4 orders them), and write latency spikes for
/// the length of the burst.
struct PacedFile {
    file: std::fs::File,
    unsynced: u64,
}

impl PacedFile {
    fn new(file: std::fs::File) -> PacedFile {
        PacedFile { file, unsynced: 0 }
    }
}

impl Write for PacedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unsynced += n as u64;
        if self.unsynced >= SNAPSHOT_SYNC_BYTES {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// How logs name a snapshot: the term and index of its last entry.
pub(crate) fn snapshot_name(meta: &SnapshotMeta) -> String {
    let last = meta.last_log_id;
    format!(
        "{}-{}",
        last.map(|l| l.leader_id.term).unwrap_or(0),
        last.map(|l| l.index).unwrap_or(0)
    )
}

/// The header's encoding: the meta's last log id and membership, then the snapshot's name
/// (the layout files written before the name left openraft's meta keep).
type FileMeta = (Option<LogId>, StoredMembership, String);

fn write_snapshot_header(
    out: &mut impl std::io::Write,
    meta: &SnapshotMeta,
    kind: SnapshotKind,
) -> std::io::Result<()> {
    let encoded = encode(&(meta.last_log_id, &meta.last_membership, snapshot_name(meta)));
    out.write_all(match kind {
        SnapshotKind::Records => SNAPSHOT_MAGIC,
        SnapshotKind::Checkpoint => CHECKPOINT_MAGIC,
    })?;
    out.write_all(&(encoded.len() as u32).to_be_bytes())?;
    out.write_all(&encoded)
}

/// The meta and kind in the header of the snapshot file at `path`.
async fn snapshot_file_meta(path: PathBuf) -> std::io::Result<(SnapshotMeta, SnapshotKind)> {
    tokio::task::spawn_blocking(move || {
        read_snapshot_header(&mut std::io::BufReader::new(std::fs::File::open(path)?))
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))?
}

fn read_snapshot_header(
    input: &mut impl std::io::Read,
) -> std::io::Result<(SnapshotMeta, SnapshotKind)> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut magic = [0u8; 8];
    input.read_exact(&mut magic)?;
    let kind = match &magic {
        m if m == SNAPSHOT_MAGIC => SnapshotKind::Records,
        m if m == CHECKPOINT_MAGIC => SnapshotKind::Checkpoint,
        _ => return Err(bad("not a flotilla snapshot file")),
    };
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_SNAPSHOT_RECORD {
        return Err(bad("snapshot meta too large"));
    }
    let mut meta = vec![0u8; len];
    input.read_exact(&mut meta)?;
    let (last_log_id, last_membership, _name): FileMeta =
        decode("snapshot meta", &meta).map_err(|e| bad(&e.to_string()))?;
    Ok((
        SnapshotMeta {
            last_log_id,
            last_membership,
        },
        kind,
    ))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = tokio::fs::File;

    async fn build_snapshot(&mut self) -> Result<Snapshot, std::io::Error> {
        let started = std::time::Instant::now();
        // Held from the checkpoint to its publication, so no other publication prunes it.
        let _one_at_a_time = self.snapshot_lock.lock().await;
        let this = self.clone();
        let staged = self.snapshot_dir.join("building.data");
        let path = staged.clone();
        let meta = tokio::task::spawn_blocking(move || {
            let meta = this.checkpoint()?;
            let mut f = std::fs::File::create(&path)?;
            write_snapshot_header(&mut f, &meta, SnapshotKind::Checkpoint)?;
            f.sync_all()?;
            Ok::<_, std::io::Error>(meta)
        })
        .await
        .map_err(|e| io_error(std::io::Error::other(e.to_string())))?
        .map_err(io_error)?;
        self.publish_locked(&staged, &meta).await?;
        tracing::info!(
            snapshot = %snapshot_name(&meta),
            ms = started.elapsed().as_millis() as u64,
            "built snapshot (a checkpoint)"
        );
        // openraft keeps only the meta of a snapshot it built; the data is read back when a
        // follower needs it (get_current_snapshot, then `sendable`).
        let snapshot = tokio::fs::File::open(self.data_path())
            .await
            .map_err(read_error)?;
        Ok(Snapshot { meta, snapshot })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = tokio::fs::File;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), std::io::Error> {
        let meta_cf = self.mvcc.cf(CF_META);
        let meta = recorded_meta(|key| self.db().get_cf(meta_cf, key))?;
        Ok((meta.last_log_id, meta.last_membership))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), std::io::Error>
    where
        S: futures::Stream<Item = Result<EntryResponder<TypeConfig>, std::io::Error>>
            + Unpin
            + OptionalSend,
    {
        // Each entry is one small unsynced RocksDB write: cheaper inline than a thread handoff.
        while let Some(next) = entries.next().await {
            let (entry, responder) = next?;
            let response = self.apply_entry(entry)?;
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: tokio::fs::File,
    ) -> Result<(), std::io::Error> {
        self.install_snapshot_file(meta, snapshot).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, std::io::Error> {
        self.current_snapshot().await
    }
}

impl SnapshotReceiverFactory<TypeConfig> for StateMachine {
    type SnapshotReceiver = tokio::fs::File;

    async fn begin_receiving_snapshot(&mut self) -> Result<tokio::fs::File, std::io::Error> {
        static TRANSFERS: AtomicU64 = AtomicU64::new(0);
        let n = TRANSFERS.fetch_add(1, Ordering::Relaxed);
        let path = self.snapshot_dir.join(format!("incoming-{n}.data"));
        let f = tokio::fs::File::create(&path).await.map_err(io_error)?;
        let abandoned = self
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(path);
        if let Some(old) = abandoned {
            let _ = tokio::fs::remove_file(old).await;
        }
        Ok(f)
    }
}

impl StateMachine {
    async fn install_snapshot_file(
        &mut self,
        meta: &SnapshotMeta,
        mut snapshot: tokio::fs::File,
    ) -> Result<(), std::io::Error> {
        let incoming = self
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(incoming) = incoming else {
            // Not received: openraft restores the member's own current snapshot at start
            // when the applied state is behind it.
            return self.restore_own_snapshot(meta, snapshot).await;
        };
        snapshot.flush().await.map_err(io_error)?;
        snapshot.sync_all().await.map_err(io_error)?;
        drop(snapshot);
        let (sent, kind) = snapshot_file_meta(incoming.clone())
            .await
            .map_err(read_error)?;
        if kind != SnapshotKind::Records {
            return Err(read_error(std::io::Error::other(
                "the snapshot file holds a checkpoint's meta, not records",
            )));
        }
        if sent.last_log_id != meta.last_log_id {
            return Err(read_error(std::io::Error::other(format!(
                "snapshot file is of {}, the leader announced {}",
                snapshot_name(&sent),
                snapshot_name(meta)
            ))));
        }
        tokio::task::block_in_place(|| self.install_from(&incoming, meta))?;
        self.publish_snapshot(&incoming, meta).await?;
        self.clear_install_marker()?;
        tracing::info!(snapshot = %snapshot_name(meta), "installed snapshot");
        Ok(())
    }

    /// Replaces the state with the member's own current snapshot (`snapshot`, from
    /// [`Self::current_snapshot`]): its file's records, or its checkpoint's written out.
    async fn restore_own_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: tokio::fs::File,
    ) -> Result<(), std::io::Error> {
        let sendable = self
            .sendable(Snapshot {
                meta: meta.clone(),
                snapshot,
            })
            .await
            .map_err(read_error)?;
        let mut file = sendable.snapshot;
        let (held, _) = read_header_async(&mut file).await.map_err(read_error)?;
        drop(file);
        if held.last_log_id != meta.last_log_id {
            return Err(read_error(std::io::Error::other(format!(
                "restoring snapshot {}, the files hold {}",
                snapshot_name(meta),
                snapshot_name(&held)
            ))));
        }
        let path = match self.current_snapshot_meta().await? {
            Some((_, SnapshotKind::Checkpoint)) => self.sent_path(meta),
            _ => self.data_path(),
        };
        tracing::warn!(
            snapshot = %snapshot_name(meta),
            "the applied state is behind the member's own snapshot; restoring it"
        );
        tokio::task::block_in_place(|| self.install_from(&path, meta))?;
        self.clear_install_marker()?;
        Ok(())
    }

    async fn current_snapshot(&self) -> Result<Option<Snapshot>, std::io::Error> {
        // Opened before its header is read: a rename that replaces the file meanwhile does
        // not change what this handle reads, so meta and data stay one snapshot.
        let mut file = match tokio::fs::File::open(self.data_path()).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_error(e)),
        };
        let (meta, _) = read_header_async(&mut file).await.map_err(read_error)?;
        file.seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(read_error)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: file,
        }))
    }
}

/// The header of a snapshot file, read from its start.
async fn read_header_async(
    file: &mut tokio::fs::File,
) -> std::io::Result<(SnapshotMeta, SnapshotKind)> {
    file.seek(std::io::SeekFrom::Start(0)).await?;
    let mut header = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = file.read(&mut chunk).await?;
        header.extend_from_slice(&chunk[..n]);
        match read_snapshot_header(&mut header.as_slice()) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && n > 0 => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::etcdserverpb::{
        compare, Compare, DeleteRangeRequest, LeaseGrantRequest, PutRequest, RequestOp, TxnRequest,
    };

    fn machine() -> (tempfile::TempDir, StateMachine) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = crate::open_db(&dir.path().join("db")).expect("open db");
        let mvcc = Mvcc::open(db).expect("open mvcc");
        let sm = StateMachine::new(mvcc, Arc::default(), dir.path().join("snap")).expect("sm");
        (dir, sm)
    }

    fn entry(index: u64, requests: Vec<command::Request>) -> Entry {
        let commands = requests
            .into_iter()
            .map(|r| Command {
                auth: None,
                request: Some(r),
            })
            .collect();
        Entry {
            log_id: LogId::new(
                openraft::impls::leader_id_adv::LeaderId {
                    term: 1,
                    node_id: 1,
                },
                index,
            ),
            payload: EntryPayload::Normal(super::super::RaftCommand::new(&CommandBatch {
                commands,
            })),
        }
    }

    fn put(key: &str, value: &str, lease: i64) -> command::Request {
        command::Request::Put(PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
            prev_kv: true,
            ..Default::default()
        })
    }

    fn result(r: &CommandResult) -> &command_result::Result {
        r.result.as_ref().expect("a result")
    }

    /// Commands of one entry written together read each other's writes, as if each had been
    /// written alone, and a lease granted in the entry is there for the puts after it.
    #[test]
    fn commands_of_one_entry_see_each_other() {
        let (_dir, sm) = machine();
        let mut events = sm.mvcc.subscribe();
        let version_is_2 = Compare {
            key: b"a".to_vec(),
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Version as i32,
            target_union: Some(compare::TargetUnion::Version(2)),
            ..Default::default()
        };
        let put_op = |k: &str| RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: k.into(),
                value: b"t".to_vec(),
                ..Default::default()
            })),
        };
        let e = entry(
            1,
            vec![
                put("a", "1", 0),
                put("a", "2", 0),
                put("b", "x", 7), // no lease 7 yet: refused, nothing written
                command::Request::Txn(TxnRequest {
                    compare: vec![version_is_2],
                    success: vec![put_op("c")],
                    failure: vec![],
                }),
                command::Request::LeaseGrant(LeaseGrantRequest { id: 7, ttl: 60 }),
                put("b", "y", 7),
                command::Request::DeleteRange(DeleteRangeRequest {
                    key: b"a".to_vec(),
                    ..Default::default()
                }),
            ],
        );
        let out = sm.apply_entry(e).expect("apply").0.results;
        assert_eq!(out.len(), 7);
        let revision = |r: &command_result::Result| match r {
            command_result::Result::Put(p) => p.header.as_ref().map(|h| h.revision),
            command_result::Result::Txn(t) => t.header.as_ref().map(|h| h.revision),
            command_result::Result::DeleteRange(d) => d.header.as_ref().map(|h| h.revision),
            _ => None,
        };
        assert_eq!(revision(result(&out[0])), Some(2));
        match result(&out[1]) {
            command_result::Result::Put(p) => {
                let prev = p.prev_kv.as_ref().expect("prev kv");
                assert_eq!((prev.value.as_slice(), prev.mod_revision), (&b"1"[..], 2));
                assert_eq!(p.header.as_ref().map(|h| h.revision), Some(3));
            }
            other => panic!("unexpected {other:?}"),
        }
        match result(&out[2]) {
            command_result::Result::Error(e) => {
                assert_eq!(e.message, "etcdserver: requested lease not found")
            }
            other => panic!("unexpected {other:?}"),
        }
        match result(&out[3]) {
            command_result::Result::Txn(t) => assert!(t.succeeded),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(revision(result(&out[5])), Some(5));
        assert_eq!(revision(result(&out[6])), Some(6));

        assert_eq!(sm.mvcc.current_revision(), 6);
        let a = sm.mvcc.get(b"a", 3).expect("get").expect("a at 3");
        assert_eq!(
            (a.version, a.create_revision, a.value),
            (2, 2, b"2".to_vec())
        );
        assert!(sm.mvcc.get(b"a", 6).expect("get").is_none());
        let b = sm.mvcc.get(b"b", 6).expect("get").expect("b");
        assert_eq!((b.lease, b.value), (7, b"y".to_vec()));
        assert_eq!(
            sm.mvcc.lease_keys(7).expect("lease keys"),
            vec![b"b".to_vec()]
        );
        // Every revision is published once, in order.
        let published: Vec<i64> = std::iter::from_fn(|| events.try_recv().ok())
            .map(|e| e.revision)
            .collect();
        assert_eq!(published, vec![2, 3, 4, 5, 6]);
        let applied = sm
            .mvcc
            .meta_get(META_APPLIED)
            .expect("meta")
            .expect("applied");
        let applied: Option<LogId> = decode("applied", &applied).expect("decode");
        assert_eq!(applied.map(|l| l.index), Some(1));
    }

    /// A snapshot built from one member's file, sent in chunks to an empty member and
    /// installed there, gives it the same keys, revision and leases.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_carries_the_whole_state_through_its_file() {
        let (_a_dir, mut a) = machine();
        let mut requests = vec![command::Request::LeaseGrant(LeaseGrantRequest {
            id: 5,
            ttl: 60,
        })];
        for i in 0..2_000 {
            requests.push(put(&format!("k{i:05}"), &"v".repeat(100), 0));
        }
        requests.push(put("leased", "x", 5));
        a.apply_entry(entry(1, requests)).expect("apply");
        let built = a.build_snapshot().await.expect("build");
        assert_eq!(built.meta.last_log_id.map(|l| l.index), Some(1));

        let current = a
            .get_current_snapshot()
            .await
            .expect("get")
            .expect("a snapshot");
        assert_eq!(current.meta, built.meta);
        let mut current = a.sendable(current).await.expect("records to send");
        assert_eq!(current.meta, built.meta);
        let (_b_dir, mut b) = machine();
        let mut receiving = b.begin_receiving_snapshot().await.expect("begin");
        // In chunks, as a leader sends it.
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = current.snapshot.read(&mut chunk).await.expect("read");
            if n == 0 {
                break;
            }
            receiving.write_all(&chunk[..n]).await.expect("write");
        }
        b.install_snapshot(&current.meta, receiving)
            .await
            .expect("install");

        assert_eq!(b.mvcc.current_revision(), a.mvcc.current_revision());
        let rev = b.mvcc.current_revision();
        let kv = b.mvcc.get(b"k01999", rev).expect("get").expect("k01999");
        assert_eq!(kv.value, "v".repeat(100).into_bytes());
        assert_eq!(
            b.mvcc.lease_keys(5).expect("lease keys"),
            vec![b"leased".to_vec()]
        );
        let (applied, _) = b.applied_state().await.expect("applied");
        assert_eq!(applied.map(|l| l.index), Some(1));
        // The receiver keeps it as its own current snapshot.
        let again = b.get_current_snapshot().await.expect("get").expect("kept");
        assert_eq!(again.meta, built.meta);

        // A file that is not a snapshot is refused, not loaded.
        let mut bad = b.begin_receiving_snapshot().await.expect("begin");
        bad.write_all(b"garbage").await.expect("write");
        assert!(b.install_snapshot(&current.meta, bad).await.is_err());
        assert!(b.mvcc.get(b"k00000", rev).expect("get").is_some());
    }

    fn snapshot_files(sm: &StateMachine) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&sm.snapshot_dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A built snapshot is a checkpoint of the state as it was, whatever is applied after
    /// it; its records are written out once, when first sent; a newer build or a restart
    /// leaves only the current snapshot's files.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_built_snapshot_is_a_checkpoint_written_out_when_sent() {
        let (_dir, mut sm) = machine();
        sm.apply_entry(entry(1, vec![put("a", "1", 0), put("b", "1", 0)]))
            .expect("apply");
        let first = sm.build_snapshot().await.expect("build");
        assert_eq!(
            snapshot_files(&sm),
            vec!["ckpt-1-1".to_string(), "current.snap".to_string()]
        );
        // The meta file is small: the checkpoint holds the state.
        let len = std::fs::metadata(sm.data_path()).expect("meta").len();
        assert!(len < 4096, "{len} bytes");

        // Applied after the build: not in the snapshot.
        sm.apply_entry(entry(2, vec![put("a", "2", 0), put("c", "1", 0)]))
            .expect("apply");
        let current = sm.get_current_snapshot().await.expect("get").expect("one");
        assert_eq!(current.meta, first.meta);
        let sent = sm.sendable(current).await.expect("records");
        let (_b_dir, mut b) = machine();
        let mut receiving = b.begin_receiving_snapshot().await.expect("begin");
        let mut data = sent.snapshot;
        tokio::io::copy(&mut data, &mut receiving)
            .await
            .expect("copy");
        b.install_snapshot(&first.meta, receiving)
            .await
            .expect("install");
        let rev = b.mvcc.current_revision();
        assert_eq!(rev, 3);
        let a = b.mvcc.get(b"a", rev).expect("get").expect("a");
        assert_eq!(a.value, b"1".to_vec());
        assert!(b.mvcc.get(b"c", rev).expect("get").is_none());
        // Written once: a second follower is sent the same file.
        let again = sm.get_current_snapshot().await.expect("get").expect("one");
        let again = sm.sendable(again).await.expect("records");
        assert_eq!(again.meta, first.meta);
        assert_eq!(
            snapshot_files(&sm),
            vec![
                "ckpt-1-1".to_string(),
                "current.snap".to_string(),
                "send-1-1.snap".to_string()
            ]
        );

        // A newer build replaces both.
        let second = sm.build_snapshot().await.expect("build");
        assert_eq!(second.meta.last_log_id.map(|l| l.index), Some(2));
        assert_eq!(
            snapshot_files(&sm),
            vec!["ckpt-1-2".to_string(), "current.snap".to_string()]
        );
        // A build interrupted by a crash leaves a partial checkpoint; the start removes it
        // and keeps the current one.
        std::fs::create_dir(sm.snapshot_dir.join("ckpt-building")).expect("mkdir");
        std::fs::create_dir(sm.snapshot_dir.join("ckpt-1-1")).expect("mkdir");
        std::fs::write(sm.snapshot_dir.join("send-1-1.snap"), b"old").expect("write");
        let mut restarted =
            StateMachine::new(sm.mvcc.clone(), Arc::default(), sm.snapshot_dir.clone())
                .expect("restart");
        assert_eq!(
            snapshot_files(&restarted),
            vec!["ckpt-1-2".to_string(), "current.snap".to_string()]
        );
        let current = restarted
            .get_current_snapshot()
            .await
            .expect("get")
            .expect("kept");
        assert_eq!(current.meta, second.meta);
        let sent = restarted.sendable(current).await.expect("records");
        assert_eq!(sent.meta, second.meta);
    }

    /// What a snapshot holds is read from its own checkpoint: the revision and compaction
    /// progress it was taken with, whatever the state did after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshots_history_is_read_from_its_checkpoint() {
        let (_dir, mut sm) = machine();
        assert_eq!(sm.snapshot_history(None).expect("read"), None);
        sm.apply_entry(entry(
            1,
            vec![put("a", "1", 0), put("a", "2", 0), put("a", "3", 0)],
        ))
        .expect("apply");
        let first = sm.build_snapshot().await.expect("build");
        assert_eq!(
            sm.snapshot_history(first.meta.last_log_id).expect("read"),
            Some((0, 4))
        );
        sm.apply_entry(entry(2, vec![put("a", "4", 0)]))
            .expect("apply");
        crate::mvcc::compactor::compact_for_tests(&sm.mvcc, 4);
        assert_eq!(
            sm.snapshot_history(first.meta.last_log_id).expect("read"),
            Some((0, 4)),
            "the state's later writes and compaction are not the snapshot's"
        );
        let second = sm.build_snapshot().await.expect("build");
        assert_eq!(
            sm.snapshot_history(second.meta.last_log_id).expect("read"),
            Some((4, 5))
        );
        // The first one's checkpoint is gone with it.
        assert_eq!(
            sm.snapshot_history(first.meta.last_log_id).expect("read"),
            None
        );
    }

    /// openraft restores a member's own snapshot at start when the applied state is behind
    /// it (a power loss after unsynced applies); a checkpoint is restored through its
    /// written-out records.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_state_behind_its_own_snapshot_is_restored_from_it() {
        let (_dir, mut sm) = machine();
        sm.apply_entry(entry(3, vec![put("a", "1", 0), put("b", "2", 0)]))
            .expect("apply");
        let built = sm.build_snapshot().await.expect("build");
        let mut lost = WriteBatch::default();
        lost.delete_range_cf(sm.mvcc.cf(CF_KV), Vec::<u8>::new(), vec![0xFF; 8]);
        lost.delete_cf(sm.mvcc.cf(CF_META), META_APPLIED);
        sm.db().write(lost).expect("write");
        let (applied, _) = sm.applied_state().await.expect("applied");
        assert_eq!(applied, None);

        let current = sm.get_current_snapshot().await.expect("get").expect("one");
        assert_eq!(current.meta, built.meta);
        sm.install_snapshot(&current.meta, current.snapshot)
            .await
            .expect("restore");
        let (applied, _) = sm.applied_state().await.expect("applied");
        assert_eq!(applied.map(|l| l.index), Some(3));
        let rev = sm.mvcc.current_revision();
        let a = sm.mvcc.get(b"a", rev).expect("get").expect("a");
        assert_eq!(a.value, b"1".to_vec());
        assert!(!sm.install_marker().exists());
    }

    /// A member that crashed while a snapshot replaced its state finishes the install from the
    /// received file when it starts, and serves nothing of the half-replaced state.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_interrupted_install_is_finished_at_start() {
        let (_a_dir, mut a) = machine();
        let requests = (0..500)
            .map(|i| put(&format!("k{i:03}"), "from-a", 0))
            .collect();
        a.apply_entry(entry(7, requests)).expect("apply");
        let built = a.build_snapshot().await.expect("build");

        let (_b_dir, b) = machine();
        b.apply_entry(entry(
            1,
            vec![put("only-b", "x", 0), put("k000", "from-b", 0)],
        ))
        .expect("apply");
        // What a crash in the middle of an install leaves: the received file, the marker
        // naming it, and a state partly replaced (here: the kv family emptied).
        let current = a.get_current_snapshot().await.expect("get").expect("a's");
        a.sendable(current).await.expect("records to send");
        std::fs::copy(
            a.sent_path(&built.meta),
            b.snapshot_dir.join("incoming-3.data"),
        )
        .expect("copy");
        std::fs::write(b.install_marker(), "incoming-3.data").expect("marker");
        std::fs::write(b.snapshot_dir.join("incoming-9.data"), b"abandoned").expect("stale");
        let mut wipe = WriteBatch::default();
        wipe.delete_range_cf(b.mvcc.cf(CF_KV), Vec::<u8>::new(), vec![0xFF; 8]);
        b.db().write(wipe).expect("wipe");

        // The start.
        let mut restarted =
            StateMachine::new(b.mvcc.clone(), Arc::default(), b.snapshot_dir.clone())
                .expect("restart");
        let rev = restarted.mvcc.current_revision();
        assert_eq!(rev, a.mvcc.current_revision());
        let kv = restarted
            .mvcc
            .get(b"k000", rev)
            .expect("get")
            .expect("k000");
        assert_eq!(kv.value, b"from-a".to_vec());
        assert!(restarted.mvcc.get(b"only-b", rev).expect("get").is_none());
        let (applied, _) = restarted.applied_state().await.expect("applied");
        assert_eq!(applied.map(|l| l.index), Some(7));
        let current = restarted
            .get_current_snapshot()
            .await
            .expect("get")
            .expect("current");
        assert_eq!(current.meta, built.meta);
        let left: Vec<String> = std::fs::read_dir(&b.snapshot_dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec!["current.snap".to_string()], "{left:?}");

        // An install that completes leaves no marker behind.
        let mut receiving = restarted.begin_receiving_snapshot().await.expect("begin");
        let data = a.get_current_snapshot().await.expect("get").expect("a's");
        let mut data = a.sendable(data).await.expect("records to send");
        tokio::io::copy(&mut data.snapshot, &mut receiving)
            .await
            .expect("copy");
        restarted
            .install_snapshot(&built.meta, receiving)
            .await
            .expect("install");
        assert!(!restarted.install_marker().exists());
    }

    /// A crash after an entry's first write resumes after the commands that write covered.
    #[test]
    fn an_entry_cut_short_resumes_after_its_last_write() {
        let (_dir, sm) = machine();
        let requests = vec![
            put("a", "1", 0),
            put("b", "1", 0),
            command::Request::LeaseGrant(LeaseGrantRequest { id: 9, ttl: 60 }),
            put("c", "1", 0),
        ];
        let e = entry(1, requests.clone());
        // What the first write of the entry leaves: the two puts and applied_partial = 2.
        let mut group = Group::default();
        for r in &requests[..2] {
            let mut applier = Applier::after(&sm.mvcc, Some(&group));
            let command = Command {
                auth: None,
                request: Some(r.clone()),
            };
            sm.apply_command(&mut applier, &command).expect("apply");
            let applied = applier.finish();
            group.add(applied);
        }
        sm.write_group(&mut group, e.log_id, 1, 3).expect("write");
        assert!(sm.partial_marker.load(Ordering::Acquire));
        assert_eq!(sm.commands_already_applied(e.log_id).expect("partial"), 2);
        // Replaying the entry applies only what is left.
        sm.apply_entry(e).expect("apply");
        assert_eq!(sm.mvcc.current_revision(), 4);
        let a = sm.mvcc.get(b"a", 4).expect("get").expect("a");
        assert_eq!((a.version, a.mod_revision), (1, 2));
        assert!(sm.mvcc.lease(9).expect("lease").is_some());
        assert_eq!(
            sm.mvcc.get(b"c", 4).expect("get").map(|kv| kv.mod_revision),
            Some(4)
        );
        assert!(sm
            .mvcc
            .meta_get(META_APPLIED_PARTIAL)
            .expect("meta")
            .is_none());
        // The entry is whole: later entries do not look for a marker.
        assert!(!sm.partial_marker.load(Ordering::Acquire));
    }
}
