//! The member-to-member service: Raft messages and requests forwarded to the leader.

use futures::StreamExt;
use openraft::async_runtime::WatchReceiver as _;
use std::sync::Arc;

use flotilla_proto::etcdserverpb::{HashKvRequest, HashKvResponse};
use flotilla_proto::flotillapb::peer_server::Peer;
use flotilla_proto::flotillapb::{
    forward_request, forward_response, BatchResult, CommandResult, ForwardRequest, ForwardResponse,
    ForwardStreamRequest, ForwardStreamResponse, RaftPayload,
};
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft_legacy::network_v1::{ChunkedSnapshotReceiver, InstallSnapshotRequest};
use tonic::{Request, Response, Status};

use crate::error::EtcdError;
use crate::member::Member;
use crate::raft::TypeConfig;

pub struct PeerService {
    pub member: Arc<Member>,
}

fn decode<T: serde::de::DeserializeOwned>(p: &RaftPayload) -> Result<T, Status> {
    bincode::deserialize(&p.data)
        .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))
}

fn payload<T: serde::Serialize>(v: &T) -> Result<RaftPayload, Status> {
    bincode::serialize(v)
        .map(|data| RaftPayload { data })
        .map_err(|e| Status::internal(format!("cannot encode raft message: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Response<RaftPayload>, Status> {
    payload(v).map(Response::new)
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let req: AppendEntriesRequest<TypeConfig> = decode(request.get_ref())?;
        encode(&self.member.raft.append_entries(req).await)
    }

    type StreamAppendStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftPayload, Status>> + Send>>;

    /// A leader's pipelined appends: each request is handed to Raft as it arrives, and the
    /// answers go back in order. An undecodable request ends the stream with an error.
    async fn stream_append(
        &self,
        request: Request<tonic::Streaming<RaftPayload>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<Status>();
        let mut failed_tx = Some(failed_tx);
        let input = request
            .into_inner()
            .map(move |item| {
                let decoded = item.and_then(|p| decode::<AppendEntriesRequest<TypeConfig>>(&p));
                match decoded {
                    Ok(req) => Some(req),
                    Err(status) => {
                        if let Some(tx) = failed_tx.take() {
                            let _ = tx.send(status);
                        }
                        None
                    }
                }
            })
            .take_while(|r| std::future::ready(r.is_some()))
            .filter_map(std::future::ready);
        let answers = self.member.raft.stream_append(input).map(|r| match r {
            Ok(result) => payload(&result),
            Err(fatal) => Err(Status::unavailable(fatal.to_string())),
        });
        // After the last answer: the reason the input ended early, if it did.
        let failure = futures::stream::once(failed_rx).filter_map(|r| {
            std::future::ready(match r {
                Ok(status) => Some(Err(status)),
                Err(_) => None,
            })
        });
        Ok(Response::new(Box::pin(answers.chain(failure))))
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let req: VoteRequest<TypeConfig> = decode(request.get_ref())?;
        // A leader knows the membership: a candidate outside it was removed and missed the
        // news (the leader stopped replicating to it). Tell it, so it stops, as etcd does.
        if self.member.is_leader() {
            let candidate = Some(req.vote.leader_id.node_id);
            let known = candidate.is_some_and(|c| {
                self.member
                    .raft
                    .metrics()
                    .borrow_watched()
                    .membership_config
                    .membership()
                    .get_node(&c)
                    .is_some()
            });
            if !known {
                return Err(Status::failed_precondition(
                    crate::raft::network::REMOVED_MEMBER,
                ));
            }
        }
        encode(&self.member.raft.vote(req).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let req: InstallSnapshotRequest<TypeConfig> = decode(request.get_ref())?;
        encode(&self.member.raft.install_snapshot(req).await)
    }

    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let response = serve_forward(&self.member, request.into_inner().request).await?;
        Ok(Response::new(ForwardResponse {
            response: Some(response),
        }))
    }

    type ForwardStreamStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<ForwardStreamResponse, Status>> + Send>,
    >;

    /// A follower's forwarded requests on one stream (see `crate::forward`).
    async fn forward_stream(
        &self,
        request: Request<tonic::Streaming<ForwardStreamRequest>>,
    ) -> Result<Response<Self::ForwardStreamStream>, Status> {
        let answers = crate::forward::serve(self.member.clone(), request.into_inner());
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(answers),
        )))
    }

    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        let revision = self
            .member
            .mvcc
            .resolve_revision(request.into_inner().revision)?;
        let mvcc = self.member.mvcc.clone();
        let (hash, compact_revision) = tokio::task::spawn_blocking(move || mvcc.hash_kv(revision))
            .await
            .map_err(|e| EtcdError::Internal(e.to_string()))?
            .map_err(EtcdError::from)?;
        Ok(Response::new(HashKvResponse {
            header: Some(self.member.header(self.member.mvcc.current_revision())),
            hash,
            compact_revision,
            hash_revision: revision,
        }))
    }
}

/// Serves one forwarded request on the leader.
pub async fn serve_forward(
    member: &Arc<Member>,
    request: Option<forward_request::Request>,
) -> Result<forward_response::Response, Status> {
    let response = match request {
        Some(forward_request::Request::Command(c)) => {
            let result = member.propose_local(&c).await?;
            forward_response::Response::Command(CommandResult { result })
        }
        Some(forward_request::Request::Commands(batch)) => {
            forward_response::Response::Commands(BatchResult {
                results: member.propose_forwarded(batch.commands).await,
            })
        }
        Some(forward_request::Request::ReadIndex(_)) => {
            if !member.is_leader() {
                return Err(EtcdError::NotLeader.into());
            }
            forward_response::Response::ReadIndex(member.read_index_shared().await?)
        }
        Some(forward_request::Request::LeaseKeepAlive(r)) => {
            if !member.is_leader() {
                return Err(EtcdError::NotLeader.into());
            }
            forward_response::Response::LeaseKeepAlive(member.lease_keep_alive_local(&r).await?)
        }
        Some(forward_request::Request::LeaseTimeToLive(r)) => {
            if !member.is_leader() {
                return Err(EtcdError::NotLeader.into());
            }
            forward_response::Response::LeaseTimeToLive(member.lease_time_to_live_local(&r)?)
        }
        Some(
            r @ (forward_request::Request::MemberAdd(_)
            | forward_request::Request::MemberRemove(_)
            | forward_request::Request::MemberPromote(_)
            | forward_request::Request::MemberUpdate(_)),
        ) => member.change_membership_local(r).await?,
        None => return Err(Status::invalid_argument("empty forward request")),
    };
    Ok(response)
}
