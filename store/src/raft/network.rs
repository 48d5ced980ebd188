//! Raft's transport: openraft messages, bincode-encoded, over the `flotillapb.Peer` gRPC
//! service on the peer URLs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::flotillapb::peer_client::PeerClient;
use flotilla_proto::flotillapb::RaftPayload;
use openraft::error::{
    NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{Backoff, RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::OptionalSend;
use openraft_legacy::network_v1::{
    Adapter, InstallSnapshotError, InstallSnapshotRequest, InstallSnapshotResponse, RaftNetwork,
};
use tonic::transport::{Channel, Endpoint};

use super::state_machine::StateMachine;
use super::{MemberNode, NodeId, Snapshot, TypeConfig, Vote};

/// Largest peer message: a snapshot chunk or a batch of log entries.
pub const MAX_PEER_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// What a leader answers a vote request from a node that is no longer a member.
pub const REMOVED_MEMBER: &str = "the member has been permanently removed from the cluster";

/// gRPC channels to other members, one per peer URL, made on first use.
#[derive(Default)]
pub struct PeerClients {
    channels: Mutex<HashMap<String, Channel>>,
    /// For `https://` peer URLs (`--peer-cert-file` and friends).
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    /// Set when a leader told this member it was removed (it may have missed the log entry
    /// that removed it: a leader stops replicating to a member it removes).
    pub removed: std::sync::atomic::AtomicBool,
}

const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl PeerClients {
    pub fn new(tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>) -> PeerClients {
        PeerClients {
            tls,
            ..Default::default()
        }
    }

    pub fn client(&self, url: &str) -> Result<PeerClient<Channel>, PeerUrlError> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match map.get(url) {
            Some(c) => c.clone(),
            None => {
                let c = self.channel(url)?;
                map.insert(url.to_string(), c.clone());
                c
            }
        };
        Ok(PeerClient::new(channel)
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES))
    }
}

/// Why no channel to a peer URL could be made.
#[derive(Debug, thiserror::Error)]
pub enum PeerUrlError {
    #[error("peer URL: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(
        "{0}: an https peer URL needs --peer-cert-file, --peer-key-file and --peer-trusted-ca-file"
    )]
    NoTls(String),
    #[error("{0}: {1}")]
    Bad(String, String),
}

impl PeerClients {
    fn channel(&self, url: &str) -> Result<Channel, PeerUrlError> {
        if !url.starts_with("https://") {
            return Ok(Endpoint::from_shared(url.to_string())?
                .connect_timeout(PEER_CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .connect_lazy());
        }
        let Some(config) = self.tls.clone() else {
            return Err(PeerUrlError::NoTls(url.to_string()));
        };
        crate::server::tls::https_channel(url, config)
            .map_err(|e| PeerUrlError::Bad(url.to_string(), e))
    }
}

#[derive(Clone)]
pub struct Network {
    pub peers: Arc<PeerClients>,
    /// Turns a snapshot that is a checkpoint into the records a follower installs.
    pub state_machine: StateMachine,
}

pub struct Connection {
    target: NodeId,
    url: String,
    peers: Arc<PeerClients>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &MemberNode) -> Self::Network {
        PeerNetwork {
            rpc: Connection {
                target,
                url: node.peer_urls.first().cloned().unwrap_or_default(),
                peers: self.peers.clone(),
            }
            .into_v2(),
            state_machine: self.state_machine.clone(),
        }
    }
}

/// One peer's messages: openraft-legacy's chunked snapshot transfer over [`Connection`], with
/// a checkpoint's records written out before it is sent.
pub struct PeerNetwork {
    rpc: Adapter<TypeConfig, Connection, tokio::fs::File>,
    state_machine: StateMachine,
}

impl RaftNetworkV2<TypeConfig> for PeerNetwork {
    type SnapshotData = tokio::fs::File;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc.append_entries(rpc, option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc.vote(rpc, option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl std::future::Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        // A failure here (a newer snapshot pruned this one's checkpoint meanwhile) is retried
        // by the replication task like a network error, with a fresh snapshot.
        let snapshot = self
            .state_machine
            .sendable(snapshot)
            .await
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        self.rpc.full_snapshot(vote, snapshot, cancel, option).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc.transfer_leader(req, option).await
    }

    fn backoff(&self) -> Option<Backoff> {
        self.rpc.backoff()
    }
}

type RpcResult<T, E> = Result<T, RPCError<TypeConfig, RaftError<TypeConfig, E>>>;

impl Connection {
    async fn call<Req, Resp, E>(
        &self,
        kind: &'static str,
        req: &Req,
        timeout: Duration,
    ) -> RpcResult<Resp, E>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let data = bincode::serialize(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut client = self
            .peers
            .client(&self.url)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { data });
        request.set_timeout(timeout);
        let reply = match kind {
            "append" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        if let Err(s) = &reply {
            if s.message() == REMOVED_MEMBER {
                self.peers
                    .removed
                    .store(true, std::sync::atomic::Ordering::Release);
            }
        }
        let reply = reply.map_err(|s| match s.code() {
            tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&s)),
            _ => RPCError::Network(NetworkError::new(&s)),
        })?;
        let decoded: Result<Resp, RaftError<TypeConfig, E>> =
            bincode::deserialize(&reply.into_inner().data)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        decoded.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<TypeConfig>, openraft::error::Infallible> {
        self.call("append", &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<TypeConfig>, InstallSnapshotError> {
        self.call("snapshot", &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<TypeConfig>, openraft::error::Infallible> {
        self.call("vote", &rpc, option.hard_ttl()).await
    }
}
