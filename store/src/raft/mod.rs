//! Consensus: openraft wired to RocksDB storage and the peer gRPC transport.
//!
//! Owns the `log` and `raft` column families and the Raft type configuration. The state
//! machine is the MVCC store; log entries carry prost-encoded `flotillapb.Command`s.

pub mod log_store;
pub mod network;
pub mod state_machine;
pub mod wal;

use std::fmt;

use flotilla_proto::flotillapb::{BatchResult, CommandBatch};
use prost::Message;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub type NodeId = u64;

/// A member as Raft's membership config records it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberNode {
    pub name: String,
    pub peer_urls: Vec<String>,
}

impl fmt::Display for MemberNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.peer_urls.join(","))
    }
}

/// A log entry's payload as the log stores it: the prost encoding of
/// `flotillapb.CommandBatch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RaftCommand(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl fmt::Display for RaftCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "command batch ({} bytes)", self.0.len())
    }
}

impl RaftCommand {
    pub fn new(batch: &CommandBatch) -> RaftCommand {
        RaftCommand(batch.encode_to_vec())
    }
}

/// The results of applying an entry's commands, handed back to the proposer.
#[derive(Debug, Clone, Default)]
pub struct RaftResponse(pub BatchResult);

impl Serialize for RaftResponse {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0.encode_to_vec())
    }
}

impl<'de> Deserialize<'de> for RaftResponse {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RaftResponse, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(d)?;
        BatchResult::decode(bytes.as_slice())
            .map(RaftResponse)
            .map_err(serde::de::Error::custom)
    }
}

/// The Raft type configuration. Written out rather than declared with openraft's macro, which
/// cannot name a responder: writes answer through [`FnResponder`].
#[derive(Debug, Clone, Copy, Default, Eq, PartialEq, Ord, PartialOrd)]
pub struct TypeConfig {}

impl openraft::RaftTypeConfig for TypeConfig {
    type D = RaftCommand;
    type R = RaftResponse;
    type NodeId = NodeId;
    type Node = MemberNode;
    type Term = u64;
    type LeaderId = openraft::impls::leader_id_adv::LeaderId<u64, NodeId>;
    type Vote = openraft::impls::Vote<Self::LeaderId>;
    type Payload = openraft::EntryPayload<RaftCommand, NodeId, MemberNode>;
    type Entry =
        openraft::Entry<<Self::LeaderId as openraft::vote::RaftLeaderId>::Committed, Self::Payload>;
    type Responder<T>
        = FnResponder<T>
    where
        T: openraft::OptionalSend + 'static;
    type Batch<T>
        = openraft::impls::InlineBatch<T>
    where
        T: openraft::OptionalSend + 'static;
    type AsyncRuntime = openraft::TokioRuntime;
    type ErrorSource = openraft::impls::BoxedErrorSource;
}

/// A write's responder: a function the state machine calls with the write's result as it
/// applies the entry. Proposals hand each client its result from there, without a task in
/// between to wake.
pub struct FnResponder<T>(Box<dyn FnOnce(T) + Send>);

impl<T> FnResponder<T> {
    pub fn new(f: impl FnOnce(T) + Send + 'static) -> FnResponder<T> {
        FnResponder(Box::new(f))
    }
}

impl<T: openraft::OptionalSend + 'static> openraft::raft::responder::Responder<TypeConfig, T>
    for FnResponder<T>
{
    fn on_complete(self, result: T) {
        (self.0)(result)
    }
}

pub type Raft = openraft::Raft<TypeConfig, state_machine::StateMachine>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, tokio::fs::File>;
pub type RaftStorageError = openraft::StorageError<TypeConfig>;

pub(crate) fn io_error(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::other(e)
}

pub(crate) fn read_error(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::other(e)
}
