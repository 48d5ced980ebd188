//! One running member: Raft, the MVCC store and lease table, and the paths every request
//! takes through them (propose, linearizable read barrier, leader forwarding).

use openraft::async_runtime::WatchReceiver as _;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::etcdserverpb::{
    LeaseCheckpoint, LeaseCheckpointRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, ResponseHeader,
};
use flotilla_proto::flotillapb::{
    command, command_result, forward_request, forward_response, AuthInfo, BatchResult, Command,
    CommandBatch, CommandResult, ForwardRequest, ForwardResponse, ReadIndexRequest,
};
use openraft::error::{ClientWriteError, RaftError};
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use crate::error::EtcdError;
use crate::lease::LeaseKeeper;
use crate::mvcc::Mvcc;
use crate::raft::log_store::LogStore;
use crate::raft::network::PeerClients;
use crate::raft::{FnResponder, MemberNode, NodeId, Raft, RaftCommand, TypeConfig};

/// How long a client request may wait for the cluster (etcd's request timeout is 5 s plus
/// the election timeout).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(7);

/// Limits a member enforces on client requests.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    /// Leases shorter than this are granted with this TTL, as etcd's minimum TTL.
    pub min_lease_ttl: i64,
    pub progress_notify_interval: Duration,
    /// Test-only fault: linearizable reads skip the read index.
    pub unsafe_stale_reads: bool,
    /// `--quota-backend-bytes`: past this on-disk size, writes that add data raise NOSPACE.
    pub quota_bytes: Option<u64>,
    /// `--auth-token-ttl`: how long a token from Authenticate is good for.
    pub auth_token_ttl: Duration,
    /// `--bcrypt-cost`: work factor of stored password hashes.
    pub bcrypt_cost: u32,
}

/// Seconds since the Unix epoch, by this machine's clock (token expiry).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// What etcd's quota counts for a put beyond its key and value (`kvOverhead`).
pub const QUOTA_PUT_OVERHEAD: u64 = 256;
/// And for a lease grant (`leaseOverhead`).
pub const QUOTA_LEASE_OVERHEAD: u64 = 64;

pub struct Member {
    pub id: NodeId,
    pub cluster_id: u64,
    /// `--initial-cluster-token`: member IDs derive from it and the peer URLs.
    pub cluster_token: String,
    pub name: String,
    pub raft: Raft,
    pub mvcc: Arc<Mvcc>,
    pub leases: Arc<LeaseKeeper>,
    pub log: LogStore,
    pub peers: Arc<PeerClients>,
    pub limits: Limits,
    /// Linearizable reads waiting for a read index.
    pub read_waiters: mpsc::Sender<ReadWaiter>,
    /// Commands waiting to be batched into a Raft entry.
    pub proposals: mpsc::Sender<Proposal>,
    /// Commands this member (a follower) forwards to the leader, batched.
    pub forwards: mpsc::Sender<Forwarded>,
    /// The streams forwarded requests travel on, one per leader.
    pub forward_streams: crate::forward::ForwardStreams,
    /// Orders lease checkpoints and the renewals that clear them in the log (see `lease`).
    pub lease_checkpoint_gate: tokio::sync::Mutex<()>,
    /// Hands applied revisions to the watch streams that watch their keys.
    pub watch_hub: Arc<crate::watch_hub::WatchHub>,
}

/// A command queued for the log: where its result will come, or why it was not queued.
pub type PendingCommand =
    Result<oneshot::Receiver<Result<Option<command_result::Result>, EtcdError>>, EtcdError>;

pub struct Proposal {
    command: Command,
    reply: oneshot::Sender<Result<Option<command_result::Result>, EtcdError>>,
}

/// Commands waiting for a batch before proposers wait to enqueue (back-pressure).
pub const PROPOSAL_QUEUE: usize = 16 * 1024;
/// Raft entries being replicated at once; while all are in flight, commands gather for the next.
const MAX_INFLIGHT_ENTRIES: usize = 1;
/// Most commands in one entry.
const MAX_BATCH_COMMANDS: usize = 2048;
/// Most bytes of commands in one entry (one command may be up to --max-request-bytes).
const MAX_BATCH_BYTES: usize = 4 << 20;

/// The next batch from `queue`: the carried item or the next to arrive, then whatever else
/// is queued, up to `MAX_BATCH_COMMANDS` items and `MAX_BATCH_BYTES`. An item that does not
/// fit, or that `joins` keeps apart from the batch's first, is carried to the next batch.
/// None once the queue has closed.
async fn next_batch<T>(
    queue: &mut mpsc::Receiver<T>,
    carried: &mut Option<T>,
    len: impl Fn(&T) -> usize,
    joins: impl Fn(&T, &T) -> bool,
) -> Option<Vec<T>> {
    let first = match carried.take() {
        Some(x) => x,
        None => queue.recv().await?,
    };
    let mut bytes = len(&first);
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH_COMMANDS {
        let Ok(x) = queue.try_recv() else { break };
        let n = len(&x);
        if bytes + n > MAX_BATCH_BYTES || !joins(&batch[0], &x) {
            *carried = Some(x);
            break;
        }
        bytes += n;
        batch.push(x);
    }
    Some(batch)
}

/// Gathers concurrent proposals into Raft entries: one log append, one fsync and one
/// replication round for many clients. Batches form by themselves: while
/// `MAX_INFLIGHT_ENTRIES` entries are in flight, new commands queue and go out together.
pub async fn proposal_loop(
    member: std::sync::Weak<Member>,
    mut proposals: mpsc::Receiver<Proposal>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_INFLIGHT_ENTRIES));
    let mut carried: Option<Proposal> = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let len = |p: &Proposal| p.command.encoded_len();
        let Some(batch) = next_batch(&mut proposals, &mut carried, len, |_, _| true).await else {
            return;
        };
        let Some(m) = member.upgrade() else { return };
        let (commands, replies): (Vec<Command>, Vec<_>) =
            batch.into_iter().map(|p| (p.command, p.reply)).unzip();
        let entry = RaftCommand::new(&CommandBatch { commands });
        // The state machine calls this as it applies the entry (or RaftCore, when it refuses
        // the entry): the replies go straight to the waiting clients, and the slot frees.
        let responder = FnResponder::new(
            move |outcome: openraft::raft::ClientWriteResult<TypeConfig>| {
                drop(slot);
                match outcome {
                    Ok(resp) => {
                        let mut results = resp.data.0.results.into_iter();
                        for reply in replies {
                            let _ = reply.send(Ok(results.next().and_then(|r| r.result)));
                        }
                    }
                    Err(e) => {
                        let err = match e {
                            ClientWriteError::ForwardToLeader(_) => EtcdError::NotLeader,
                            // Appended, then dropped when another leader's log replaced it: it
                            // may still commit there, so it is not retried (etcd's answer).
                            ClientWriteError::LogEntryDiscarded(_) => EtcdError::LeaderChanged,
                            e => EtcdError::Internal(e.to_string()),
                        };
                        for reply in replies {
                            let _ = reply.send(Err(err.clone()));
                        }
                    }
                }
            },
        );
        // A fatal error drops the responder unanswered: its clients see the member stopped.
        let _ = m.raft.write(entry).responder(responder).await;
    }
}

/// A command on its way to the leader, and where its result goes.
pub struct Forwarded {
    leader: MemberNode,
    command: Command,
    reply: oneshot::Sender<Result<Option<command_result::Result>, EtcdError>>,
}

/// Forward batches to the leader in flight at once.
const MAX_INFLIGHT_FORWARDS: usize = 4;

/// Gathers the commands clients send to this follower into batches forwarded to the leader
/// in one peer request each (a request per command would cost both members an HTTP/2
/// exchange per write). While `MAX_INFLIGHT_FORWARDS` batches are out, commands gather for
/// the next; each keeps its own result, and the leader proposes them in order.
pub async fn forward_loop(
    member: std::sync::Weak<Member>,
    mut forwards: mpsc::Receiver<Forwarded>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_INFLIGHT_FORWARDS));
    let mut carried: Option<Forwarded> = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let len = |f: &Forwarded| f.command.encoded_len();
        // One batch goes to one leader.
        let joins = |a: &Forwarded, b: &Forwarded| a.leader.peer_urls == b.leader.peer_urls;
        let Some(batch) = next_batch(&mut forwards, &mut carried, len, joins).await else {
            return;
        };
        let leader = batch[0].leader.clone();
        let Some(m) = member.upgrade() else { return };
        let (commands, replies): (Vec<Command>, Vec<_>) =
            batch.into_iter().map(|f| (f.command, f.reply)).unzip();
        let sent = commands.len();
        let request = forward_request::Request::Commands(CommandBatch { commands });
        // The results go to the clients from the task reading the leader's answers.
        let deliver = move |outcome: Result<forward_response::Response, EtcdError>| {
            drop(slot);
            deliver_forwarded(outcome, replies, sent);
        };
        let url = leader.peer_urls.first().cloned().unwrap_or_default();
        match m.forward_streams.stream(&url).await {
            Ok(Some(stream)) => {
                let request = ForwardRequest {
                    request: Some(request),
                };
                stream
                    .send(
                        request,
                        Box::new(move |answer| deliver(forward_outcome(answer))),
                    )
                    .await;
            }
            // A leader without the stream: a unary call.
            Ok(None) => {
                tokio::spawn(async move { deliver(m.forward(&leader, request).await) });
            }
            // The leader cannot be reached.
            Err(status) => deliver(forward_outcome(Err(status))),
        }
    }
}

/// Hands each client of a forwarded batch its command's result.
fn deliver_forwarded(
    outcome: Result<forward_response::Response, EtcdError>,
    replies: Vec<oneshot::Sender<Result<Option<command_result::Result>, EtcdError>>>,
    sent: usize,
) {
    match outcome {
        Ok(forward_response::Response::Commands(BatchResult { results }))
            if results.len() == sent =>
        {
            for (reply, r) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(r.result));
            }
        }
        Ok(_) => {
            for reply in replies {
                let _ = reply.send(Err(EtcdError::Internal(
                    "leader answered a different request".into(),
                )));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// What a forwarded request's answer (or the gRPC status it failed with) means to the
/// follower's client.
fn forward_outcome(
    outcome: Result<ForwardResponse, tonic::Status>,
) -> Result<forward_response::Response, EtcdError> {
    match outcome {
        Ok(resp) => resp
            .response
            .ok_or_else(|| EtcdError::Internal("empty forward response".into())),
        Err(s) if s.message() == EtcdError::NotLeader.to_string() => Err(EtcdError::NotLeader),
        Err(s)
            if s.code() == tonic::Code::Unavailable && s.message().starts_with("etcdserver:") =>
        {
            Err(EtcdError::from_wire(s.code() as i32, s.message()))
        }
        // The leader could not be reached: whether the command was applied is unknown.
        Err(s)
            if s.code() == tonic::Code::Unavailable
                || s.code() == tonic::Code::DeadlineExceeded =>
        {
            Err(EtcdError::Timeout)
        }
        Err(s) => Err(EtcdError::from_wire(s.code() as i32, s.message())),
    }
}

pub type ReadWaiter = oneshot::Sender<Result<u64, EtcdError>>;

/// Reads waiting at most for a read-index round before callers wait to enqueue.
pub const READ_QUEUE: usize = 16 * 1024;

/// Serves read-index requests in rounds: every reader queued while one round runs shares the
/// next round, so N concurrent linearizable reads cost one leader confirmation, not N. A
/// round starts after each of its readers arrived, which is what linearizability needs.
pub async fn read_index_loop(
    member: std::sync::Weak<Member>,
    mut waiters: mpsc::Receiver<ReadWaiter>,
) {
    while let Some(first) = waiters.recv().await {
        let mut round = vec![first];
        while let Ok(more) = waiters.try_recv() {
            round.push(more);
        }
        let Some(m) = member.upgrade() else { return };
        let result = m.fetch_read_index().await;
        drop(m);
        for w in round {
            let _ = w.send(result.clone());
        }
    }
}

impl Member {
    pub fn header(&self, revision: i64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.id,
            revision,
            raft_term: self.raft.metrics().borrow_watched().current_term,
        }
    }

    /// Stamps cluster, member and term on a header a state-machine result carried.
    pub fn stamp(&self, header: &mut Option<ResponseHeader>) {
        let revision = header
            .as_ref()
            .map(|h| h.revision)
            .unwrap_or_else(|| self.mvcc.current_revision());
        *header = Some(self.header(revision));
    }

    pub fn leader(&self) -> Option<(NodeId, MemberNode)> {
        let metrics = self.raft.server_metrics();
        let m = metrics.borrow_watched();
        let leader = m.current_leader?;
        let node = m
            .membership_config
            .membership()
            .get_node(&leader)
            .cloned()?;
        Some((leader, node))
    }

    pub fn is_leader(&self) -> bool {
        self.raft.server_metrics().borrow_watched().current_leader == Some(self.id)
    }

    /// Waits up to the request timeout for some member to lead.
    async fn wait_for_leader(&self) -> Result<(NodeId, MemberNode), EtcdError> {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(EtcdError::NoLeader);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Proposes a command through Raft (forwarding to the leader when this member is not it)
    /// and returns the result of applying it.
    pub async fn propose(&self, command: Command) -> Result<command_result::Result, EtcdError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.propose_inner(command))
            .await
            .unwrap_or(Err(EtcdError::Timeout))
    }

    async fn propose_inner(&self, command: Command) -> Result<command_result::Result, EtcdError> {
        for _attempt in 0..20 {
            let (leader, node) = self.wait_for_leader().await?;
            let outcome = if leader == self.id {
                self.propose_local(&command).await
            } else {
                self.forward_batched(node, command.clone()).await
            };
            // A forwarded command's errors come back as results; one the leader refused
            // before it entered the log (not leader) is tried again like a local one.
            let outcome = match outcome {
                Ok(Some(command_result::Result::Error(e)))
                    if EtcdError::from_wire(e.code, &e.message) == EtcdError::NotLeader =>
                {
                    Err(EtcdError::NotLeader)
                }
                other => other,
            };
            match outcome {
                // Rejected before it entered the log: safe to try the new leader.
                Err(EtcdError::NotLeader) => tokio::time::sleep(Duration::from_millis(50)).await,
                Ok(Some(command_result::Result::Error(e))) => {
                    return Err(EtcdError::from_wire(e.code, &e.message))
                }
                Ok(Some(r)) => return Ok(r),
                Ok(None) => return Err(EtcdError::Internal("empty command result".into())),
                Err(e) => return Err(e),
            }
        }
        Err(EtcdError::LeaderChanged)
    }

    /// Forwards a command to the leader with the others waiting to go (`forward_loop`).
    async fn forward_batched(
        &self,
        leader: MemberNode,
        command: Command,
    ) -> Result<Option<command_result::Result>, EtcdError> {
        let (reply, rx) = oneshot::channel();
        self.forwards
            .send(Forwarded {
                leader,
                command,
                reply,
            })
            .await
            .map_err(|_| EtcdError::Stopped)?;
        rx.await.map_err(|_| EtcdError::Stopped)?
    }

    /// Leader: proposes forwarded commands in order and gives one result each (an error as
    /// a result, so one command's failure does not fail the others).
    pub async fn propose_forwarded(&self, commands: Vec<Command>) -> Vec<CommandResult> {
        let pending = self.enqueue_forwarded(commands).await;
        Member::forwarded_results(pending).await
    }

    /// Leader: queues forwarded commands for the log, in order.
    pub async fn enqueue_forwarded(&self, commands: Vec<Command>) -> Vec<PendingCommand> {
        let mut pending = Vec::with_capacity(commands.len());
        for command in commands {
            pending.push(self.enqueue_local(command).await);
        }
        pending
    }

    /// The results of commands [`Self::enqueue_forwarded`] queued, one each.
    pub async fn forwarded_results(pending: Vec<PendingCommand>) -> Vec<CommandResult> {
        let mut results = Vec::with_capacity(pending.len());
        for p in pending {
            let outcome = match p {
                Ok(rx) => rx.await.unwrap_or(Err(EtcdError::Stopped)),
                Err(e) => Err(e),
            };
            let result = match outcome {
                Ok(r) => r,
                Err(e) => Some(command_result::Result::Error(
                    flotilla_proto::flotillapb::Error {
                        code: e.code() as i32,
                        message: e.to_string(),
                    },
                )),
            };
            results.push(CommandResult { result });
        }
        results
    }

    /// Proposes on this member, which believes it leads. `NotLeader` means the command was
    /// not appended.
    pub async fn propose_local(
        &self,
        command: &Command,
    ) -> Result<Option<command_result::Result>, EtcdError> {
        let rx = self.enqueue_local(command.clone()).await?;
        rx.await.map_err(|_| EtcdError::Stopped)?
    }

    /// Queues a command for the next entry on this member, which believes it leads; commands
    /// queued one after another enter the log in that order.
    async fn enqueue_local(
        &self,
        command: Command,
    ) -> Result<oneshot::Receiver<Result<Option<command_result::Result>, EtcdError>>, EtcdError>
    {
        let (reply, rx) = oneshot::channel();
        self.proposals
            .send(Proposal { command, reply })
            .await
            .map_err(|_| EtcdError::Stopped)?;
        Ok(rx)
    }

    /// Awaits a queued command's result, as `propose_local` does.
    async fn await_local(
        rx: oneshot::Receiver<Result<Option<command_result::Result>, EtcdError>>,
    ) -> Result<(), EtcdError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Err(_) => Err(EtcdError::Timeout),
            Ok(Err(_)) => Err(EtcdError::Stopped),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Ok(Ok(Some(command_result::Result::Error(e))))) => {
                Err(EtcdError::from_wire(e.code, &e.message))
            }
            Ok(Ok(Ok(_))) => Ok(()),
        }
    }

    /// Leader: writes the remaining TTLs of leases not renewed lately (see `lease`).
    pub async fn lease_checkpoint_tick(&self, interval: Duration) -> Result<(), EtcdError> {
        let mut pending = Vec::new();
        {
            let _gate = self.lease_checkpoint_gate.lock().await;
            let due = self.leases.due_checkpoints(interval);
            for chunk in due.chunks(crate::lease::CHECKPOINT_BATCH) {
                let checkpoints = chunk
                    .iter()
                    .map(|&(id, remaining_ttl)| LeaseCheckpoint { id, remaining_ttl })
                    .collect();
                let command = Command {
                    auth: None,
                    request: Some(command::Request::LeaseCheckpoint(LeaseCheckpointRequest {
                        checkpoints,
                    })),
                };
                pending.push(self.enqueue_local(command).await?);
            }
        }
        for rx in pending {
            Self::await_local(rx).await?;
        }
        Ok(())
    }

    async fn forward(
        &self,
        leader: &MemberNode,
        request: forward_request::Request,
    ) -> Result<forward_response::Response, EtcdError> {
        let url = leader.peer_urls.first().ok_or(EtcdError::NoLeader)?;
        let request = ForwardRequest {
            request: Some(request),
        };
        let outcome = match self.forward_streams.call(url, request).await {
            Ok(outcome) => outcome,
            // A leader without the stream (an older version): one call per request.
            Err(request) => {
                let mut client = self
                    .peers
                    .client(url)
                    .map_err(|e| EtcdError::Internal(e.to_string()))?;
                let mut req = tonic::Request::new(request);
                req.set_timeout(REQUEST_TIMEOUT);
                client.forward(req).await.map(tonic::Response::into_inner)
            }
        };
        forward_outcome(outcome)
    }

    /// The leader's read index: the log index every linearizable read must wait for.
    async fn read_index_local(&self) -> Result<u64, EtcdError> {
        match self
            .raft
            .get_read_log_id(openraft::ReadPolicy::ReadIndex)
            .await
        {
            Ok((read_log_id, _applied)) => Ok(read_log_id.index()),
            Err(RaftError::APIError(_)) => Err(EtcdError::NotLeader),
            Err(RaftError::Fatal(_)) => Err(EtcdError::Stopped),
        }
    }

    /// The read index for a linearizable read that arrived before this call: taken by the
    /// leader, or asked of it. Concurrent callers share one round (see [`read_index_loop`]).
    async fn fetch_read_index(&self) -> Result<u64, EtcdError> {
        loop {
            let (leader, node) = self.wait_for_leader().await?;
            let index = if leader == self.id {
                self.read_index_local().await
            } else {
                match self
                    .forward(
                        &node,
                        forward_request::Request::ReadIndex(ReadIndexRequest {}),
                    )
                    .await
                {
                    Ok(forward_response::Response::ReadIndex(i)) => Ok(i),
                    Ok(_) => Err(EtcdError::Internal(
                        "leader answered a different request".into(),
                    )),
                    Err(e) => Err(e),
                }
            };
            match index {
                Err(EtcdError::NotLeader) => tokio::time::sleep(Duration::from_millis(50)).await,
                other => return other,
            }
        }
    }

    /// A read index taken after this call began, from the next round of this member's
    /// [`read_index_loop`]: local linearizable reads and the read indexes followers forward
    /// to the leader share its rounds, so one leadership confirmation serves them all.
    pub async fn read_index_shared(&self) -> Result<u64, EtcdError> {
        let (tx, rx) = oneshot::channel();
        self.read_waiters
            .send(tx)
            .await
            .map_err(|_| EtcdError::Stopped)?;
        rx.await.map_err(|_| EtcdError::Stopped)?
    }

    /// Waits until this member has applied everything committed when the call began, as
    /// confirmed by the leader: after it, a local read is linearizable.
    pub async fn linearizable_barrier(&self) -> Result<(), EtcdError> {
        if self.limits.unsafe_stale_reads {
            return Ok(());
        }
        tokio::time::timeout(REQUEST_TIMEOUT, async {
            let index = self.read_index_shared().await?;
            self.raft
                .wait(Some(REQUEST_TIMEOUT))
                .applied_index_at_least(Some(index), "linearizable read")
                .await
                .map_err(|_| EtcdError::Timeout)?;
            Ok(())
        })
        .await
        .unwrap_or(Err(EtcdError::Timeout))
    }

    pub async fn lease_keep_alive(
        &self,
        req: LeaseKeepAliveRequest,
    ) -> Result<LeaseKeepAliveResponse, EtcdError> {
        let (leader, node) = self.wait_for_leader().await?;
        if leader == self.id {
            return self.lease_keep_alive_local(&req).await;
        }
        match self
            .forward(&node, forward_request::Request::LeaseKeepAlive(req))
            .await?
        {
            forward_response::Response::LeaseKeepAlive(mut r) => {
                self.stamp(&mut r.header);
                Ok(r)
            }
            _ => Err(EtcdError::Internal(
                "leader answered a different request".into(),
            )),
        }
    }

    /// As etcd: renewing an unknown lease answers TTL 0, not an error. A lease with a
    /// checkpoint in the log has it cleared before the renewal is acknowledged, so that a
    /// new leader never gives it less than the renewal promised.
    pub async fn lease_keep_alive_local(
        &self,
        req: &LeaseKeepAliveRequest,
    ) -> Result<LeaseKeepAliveResponse, EtcdError> {
        if !self.leases.wait_primary(REQUEST_TIMEOUT).await {
            return Err(EtcdError::Timeout);
        }
        let renewed = self.leases.keep_alive(req.id);
        if let Some(proposal) = renewed.and_then(|r| r.clear_checkpoint) {
            let command = Command {
                auth: None,
                request: Some(command::Request::LeaseCheckpoint(LeaseCheckpointRequest {
                    checkpoints: vec![LeaseCheckpoint {
                        id: req.id,
                        remaining_ttl: 0,
                    }],
                })),
            };
            let rx = {
                let _gate = self.lease_checkpoint_gate.lock().await;
                self.enqueue_local(command).await?
            };
            Self::await_local(rx).await?;
            self.leases.cleared(req.id, proposal);
        }
        Ok(LeaseKeepAliveResponse {
            header: Some(self.header(self.mvcc.current_revision())),
            id: req.id,
            ttl: renewed.map(|r| r.ttl).unwrap_or(0),
        })
    }

    pub async fn lease_time_to_live(
        &self,
        req: LeaseTimeToLiveRequest,
    ) -> Result<LeaseTimeToLiveResponse, EtcdError> {
        let (leader, node) = self.wait_for_leader().await?;
        if leader == self.id {
            return self.lease_time_to_live_local(&req);
        }
        match self
            .forward(&node, forward_request::Request::LeaseTimeToLive(req))
            .await?
        {
            forward_response::Response::LeaseTimeToLive(mut r) => {
                self.stamp(&mut r.header);
                Ok(r)
            }
            _ => Err(EtcdError::Internal(
                "leader answered a different request".into(),
            )),
        }
    }

    /// As etcd: an unknown lease answers TTL -1.
    pub fn lease_time_to_live_local(
        &self,
        req: &LeaseTimeToLiveRequest,
    ) -> Result<LeaseTimeToLiveResponse, EtcdError> {
        let header = Some(self.header(self.mvcc.current_revision()));
        let Some((granted, remaining)) = self.leases.time_to_live(req.id) else {
            return Ok(LeaseTimeToLiveResponse {
                header,
                id: req.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            });
        };
        let keys = if req.keys {
            self.mvcc.lease_keys(req.id)?
        } else {
            Vec::new()
        };
        Ok(LeaseTimeToLiveResponse {
            header,
            id: req.id,
            ttl: remaining,
            granted_ttl: granted,
            keys,
        })
    }

    /// etcd's quota check: when a write of `cost` bytes would take the data past the quota,
    /// this member raises the NOSPACE alarm through Raft (the cluster then refuses writes that
    /// add data until an operator disarms it) and the write is refused.
    pub async fn quota_check(&self, cost: u64) -> Result<(), EtcdError> {
        let Some(quota) = self.limits.quota_bytes else {
            return Ok(());
        };
        let (size, _) = self.mvcc.size();
        if (size.max(0) as u64).saturating_add(cost) <= quota {
            return Ok(());
        }
        let raised = self
            .mvcc
            .alarms()
            .contains(&(self.id, crate::mvcc::ALARM_NOSPACE));
        if !raised {
            tracing::warn!(
                size,
                quota,
                "database space exceeded; raising the NOSPACE alarm"
            );
            let command = Command {
                auth: None,
                request: Some(command::Request::Alarm(
                    flotilla_proto::etcdserverpb::AlarmRequest {
                        action: flotilla_proto::etcdserverpb::alarm_request::AlarmAction::Activate
                            as i32,
                        member_id: self.id,
                        alarm: crate::mvcc::ALARM_NOSPACE,
                    },
                )),
            };
            if let Err(e) = self.propose(command).await {
                tracing::warn!(error = %e, "raising the NOSPACE alarm");
            }
        }
        Err(EtcdError::NoSpace)
    }

    /// Who a client request speaks for: the user its `token` metadata names (etcd's key; the
    /// newer `authorization` is read too), or an empty user when it gave none. While auth is
    /// off a token means nothing. A token issued at a newer auth revision than this member
    /// has applied (a lagging follower) waits for this member to catch up before it is judged.
    pub async fn auth_info(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<AuthInfo, EtcdError> {
        let token = metadata
            .get("token")
            .or_else(|| metadata.get("authorization"))
            .map(|v| v.to_str().map_err(|_| EtcdError::InvalidAuthToken));
        let Some(token) = token else {
            return Ok(AuthInfo::default());
        };
        let token = token?;
        let mut state = self.mvcc.auth();
        // A token this member cannot judge yet: issued at an auth revision it has not applied
        // (perhaps under a key it does not have yet). Catch up first; after that a token from
        // the future is refused. (The wait costs what a linearizable read costs.)
        let ahead = crate::auth::parse_token(token).is_some_and(|t| t.revision > state.revision());
        if ahead {
            self.linearizable_barrier().await?;
            state = self.mvcc.auth();
        }
        if !state.enabled() {
            return Ok(AuthInfo::default());
        }
        state.verify_token(token, unix_now())
    }

    /// A command on behalf of a client: it carries the client's identity, checked when applied.
    pub fn client_command(request: command::Request, auth: AuthInfo) -> Command {
        Command {
            request: Some(request),
            auth: Some(auth),
        }
    }

    /// Size of a request as it would travel through Raft.
    pub fn check_size(&self, request: &impl Message) -> Result<(), EtcdError> {
        if request.encoded_len() > self.limits.max_request_bytes {
            return Err(EtcdError::RequestTooLarge);
        }
        Ok(())
    }
}

/// Membership changes (etcd's Cluster service), carried out on the leader through
/// openraft's joint consensus.
impl Member {
    /// The members as etcd lists them: voters and learners, with the names and client URLs
    /// they published once started (empty until then, as etcd shows unstarted members).
    pub fn member_list(&self) -> Vec<flotilla_proto::etcdserverpb::Member> {
        use crate::mvcc::decode;
        use crate::mvcc::keys::member_meta_key;
        use crate::raft::state_machine::MemberAttributes;
        let metrics = self.raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: Vec<u64> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| {
                let attrs: MemberAttributes = self
                    .mvcc
                    .meta_get(&member_meta_key(*id))
                    .ok()
                    .flatten()
                    .and_then(|v| decode("member", &v).ok())
                    .unwrap_or_default();
                flotilla_proto::etcdserverpb::Member {
                    id: *id,
                    name: attrs.name,
                    peer_ur_ls: node.peer_urls.clone(),
                    client_ur_ls: attrs.client_urls,
                    is_learner: !voters.contains(id),
                }
            })
            .collect()
    }

    /// Runs a membership change on the leader, forwarding it there if need be.
    pub async fn change_membership(
        &self,
        request: forward_request::Request,
    ) -> Result<forward_response::Response, EtcdError> {
        let result = tokio::time::timeout(REQUEST_TIMEOUT * 2, async {
            loop {
                let (leader, node) = self.wait_for_leader().await?;
                let outcome = if leader == self.id {
                    self.change_membership_local(request.clone()).await
                } else {
                    self.forward(&node, request.clone()).await
                };
                match outcome {
                    Err(EtcdError::NotLeader) => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    other => return other,
                }
            }
        })
        .await
        .unwrap_or(Err(EtcdError::Timeout));
        // A leader that removes itself steps down and stops as the change commits, so its
        // answer may never come: judge by the membership this member sees.
        if let (Err(_), forward_request::Request::MemberRemove(r)) = (&result, &request) {
            let removed = self
                .raft
                .wait(Some(REQUEST_TIMEOUT))
                .metrics(
                    |m| m.membership_config.membership().get_node(&r.id).is_none(),
                    "member removed",
                )
                .await
                .is_ok();
            if removed {
                return Ok(forward_response::Response::MemberRemove(
                    flotilla_proto::etcdserverpb::MemberRemoveResponse {
                        header: Some(self.header(self.mvcc.current_revision())),
                        members: self.member_list(),
                    },
                ));
            }
        }
        result
    }

    /// Carries out a membership change on this member, which believes it leads.
    pub async fn change_membership_local(
        &self,
        request: forward_request::Request,
    ) -> Result<forward_response::Response, EtcdError> {
        use flotilla_proto::etcdserverpb as pb;
        use forward_request::Request as Rq;
        use forward_response::Response as Rs;
        use openraft::ChangeMembers;
        if !self.is_leader() {
            return Err(EtcdError::NotLeader);
        }
        let metrics = self.raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let nodes: std::collections::BTreeMap<u64, MemberNode> =
            membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
        let check_urls = |urls: &[String]| -> Result<(), EtcdError> {
            if urls.is_empty()
                || urls
                    .iter()
                    .any(|u| crate::server::listen_addr(u).is_err() && !u.starts_with("http"))
            {
                return Err(EtcdError::MemberBadUrls);
            }
            Ok(())
        };
        let header = |m: &Member| Some(m.header(m.mvcc.current_revision()));
        match request {
            Rq::MemberAdd(r) => {
                check_urls(&r.peer_ur_ls)?;
                let id = crate::member_id(&r.peer_ur_ls, &self.cluster_token);
                if nodes.contains_key(&id) {
                    return Err(EtcdError::MemberExists);
                }
                if nodes
                    .values()
                    .any(|n| n.peer_urls.iter().any(|u| r.peer_ur_ls.contains(u)))
                {
                    return Err(EtcdError::PeerUrlExists);
                }
                let node = MemberNode {
                    name: String::new(),
                    peer_urls: r.peer_ur_ls.clone(),
                };
                let mut add = std::collections::BTreeMap::new();
                add.insert(id, node);
                self.membership_write(ChangeMembers::AddNodes(add)).await?;
                if !r.is_learner {
                    let mut ids = std::collections::BTreeSet::new();
                    ids.insert(id);
                    self.membership_write(ChangeMembers::AddVoterIds(ids))
                        .await?;
                }
                let member = pb::Member {
                    id,
                    name: String::new(),
                    peer_ur_ls: r.peer_ur_ls,
                    client_ur_ls: Vec::new(),
                    is_learner: r.is_learner,
                };
                Ok(Rs::MemberAdd(pb::MemberAddResponse {
                    header: header(self),
                    member: Some(member),
                    members: self.member_list(),
                }))
            }
            Rq::MemberRemove(r) => {
                if !nodes.contains_key(&r.id) {
                    return Err(EtcdError::MemberNotFound);
                }
                let mut ids = std::collections::BTreeSet::new();
                ids.insert(r.id);
                if voters.contains(&r.id) {
                    self.membership_write(ChangeMembers::RemoveVoters(ids))
                        .await?;
                } else {
                    self.membership_write(ChangeMembers::RemoveNodes(ids))
                        .await?;
                }
                Ok(Rs::MemberRemove(pb::MemberRemoveResponse {
                    header: header(self),
                    members: self.member_list(),
                }))
            }
            Rq::MemberPromote(r) => {
                if !nodes.contains_key(&r.id) {
                    return Err(EtcdError::MemberNotFound);
                }
                if voters.contains(&r.id) {
                    return Err(EtcdError::MemberNotLearner);
                }
                // As etcd: only a learner that has caught up (90% of the leader's log).
                let leader_index = metrics.last_log_index.unwrap_or(0);
                let learner = r.id;
                let matched = metrics
                    .replication
                    .as_ref()
                    .and_then(|progress| progress.get(&learner).cloned().flatten())
                    .map(|l| l.index)
                    .unwrap_or(0);
                if (matched as f64) < leader_index as f64 * 0.9 {
                    return Err(EtcdError::LearnerNotReady);
                }
                let mut ids = std::collections::BTreeSet::new();
                ids.insert(r.id);
                self.membership_write(ChangeMembers::AddVoterIds(ids))
                    .await?;
                Ok(Rs::MemberPromote(pb::MemberPromoteResponse {
                    header: header(self),
                    members: self.member_list(),
                }))
            }
            Rq::MemberUpdate(r) => {
                check_urls(&r.peer_ur_ls)?;
                let Some(node) = nodes.get(&r.id) else {
                    return Err(EtcdError::MemberNotFound);
                };
                let mut set = std::collections::BTreeMap::new();
                set.insert(
                    r.id,
                    MemberNode {
                        name: node.name.clone(),
                        peer_urls: r.peer_ur_ls,
                    },
                );
                self.membership_write(ChangeMembers::SetNodes(set)).await?;
                Ok(Rs::MemberUpdate(pb::MemberUpdateResponse {
                    header: header(self),
                    members: self.member_list(),
                }))
            }
            _ => Err(EtcdError::Internal("not a membership change".into())),
        }
    }

    async fn membership_write(
        &self,
        change: openraft::ChangeMembers<NodeId, MemberNode>,
    ) -> Result<(), EtcdError> {
        match self.raft.change_membership(change, false).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(EtcdError::NotLeader)
            }
            Err(RaftError::APIError(e)) => Err(EtcdError::Internal(format!(
                "membership change refused: {e}"
            ))),
            Err(RaftError::Fatal(_)) => Err(EtcdError::Stopped),
        }
    }
}
