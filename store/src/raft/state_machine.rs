//! The Raft state machine: applies committed entries to the MVCC store, and builds and
//! installs snapshots.
//!
//! The applied log id and membership are written in the same WriteBatch as the changes of the
//! entry they describe, so replaying the log after a crash is idempotent.
//!
//! A snapshot is a file: every record of the `kv`, `rev` and `meta` families read from one
//! RocksDB snapshot, as `[family u8][key len u32][key][value len u32][value]` records.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use flotilla_proto::etcdserverpb::{request_op, TxnRequest};
use flotilla_proto::flotillapb::{
    command, command_result, BatchResult, Command, CommandBatch, CommandResult, Empty, Error,
};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta};
use prost::Message;
use rocksdb::{WriteBatch, DB};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    io_error, read_error, Entry, LogId, MemberNode, NodeId, RaftResponse, RaftStorageError,
    StoredMembership, TypeConfig,
};
use crate::error::EtcdError;
use crate::lease::LeaseKeeper;
use crate::mvcc::apply::{Applier, Group};
use crate::mvcc::keys::{member_meta_key, META_APPLIED, META_APPLIED_PARTIAL, META_MEMBERSHIP};
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
}

const SNAPSHOT_FAMILIES: [&str; 3] = [CF_KV, CF_REV, CF_META];

impl StateMachine {
    pub fn new(
        mvcc: Arc<Mvcc>,
        leases: Arc<LeaseKeeper>,
        snapshot_dir: PathBuf,
    ) -> std::io::Result<StateMachine> {
        std::fs::create_dir_all(&snapshot_dir)?;
        Ok(StateMachine {
            mvcc,
            leases,
            snapshot_dir,
        })
    }

    fn db(&self) -> &DB {
        self.mvcc.db()
    }

    fn data_path(&self) -> PathBuf {
        self.snapshot_dir.join("current.data")
    }

    fn meta_path(&self) -> PathBuf {
        self.snapshot_dir.join("current.meta")
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
    fn commands_already_applied(&self, log_id: LogId) -> Result<usize, RaftStorageError> {
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
    fn apply_entry(&self, entry: Entry) -> Result<RaftResponse, RaftStorageError> {
        let log_id = entry.log_id;
        let meta = self.mvcc.cf(CF_META);
        let finished = |mut batch: WriteBatch| {
            batch.put_cf(meta, META_APPLIED, encode(&Some(log_id)));
            batch.delete_cf(meta, META_APPLIED_PARTIAL);
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
            return Ok(RaftResponse::default());
        }
        let skip = self.commands_already_applied(log_id)?;
        let last = commands.len() - 1;
        let mut results = Vec::with_capacity(commands.len());
        // Commands applied since the last write, which the next write covers.
        let mut group = Group::default();
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
            let mut applier = Applier::after(&self.mvcc, Some(&group));
            let result = self.apply_command(&mut applier, command);
            if result.is_ok() {
                let applied = applier.finish();
                group.add(&self.mvcc, applied);
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

    /// Writes the group, which covers the entry's commands up to `upto`, with how far the
    /// entry got: the entry's log id once its `last` command is in, else `applied_partial`.
    /// A crash inside a batch therefore resumes after the last command written.
    fn write_group(
        &self,
        group: &mut Group,
        log_id: LogId,
        upto: usize,
        last: usize,
    ) -> Result<(), RaftStorageError> {
        let meta = self.mvcc.cf(CF_META);
        let (mut batch, outcomes) = group.take(&self.mvcc);
        if upto == last {
            batch.put_cf(meta, META_APPLIED, encode(&Some(log_id)));
            batch.delete_cf(meta, META_APPLIED_PARTIAL);
        } else {
            batch.put_cf(
                meta,
                META_APPLIED_PARTIAL,
                encode(&(log_id, (upto + 1) as u64)),
            );
        }
        self.mvcc.commit(batch, outcomes).map_err(io_error)
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

    /// Dumps the three families from one consistent RocksDB snapshot.
    fn dump(&self) -> Result<(Option<LogId>, StoredMembership, Vec<u8>), RaftStorageError> {
        let snap = self.db().snapshot();
        let meta = self.mvcc.cf(CF_META);
        let applied: Option<LogId> = match snap.get_cf(meta, META_APPLIED).map_err(read_error)? {
            Some(v) => decode("applied", &v).map_err(read_error)?,
            None => None,
        };
        let membership: StoredMembership =
            match snap.get_cf(meta, META_MEMBERSHIP).map_err(read_error)? {
                Some(v) => decode("membership", &v).map_err(read_error)?,
                None => StoredMembership::default(),
            };
        let mut data = Vec::new();
        for (tag, name) in SNAPSHOT_FAMILIES.iter().enumerate() {
            let mut it = snap.raw_iterator_cf(self.mvcc.cf(name));
            it.seek_to_first();
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                data.push(tag as u8);
                data.extend_from_slice(&(k.len() as u32).to_be_bytes());
                data.extend_from_slice(k);
                data.extend_from_slice(&(v.len() as u32).to_be_bytes());
                data.extend_from_slice(v);
                it.next();
            }
            it.status().map_err(read_error)?;
        }
        Ok((applied, membership, data))
    }

    /// Replaces the whole state with a dump, then reloads the in-memory counters.
    fn load(&self, data: &[u8]) -> Result<(), RaftStorageError> {
        let corrupt = || read_error(std::io::Error::other("snapshot data is truncated"));
        for name in SNAPSHOT_FAMILIES {
            let cf = self.mvcc.cf(name);
            let mut it = self.db().raw_iterator_cf(cf);
            it.seek_to_last();
            if let Some(last) = it.key() {
                let mut end = last.to_vec();
                end.push(0);
                let mut batch = WriteBatch::default();
                batch.delete_range_cf(cf, Vec::<u8>::new(), end);
                self.db().write(batch).map_err(io_error)?;
            }
        }
        let mut batch = WriteBatch::default();
        let mut pos = 0usize;
        let take = |pos: &mut usize, n: usize| -> Result<&[u8], RaftStorageError> {
            let s = data.get(*pos..*pos + n).ok_or_else(corrupt)?;
            *pos += n;
            Ok(s)
        };
        while pos < data.len() {
            let tag = take(&mut pos, 1)?[0] as usize;
            let klen =
                u32::from_be_bytes(take(&mut pos, 4)?.try_into().map_err(|_| corrupt())?) as usize;
            let k = take(&mut pos, klen)?;
            let vlen =
                u32::from_be_bytes(take(&mut pos, 4)?.try_into().map_err(|_| corrupt())?) as usize;
            let v = take(&mut pos, vlen)?;
            let name = SNAPSHOT_FAMILIES.get(tag).ok_or_else(corrupt)?;
            batch.put_cf(self.mvcc.cf(name), k, v);
            if batch.len() >= 10_000 {
                self.db()
                    .write(std::mem::take(&mut batch))
                    .map_err(io_error)?;
            }
        }
        self.db().write(batch).map_err(io_error)?;
        self.db().flush_wal(true).map_err(io_error)?;
        self.mvcc.reload().map_err(io_error)?;
        self.leases.reload(&self.mvcc);
        Ok(())
    }

    async fn save_snapshot_files(
        &self,
        meta: &SnapshotMeta<NodeId, MemberNode>,
        data: &[u8],
    ) -> Result<(), RaftStorageError> {
        let tmp = self.snapshot_dir.join("incoming.data");
        let mut f = tokio::fs::File::create(&tmp).await.map_err(io_error)?;
        f.write_all(data).await.map_err(io_error)?;
        f.sync_all().await.map_err(io_error)?;
        tokio::fs::rename(&tmp, self.data_path())
            .await
            .map_err(io_error)?;
        let tmp_meta = self.snapshot_dir.join("incoming.meta");
        tokio::fs::write(&tmp_meta, encode(meta))
            .await
            .map_err(io_error)?;
        tokio::fs::rename(&tmp_meta, self.meta_path())
            .await
            .map_err(io_error)?;
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let this = self.clone();
        let (applied, membership, data) =
            tokio::task::spawn_blocking(move || this.dump())
                .await
                .map_err(|e| io_error(std::io::Error::other(e.to_string())))??;
        let snapshot_id = format!(
            "{}-{}",
            applied.map(|l| l.leader_id.term).unwrap_or(0),
            applied.map(|l| l.index).unwrap_or(0)
        );
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        };
        self.save_snapshot_files(&meta, &data).await?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership), RaftStorageError> {
        let applied: Option<LogId> = match self.mvcc.meta_get(META_APPLIED).map_err(read_error)? {
            Some(v) => decode("applied", &v).map_err(read_error)?,
            None => None,
        };
        let membership = match self.mvcc.meta_get(META_MEMBERSHIP).map_err(read_error)? {
            Some(v) => decode("membership", &v).map_err(read_error)?,
            None => StoredMembership::default(),
        };
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<RaftResponse>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Each entry is one small unsynced RocksDB write: cheaper inline than a thread handoff.
        entries.into_iter().map(|e| self.apply_entry(e)).collect()
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, RaftStorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, MemberNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), RaftStorageError> {
        let data = snapshot.into_inner();
        tokio::task::block_in_place(|| self.load(&data))?;
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
        self.db().write(batch).map_err(io_error)?;
        self.save_snapshot_files(meta, &data).await?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        let meta_bytes = match tokio::fs::read(self.meta_path()).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_error(e)),
        };
        let meta: SnapshotMeta<NodeId, MemberNode> =
            decode("snapshot meta", &meta_bytes).map_err(read_error)?;
        let data = tokio::fs::read(self.data_path())
            .await
            .map_err(read_error)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[allow(dead_code)]
async fn read_all(mut f: tokio::fs::File) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    f.read_to_end(&mut v).await?;
    Ok(v)
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
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
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
            group.add(&sm.mvcc, applied);
        }
        sm.write_group(&mut group, e.log_id, 1, 3).expect("write");
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
    }
}
