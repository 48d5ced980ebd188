//! The etcd KV service.

use std::sync::Arc;

use flotilla_proto::etcdserverpb::kv_server::Kv;
use flotilla_proto::etcdserverpb::{
    response_op, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use flotilla_proto::flotillapb::{command, command_result};
use tonic::{Request, Response, Status};

use super::validate;
use crate::auth::Access;
use crate::error::EtcdError;
use crate::member::{Member, QUOTA_PUT_OVERHEAD};
use crate::mvcc::apply::txn_has_put;
use prost::Message;

/// Ranges with at most this many keys are read on the async worker.
const INLINE_RANGE_LIMIT: i64 = 1000;

pub struct KvService {
    pub member: Arc<Member>,
}

fn unexpected() -> Status {
    EtcdError::Internal("state machine answered a different request".into()).into()
}

impl KvService {
    fn stamp_txn(&self, resp: &mut TxnResponse) {
        self.member.stamp(&mut resp.header);
        for op in &mut resp.responses {
            match &mut op.response {
                Some(response_op::Response::ResponseRange(r)) => self.member.stamp(&mut r.header),
                Some(response_op::Response::ResponsePut(r)) => self.member.stamp(&mut r.header),
                Some(response_op::Response::ResponseDeleteRange(r)) => {
                    self.member.stamp(&mut r.header)
                }
                Some(response_op::Response::ResponseTxn(r)) => self.stamp_txn(r),
                None => {}
            }
        }
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let auth = self.member.auth_info(request.metadata()).await?;
        let req = request.into_inner();
        validate::range(&req)?;
        if !req.serializable {
            self.member.linearizable_barrier().await?;
        }
        // After the barrier: a linearizable read sees the alarms and permissions as of its
        // start (a CORRUPT alarm raised before it began refuses it even on a lagging member).
        if self
            .member
            .mvcc
            .alarms()
            .contains(&(self.member.id, crate::mvcc::ALARM_CORRUPT))
        {
            return Err(EtcdError::Corrupt.into());
        }
        self.member
            .mvcc
            .auth()
            .check_range(Some(&auth), &req.key, &req.range_end, Access::Read)?;
        let revision = self.member.mvcc.resolve_revision(req.revision)?;
        // A single key or a short page is read inline; a range that may be large is read on
        // the blocking pool so it does not hold up other requests on this worker.
        let small = req.range_end.is_empty() || (req.limit > 0 && req.limit <= INLINE_RANGE_LIMIT);
        let mut resp = if small {
            self.member.mvcc.range(&req, revision)?
        } else {
            let mvcc = self.member.mvcc.clone();
            tokio::task::spawn_blocking(move || mvcc.range(&req, revision))
                .await
                .map_err(|e| EtcdError::Internal(e.to_string()))??
        };
        resp.header = Some(self.member.header(revision));
        Ok(Response::new(resp))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let auth = self.member.auth_info(request.metadata()).await?;
        let req = request.into_inner();
        validate::put(&req)?;
        self.member.check_size(&req)?;
        let state = self.member.mvcc.auth();
        state.check_range(Some(&auth), &req.key, &[], Access::Write)?;
        if req.prev_kv {
            state.check_range(Some(&auth), &req.key, &[], Access::Read)?;
        }
        let mvcc = &self.member.mvcc;
        state.check_lease_keys(Some(&auth), req.lease, &|l| Ok(mvcc.lease_keys(l)?))?;
        self.member
            .quota_check((req.key.len() + req.value.len()) as u64 + QUOTA_PUT_OVERHEAD)
            .await?;
        match self
            .member
            .propose(Member::client_command(command::Request::Put(req), auth))
            .await?
        {
            command_result::Result::Put(mut r) => {
                self.member.stamp(&mut r.header);
                Ok(Response::new(r))
            }
            _ => Err(unexpected()),
        }
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let auth = self.member.auth_info(request.metadata()).await?;
        let req = request.into_inner();
        validate::delete_range(&req)?;
        self.member.check_size(&req)?;
        let state = self.member.mvcc.auth();
        state.check_range(Some(&auth), &req.key, &req.range_end, Access::Write)?;
        if req.prev_kv {
            state.check_range(Some(&auth), &req.key, &req.range_end, Access::Read)?;
        }
        match self
            .member
            .propose(Member::client_command(
                command::Request::DeleteRange(req),
                auth,
            ))
            .await?
        {
            command_result::Result::DeleteRange(mut r) => {
                self.member.stamp(&mut r.header);
                Ok(Response::new(r))
            }
            _ => Err(unexpected()),
        }
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let auth = self.member.auth_info(request.metadata()).await?;
        let req = request.into_inner();
        validate::txn(&req, self.member.limits.max_txn_ops)?;
        self.member.check_size(&req)?;
        let state = self.member.mvcc.auth();
        state.check_txn(Some(&auth), &req)?;
        let mut leases = Vec::new();
        crate::auth::AuthState::txn_put_leases(&req, &mut leases);
        let mvcc = &self.member.mvcc;
        for lease in leases {
            state.check_lease_keys(Some(&auth), lease, &|l| Ok(mvcc.lease_keys(l)?))?;
        }
        if txn_has_put(&req) {
            self.member
                .quota_check(req.encoded_len() as u64 + QUOTA_PUT_OVERHEAD)
                .await?;
        }
        match self
            .member
            .propose(Member::client_command(command::Request::Txn(req), auth))
            .await?
        {
            command_result::Result::Txn(mut r) => {
                self.stamp_txn(&mut r);
                Ok(Response::new(r))
            }
            _ => Err(unexpected()),
        }
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let auth = self.member.auth_info(request.metadata()).await?;
        self.member.mvcc.auth().check_user(Some(&auth))?;
        let req = request.into_inner();
        let physical = req.physical;
        let revision = req.revision;
        let mut resp = match self
            .member
            .propose(Member::client_command(
                command::Request::Compaction(req),
                auth,
            ))
            .await?
        {
            command_result::Result::Compaction(r) => r,
            _ => return Err(unexpected()),
        };
        if physical {
            let mut progress = self.member.mvcc.compaction_progress();
            progress
                .wait_for(|done| *done >= revision)
                .await
                .map_err(|_| Status::from(EtcdError::Stopped))?;
        }
        self.member.stamp(&mut resp.header);
        Ok(Response::new(resp))
    }
}
