//! The etcd Lease service.

use std::pin::Pin;
use std::sync::Arc;

use flotilla_proto::etcdserverpb::lease_server::Lease;
use flotilla_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use flotilla_proto::flotillapb::{command, command_result};
use futures::Stream;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Access;
use crate::error::EtcdError;
use crate::lease::MAX_LEASE_TTL;
use crate::member::Member;

/// Responses a keep-alive stream may have queued for a slow client.
const KEEPALIVE_STREAM_BUFFER: usize = 64;

pub struct LeaseService {
    pub member: Arc<Member>,
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let auth = self.member.auth_info(request.metadata()).await?;
        self.member.mvcc.auth().check_user(Some(&auth))?;
        let mut req = request.into_inner();
        if req.ttl > MAX_LEASE_TTL {
            return Err(EtcdError::LeaseTtlTooLarge.into());
        }
        req.ttl = req.ttl.max(self.member.limits.min_lease_ttl);
        self.member
            .quota_check(crate::member::QUOTA_LEASE_OVERHEAD)
            .await?;
        let choose_id = req.id == 0;
        for _ in 0..8 {
            if choose_id {
                // Positive and non-zero, like the IDs etcd hands out.
                req.id = rand::thread_rng().gen_range(1..i64::MAX);
            }
            let command =
                Member::client_command(command::Request::LeaseGrant(req.clone()), auth.clone());
            match self.member.propose(command).await {
                Ok(command_result::Result::LeaseGrant(mut r)) => {
                    self.member.stamp(&mut r.header);
                    return Ok(Response::new(r));
                }
                Ok(_) => {
                    return Err(EtcdError::Internal(
                        "state machine answered a different request".into(),
                    )
                    .into())
                }
                Err(EtcdError::LeaseExists) if choose_id => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(EtcdError::LeaseExists.into())
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let auth = self.member.auth_info(request.metadata()).await?;
        let mvcc = &self.member.mvcc;
        mvcc.auth()
            .check_lease_keys(Some(&auth), request.get_ref().id, &|l| {
                Ok(mvcc.lease_keys(l)?)
            })?;
        let req = request.into_inner();
        match self
            .member
            .propose(Member::client_command(
                command::Request::LeaseRevoke(req),
                auth,
            ))
            .await?
        {
            command_result::Result::LeaseRevoke(mut r) => {
                self.member.stamp(&mut r.header);
                Ok(Response::new(r))
            }
            _ => {
                Err(EtcdError::Internal("state machine answered a different request".into()).into())
            }
        }
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(KEEPALIVE_STREAM_BUFFER);
        let member = self.member.clone();
        tokio::spawn(async move {
            loop {
                let req = match incoming.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) | Err(_) => return,
                };
                let resp = member.lease_keep_alive(req).await.map_err(Status::from);
                let failed = resp.is_err();
                if tx.send(resp).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let auth = self.member.auth_info(request.metadata()).await?;
        self.member.mvcc.auth().check_user(Some(&auth))?;
        let resp = self.member.lease_time_to_live(request.into_inner()).await?;
        // The attached keys are shown only to a user who may read every one of them.
        let state = self.member.mvcc.auth();
        for key in &resp.keys {
            state.check_range(Some(&auth), key, &[], Access::Read)?;
        }
        Ok(Response::new(resp))
    }

    async fn lease_leases(
        &self,
        request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let auth = self.member.auth_info(request.metadata()).await?;
        self.member.linearizable_barrier().await?;
        self.member.mvcc.auth().check_user(Some(&auth))?;
        let leases = self.member.mvcc.leases().map_err(EtcdError::from)?;
        Ok(Response::new(LeaseLeasesResponse {
            header: Some(self.member.header(self.member.mvcc.current_revision())),
            leases: leases
                .into_iter()
                .map(|(id, _)| LeaseStatus { id })
                .collect(),
        }))
    }
}
