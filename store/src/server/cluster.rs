//! The etcd Cluster and Maintenance services.

use openraft::async_runtime::WatchReceiver as _;
use std::pin::Pin;
use std::sync::Arc;

use flotilla_proto::etcdserverpb::cluster_server::Cluster;
use flotilla_proto::etcdserverpb::maintenance_server::Maintenance;
use flotilla_proto::etcdserverpb::*;
use flotilla_proto::flotillapb::{command, command_result, forward_request, forward_response};
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::backup;
use crate::error::EtcdError;
use crate::member::Member;

/// The etcd API version this store speaks, reported by Status.
pub const ETCD_API_VERSION: &str = "3.5.0";

pub struct ClusterService {
    pub member: Arc<Member>,
}

fn not_yet(what: &str) -> Status {
    Status::unimplemented(format!("flotilla: {what} is not supported yet"))
}

impl ClusterService {
    /// Membership changes are for the root role only when auth is on.
    async fn change(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        request: forward_request::Request,
    ) -> Result<forward_response::Response, Status> {
        admin(&self.member, metadata).await?;
        Ok(self.member.change_membership(request).await?)
    }
}

/// Refuses a request unless auth is off or its token is a root-role user's.
async fn admin(member: &Member, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
    let auth = member.auth_info(metadata).await?;
    member.mvcc.auth().check_admin(Some(&auth))?;
    Ok(())
}

fn stamp(member: &Member, header: &mut Option<ResponseHeader>) {
    member.stamp(header);
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        r: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        match self
            .change(
                r.metadata(),
                forward_request::Request::MemberAdd(r.get_ref().clone()),
            )
            .await?
        {
            forward_response::Response::MemberAdd(mut resp) => {
                stamp(&self.member, &mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(EtcdError::Internal("leader answered a different request".into()).into()),
        }
    }
    async fn member_remove(
        &self,
        r: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        match self
            .change(
                r.metadata(),
                forward_request::Request::MemberRemove(r.get_ref().clone()),
            )
            .await?
        {
            forward_response::Response::MemberRemove(mut resp) => {
                stamp(&self.member, &mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(EtcdError::Internal("leader answered a different request".into()).into()),
        }
    }
    async fn member_update(
        &self,
        r: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        match self
            .change(
                r.metadata(),
                forward_request::Request::MemberUpdate(r.get_ref().clone()),
            )
            .await?
        {
            forward_response::Response::MemberUpdate(mut resp) => {
                stamp(&self.member, &mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(EtcdError::Internal("leader answered a different request".into()).into()),
        }
    }
    async fn member_promote(
        &self,
        r: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        match self
            .change(
                r.metadata(),
                forward_request::Request::MemberPromote(r.get_ref().clone()),
            )
            .await?
        {
            forward_response::Response::MemberPromote(mut resp) => {
                stamp(&self.member, &mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(EtcdError::Internal("leader answered a different request".into()).into()),
        }
    }
    async fn member_list(
        &self,
        request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        if request.into_inner().linearizable {
            self.member.linearizable_barrier().await?;
        }
        Ok(Response::new(MemberListResponse {
            header: Some(self.member.header(self.member.mvcc.current_revision())),
            members: self.member.member_list(),
        }))
    }
}

pub struct MaintenanceService {
    pub member: Arc<Member>,
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

/// Cuts a backup into messages for the snapshot stream (on the blocking writer thread).
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, Status>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(backup::CHUNK));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::other("the client went away"))
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = backup::CHUNK - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= backup::CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl MaintenanceService {
    async fn hash_at(&self, revision: i64) -> Result<(u32, i64), Status> {
        let mvcc = self.member.mvcc.clone();
        tokio::task::spawn_blocking(move || mvcc.hash_kv(revision))
            .await
            .map_err(|e| EtcdError::Internal(e.to_string()))?
            .map_err(|e| EtcdError::from(e).into())
    }

    fn db_size(&self) -> (i64, i64) {
        self.member.mvcc.refresh_size()
    }
}

fn alarm_name(alarm: i32) -> &'static str {
    match AlarmType::try_from(alarm) {
        Ok(AlarmType::Nospace) => "NOSPACE",
        Ok(AlarmType::Corrupt) => "CORRUPT",
        _ => "NONE",
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    /// GET lists the raised alarms; ACTIVATE and DEACTIVATE go through Raft, so every member
    /// agrees on them (`etcdctl alarm disarm` deactivates each listed alarm).
    async fn alarm(&self, r: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let auth = self.member.auth_info(r.metadata()).await?;
        let req = r.into_inner();
        if req.action == alarm_request::AlarmAction::Get as i32 {
            let alarms = self
                .member
                .mvcc
                .alarms()
                .into_iter()
                .filter(|(_, a)| req.alarm == 0 || *a == req.alarm)
                .map(|(member_id, alarm)| AlarmMember { member_id, alarm })
                .collect();
            return Ok(Response::new(AlarmResponse {
                header: Some(self.member.header(self.member.mvcc.current_revision())),
                alarms,
            }));
        }
        self.member.mvcc.auth().check_admin(Some(&auth))?;
        let command = Member::client_command(command::Request::Alarm(req), auth);
        match self.member.propose(command).await? {
            command_result::Result::Alarm(mut r) => {
                stamp(&self.member, &mut r.header);
                Ok(Response::new(r))
            }
            _ => {
                Err(EtcdError::Internal("state machine answered a different request".into()).into())
            }
        }
    }

    async fn status(&self, _r: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let metrics = self.member.raft.metrics().borrow_watched().clone();
        let (db_size, db_size_in_use) = self.db_size();
        let voters: Vec<u64> = metrics.membership_config.membership().voter_ids().collect();
        Ok(Response::new(StatusResponse {
            header: Some(self.member.header(self.member.mvcc.current_revision())),
            version: ETCD_API_VERSION.to_string(),
            db_size,
            leader: metrics.current_leader.unwrap_or(0),
            raft_index: metrics.last_log_index.unwrap_or(0),
            raft_term: metrics.current_term,
            raft_applied_index: metrics.last_applied.map(|l| l.index).unwrap_or(0),
            errors: self
                .member
                .mvcc
                .alarms()
                .into_iter()
                .map(|(member, alarm)| format!("memberID:{member} alarm:{} ", alarm_name(alarm)))
                .collect(),
            db_size_in_use,
            is_learner: !voters.contains(&self.member.id),
        }))
    }

    async fn defragment(
        &self,
        r: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        admin(&self.member, r.metadata()).await?;
        // A full manual compaction of every family: it rewrites the data without the
        // versions and tombstones an MVCC compaction left, and gives the space back. RocksDB
        // runs it beside normal writes (they go on to new memtables and files), so writes
        // are never blocked for its duration.
        let mvcc = self.member.mvcc.clone();
        tokio::task::spawn_blocking(move || {
            mvcc.compact_storage();
            mvcc.refresh_size();
        })
        .await
        .map_err(|e| EtcdError::Internal(e.to_string()))?;
        Ok(Response::new(DefragmentResponse {
            header: Some(self.member.header(self.member.mvcc.current_revision())),
        }))
    }

    async fn hash(&self, r: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        admin(&self.member, r.metadata()).await?;
        let revision = self.member.mvcc.current_revision();
        let (hash, _) = self.hash_at(revision).await?;
        Ok(Response::new(HashResponse {
            header: Some(self.member.header(revision)),
            hash,
        }))
    }

    async fn hash_kv(&self, r: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        admin(&self.member, r.metadata()).await?;
        let current = self.member.mvcc.current_revision();
        let requested = r.into_inner().revision;
        let revision = if requested <= 0 {
            current
        } else {
            self.member.mvcc.resolve_revision(requested)?
        };
        let (hash, compact_revision) = self.hash_at(revision).await?;
        Ok(Response::new(HashKvResponse {
            header: Some(self.member.header(current)),
            hash,
            compact_revision,
            hash_revision: revision,
        }))
    }

    type SnapshotStream = SnapshotStream;

    /// Streams a backup (`backup` module format) taken from one consistent point, in
    /// 64 KiB messages; the last carries the SHA-256 trailer and `remaining_bytes` 0.
    async fn snapshot(
        &self,
        r: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        admin(&self.member, r.metadata()).await?;
        let member = &self.member;
        let header = backup::Header {
            revision: member.mvcc.current_revision(),
            compact_revision: member.mvcc.compact_revision(),
            cluster_id: member.cluster_id,
            member_id: member.id,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
        };
        let estimate = self.db_size().0.max(1) as u64;
        let mvcc = member.mvcc.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, Status>>(4);
        tokio::task::spawn_blocking(move || {
            let mut out = ChunkWriter {
                tx: tx.clone(),
                buf: Vec::with_capacity(backup::CHUNK),
            };
            let result = backup::write(mvcc.db(), &header, &mut out).and_then(|_| {
                out.send()?;
                Ok(())
            });
            if let Err(e) = result {
                // A client that went away is no error worth reporting.
                if !tx.is_closed() {
                    tracing::warn!(error = %e, "streaming a snapshot");
                    let _ = tx.blocking_send(Err(EtcdError::Internal(e.to_string()).into()));
                }
            }
        });
        let header = Some(member.header(member.mvcc.current_revision()));
        // One chunk of look-ahead tells the last message, which says 0 bytes remain.
        let stream = futures::stream::unfold(
            (rx, None::<Vec<u8>>, 0u64, false),
            move |(mut rx, ahead, sent, done)| {
                let header = header.clone();
                async move {
                    if done {
                        return None;
                    }
                    let current = match ahead {
                        Some(c) => c,
                        None => match rx.recv().await? {
                            Ok(c) => c,
                            Err(status) => return Some((Err(status), (rx, None, sent, true))),
                        },
                    };
                    let next = match rx.recv().await {
                        Some(Ok(c)) => Some(c),
                        Some(Err(status)) => return Some((Err(status), (rx, None, sent, true))),
                        None => None,
                    };
                    let first = sent == 0;
                    let sent = sent + current.len() as u64;
                    let remaining_bytes = if next.is_some() {
                        estimate.saturating_sub(sent).max(1)
                    } else {
                        0
                    };
                    let last = next.is_none();
                    let msg = SnapshotResponse {
                        header: if first { header } else { None },
                        remaining_bytes,
                        blob: current,
                        version: ETCD_API_VERSION.to_string(),
                    };
                    Some((Ok(msg), (rx, next, sent, last)))
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn move_leader(
        &self,
        _r: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        Err(not_yet("move-leader"))
    }

    async fn downgrade(
        &self,
        _r: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        Err(EtcdError::NotCapable.into())
    }
}
