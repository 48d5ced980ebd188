//! Raft's transport: openraft messages, bincode-encoded, over the `flotillapb.Peer` gRPC
//! service on the peer URLs.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_proto::flotillapb::peer_client::PeerClient;
use flotilla_proto::flotillapb::RaftPayload;
use futures::stream::{AbortHandle, Abortable};
use futures::{Stream, StreamExt};
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{
    NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{stream_append_sequential, Backoff, RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
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
        let url = node.peer_urls.first().cloned().unwrap_or_default();
        PeerNetwork {
            rpc: Connection {
                target,
                url: url.clone(),
                peers: self.peers.clone(),
            }
            .into_v2(),
            url,
            peers: self.peers.clone(),
            streaming: true,
            state_machine: self.state_machine.clone(),
        }
    }
}

/// One peer's messages: log entries over one pipelined stream, votes over unary calls, and
/// openraft-legacy's chunked snapshot transfer over [`Connection`], with a checkpoint's
/// records written out before it is sent.
pub struct PeerNetwork {
    rpc: Adapter<TypeConfig, Connection, tokio::fs::File>,
    url: String,
    peers: Arc<PeerClients>,
    /// False once the peer answered that it has no `StreamAppend` (an older version): entries
    /// then go one unary call at a time.
    streaming: bool,
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

    /// Entries go out without waiting for the answers to those before them (etcd's
    /// pipelined appends): the next batch, or the commit index that lets the follower apply,
    /// need not wait a round trip behind the previous one. Answers come back in order on the
    /// same stream. Heartbeats come this way too, one request per stream.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, StreamItem>, RPCError<TypeConfig>>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        if !self.streaming {
            return stream_append_sequential(self, input, option);
        }
        Box::pin(async move {
            let ttl = option.hard_ttl();
            let mut client = self
                .peers
                .client(&self.url)
                .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
            let progress = Arc::new(Mutex::new(Progress::default()));
            let sent = progress.clone();
            // Ends the requests when the answers are dropped or fail, so that a stream
            // openraft gave up on takes none of the next stream's requests, and the
            // follower sees its input end.
            let (stop, registration) = AbortHandle::new_pair();
            let requests = Abortable::new(input, registration).map(move |req| {
                sent.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .unanswered
                    .push_back(Instant::now());
                // Encoding to a Vec cannot fail for these types; an empty payload would be
                // refused by the follower as undecodable, ending the stream.
                RaftPayload {
                    data: bincode::serialize(&req).unwrap_or_default(),
                }
            });
            let stop = StopOnDrop(stop);
            let answers = match tokio::time::timeout(ttl, client.stream_append(requests)).await {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                    self.streaming = false;
                    return Err(RPCError::Network(NetworkError::new(&s)));
                }
                Ok(Err(s)) => return Err(status_error(s)),
                Err(_) => return Err(stalled("opening the append stream")),
            };
            let stream = futures::stream::unfold(Some((answers, stop)), move |state| {
                let progress = progress.clone();
                async move {
                    let (mut answers, stop) = state?;
                    let item = loop {
                        match tokio::time::timeout(ttl, answers.message()).await {
                            Ok(Ok(Some(p))) => {
                                let mut progress =
                                    progress.lock().unwrap_or_else(|p| p.into_inner());
                                progress.unanswered.pop_front();
                                progress.last_answer = Some(Instant::now());
                                break bincode::deserialize::<StreamAppendResult<TypeConfig>>(
                                    &p.data,
                                )
                                .map_err(|e| RPCError::Network(NetworkError::new(&e)));
                            }
                            Ok(Ok(None)) => return None,
                            Ok(Err(s)) => break Err(status_error(s)),
                            // Idle is fine; no answer for a whole TTL while a request waits
                            // is not (a partition or a stalled peer).
                            Err(_)
                                if progress
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .stalled(ttl) =>
                            {
                                break Err(stalled("waiting for an append's answer"));
                            }
                            Err(_) => {}
                        }
                    };
                    // After an error (a transport failure, a conflict, a newer vote) openraft
                    // ends this stream and opens a new one.
                    let next = match &item {
                        Ok(Ok(_)) => Some((answers, stop)),
                        _ => None,
                    };
                    Some((item, next))
                }
            });
            Ok(Box::pin(stream) as BoxStream<'s, StreamItem>)
        })
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

type StreamItem = Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>;

/// Where an append stream stands: when each unanswered request went out, and the last answer.
#[derive(Default)]
struct Progress {
    unanswered: VecDeque<Instant>,
    last_answer: Option<Instant>,
}

impl Progress {
    /// A request is waiting, and neither it nor any answer came within `ttl`.
    fn stalled(&self, ttl: Duration) -> bool {
        let Some(oldest) = self.unanswered.front() else {
            return false;
        };
        let since = self.last_answer.map_or(*oldest, |a| a.max(*oldest));
        since.elapsed() >= ttl
    }
}

/// Ends an append stream's requests when its answers are dropped.
struct StopOnDrop(AbortHandle);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A peer that stopped answering: a network error, which openraft retries without the
/// back-off it keeps for unreachable peers (a slow fsync is not an outage).
fn stalled(what: &str) -> RPCError<TypeConfig> {
    let e = std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer from the peer within the RPC timeout while {what}"),
    );
    RPCError::Network(NetworkError::new(&e))
}

/// A failed peer call as openraft counts it: unreachable (backs off) or a network error.
fn status_error<E: std::error::Error>(s: tonic::Status) -> RPCError<TypeConfig, E> {
    match s.code() {
        tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&s)),
        _ => RPCError::Network(NetworkError::new(&s)),
    }
}

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
        let reply = reply.map_err(status_error)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ago(ms: u64) -> Instant {
        Instant::now() - Duration::from_millis(ms)
    }

    #[test]
    fn an_append_stream_stalls_only_when_a_request_waits_a_whole_ttl_without_any_answer() {
        let ttl = Duration::from_millis(100);
        let mut p = Progress::default();
        assert!(!p.stalled(ttl), "idle: nothing is waiting");
        p.unanswered.push_back(ago(10));
        assert!(!p.stalled(ttl), "a request sent just now");
        p.unanswered.clear();
        p.unanswered.push_back(ago(500));
        assert!(
            p.stalled(ttl),
            "a request unanswered for longer than the TTL"
        );
        p.last_answer = Some(ago(20));
        assert!(
            !p.stalled(ttl),
            "answers are still coming: the peer is slow, not gone"
        );
        p.last_answer = Some(ago(300));
        assert!(p.stalled(ttl), "the last answer is older than the TTL too");
        p.unanswered.clear();
        assert!(!p.stalled(ttl), "everything answered");
    }
}
