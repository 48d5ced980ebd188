//! The etcd Cluster and Maintenance services.

use std::pin::Pin;
use std::sync::Arc;

use flotilla_proto::etcdserverpb::cluster_server::Cluster;
use flotilla_proto::etcdserverpb::maintenance_server::Maintenance;
use flotilla_proto::etcdserverpb::*;
use flotilla_proto::flotillapb::{forward_request, forward_response};
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::error::EtcdError;
use crate::member::Member;
use crate::mvcc::{CF_KV, CF_REV};

/// The etcd API version this store speaks, reported by Status.
pub const ETCD_API_VERSION: &str = "3.5.0";

pub struct ClusterService {
    pub member: Arc<Member>,
}

fn not_yet(what: &str) -> Status {
    Status::unimplemented(format!("flotilla: {what} is not supported yet"))
}

impl ClusterService {
    async fn change(
        &self,
        request: forward_request::Request,
    ) -> Result<forward_response::Response, Status> {
        Ok(self.member.change_membership(request).await?)
    }
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
            .change(forward_request::Request::MemberAdd(r.into_inner()))
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
            .change(forward_request::Request::MemberRemove(r.into_inner()))
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
            .change(forward_request::Request::MemberUpdate(r.into_inner()))
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
            .change(forward_request::Request::MemberPromote(r.into_inner()))
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

impl MaintenanceService {
    async fn hash_at(&self, revision: i64) -> Result<(u32, i64), Status> {
        let mvcc = self.member.mvcc.clone();
        tokio::task::spawn_blocking(move || mvcc.hash_kv(revision))
            .await
            .map_err(|e| EtcdError::Internal(e.to_string()))?
            .map_err(|e| EtcdError::from(e).into())
    }

    fn db_size(&self) -> (i64, i64) {
        let db = self.member.mvcc.db();
        let prop = |name: &str| -> i64 {
            [CF_KV, CF_REV]
                .iter()
                .filter_map(|cf| {
                    db.property_int_value_cf(self.member.mvcc.cf(cf), name)
                        .ok()
                        .flatten()
                })
                .sum::<u64>() as i64
        };
        let total = prop("rocksdb.total-sst-files-size") + prop("rocksdb.cur-size-all-mem-tables");
        let live =
            prop("rocksdb.estimate-live-data-size") + prop("rocksdb.cur-size-all-mem-tables");
        (total, live.min(total))
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, _r: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        // No alarm can be raised yet (no quota); GET answers the empty list.
        Ok(Response::new(AlarmResponse {
            header: Some(self.member.header(self.member.mvcc.current_revision())),
            alarms: Vec::new(),
        }))
    }

    async fn status(&self, _r: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let metrics = self.member.raft.metrics().borrow().clone();
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
            errors: Vec::new(),
            db_size_in_use,
            is_learner: !voters.contains(&self.member.id),
        }))
    }

    async fn defragment(
        &self,
        _r: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        // RocksDB reclaims space in its own background compactions; nothing blocks here.
        Ok(Response::new(DefragmentResponse {
            header: Some(self.member.header(self.member.mvcc.current_revision())),
        }))
    }

    async fn hash(&self, _r: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let revision = self.member.mvcc.current_revision();
        let (hash, _) = self.hash_at(revision).await?;
        Ok(Response::new(HashResponse {
            header: Some(self.member.header(revision)),
            hash,
        }))
    }

    async fn hash_kv(&self, r: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
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

    async fn snapshot(
        &self,
        _r: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(not_yet("snapshot"))
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
