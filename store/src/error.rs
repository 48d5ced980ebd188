//! The store's errors, and the one place where they become gRPC statuses.
//!
//! Clients of etcd match errors on the exact status message (etcd's `rpctypes`), so every
//! variant here carries etcd's text verbatim.

use tonic::{Code, Status};

/// An error a client can see. Each maps to one gRPC code and one message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdError {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: not leader")]
    NotLeader,
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("etcdserver: member ID already exist")]
    MemberExists,
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExists,
    #[error("etcdserver: given member URLs are invalid")]
    MemberBadUrls,
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    #[error("etcdserver: unhealthy cluster")]
    Unhealthy,
    #[error("etcdserver: server stopped")]
    Stopped,
    #[error("etcdserver: not capable")]
    NotCapable,
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("etcdserver: corrupt cluster")]
    Corrupt,
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
    /// A failure inside this member (disk, encoding) that the client cannot fix.
    #[error("etcdserver: {0}")]
    Internal(String),
}

impl EtcdError {
    pub fn code(&self) -> Code {
        use EtcdError::*;
        match self {
            EmptyKey | KeyNotFound | ValueProvided | LeaseProvided | TooManyOps | DuplicateKey
            | RequestTooLarge => Code::InvalidArgument,
            Compacted | FutureRevision | LeaseTtlTooLarge => Code::OutOfRange,
            LeaseNotFound | MemberNotFound => Code::NotFound,
            LeaseExists | NotLeader | MemberExists | PeerUrlExists | MemberNotLearner
            | LearnerNotReady => Code::FailedPrecondition,
            MemberBadUrls => Code::InvalidArgument,
            NoLeader | LeaderChanged | Timeout | Unhealthy | Stopped => Code::Unavailable,
            NotCapable => Code::Unavailable,
            NoSpace => Code::ResourceExhausted,
            Corrupt => Code::DataLoss,
            RootUserNotExist | RootRoleNotExist | UserAlreadyExist | UserNotFound
            | RoleAlreadyExist | RoleNotFound | RoleNotGranted | PermissionNotGranted
            | AuthNotEnabled | InvalidAuthMgmt => Code::FailedPrecondition,
            UserEmpty | RoleEmpty | AuthFailed | PermissionNotGiven | AuthOldRevision => {
                Code::InvalidArgument
            }
            PermissionDenied => Code::PermissionDenied,
            InvalidAuthToken => Code::Unauthenticated,
            Internal(_) => Code::Internal,
        }
    }

    /// Rebuilds an error from the code and text carried in a Raft command's result or a
    /// forwarded response, so a follower reports exactly what the leader saw.
    pub fn from_wire(code: i32, message: &str) -> EtcdError {
        ALL_KNOWN
            .iter()
            .find(|e| e.to_string() == message)
            .cloned()
            .unwrap_or_else(|| {
                let text = message.strip_prefix("etcdserver: ").unwrap_or(message);
                let _ = code;
                EtcdError::Internal(text.to_string())
            })
    }
}

const ALL_KNOWN: &[EtcdError] = &[
    EtcdError::EmptyKey,
    EtcdError::KeyNotFound,
    EtcdError::ValueProvided,
    EtcdError::LeaseProvided,
    EtcdError::TooManyOps,
    EtcdError::DuplicateKey,
    EtcdError::RequestTooLarge,
    EtcdError::Compacted,
    EtcdError::FutureRevision,
    EtcdError::LeaseNotFound,
    EtcdError::LeaseExists,
    EtcdError::LeaseTtlTooLarge,
    EtcdError::NoLeader,
    EtcdError::NotLeader,
    EtcdError::LeaderChanged,
    EtcdError::Timeout,
    EtcdError::MemberNotFound,
    EtcdError::MemberExists,
    EtcdError::PeerUrlExists,
    EtcdError::MemberBadUrls,
    EtcdError::MemberNotLearner,
    EtcdError::LearnerNotReady,
    EtcdError::Unhealthy,
    EtcdError::Stopped,
    EtcdError::NotCapable,
    EtcdError::NoSpace,
    EtcdError::Corrupt,
    EtcdError::RootUserNotExist,
    EtcdError::RootRoleNotExist,
    EtcdError::UserAlreadyExist,
    EtcdError::UserEmpty,
    EtcdError::UserNotFound,
    EtcdError::RoleAlreadyExist,
    EtcdError::RoleNotFound,
    EtcdError::RoleEmpty,
    EtcdError::AuthFailed,
    EtcdError::PermissionNotGiven,
    EtcdError::PermissionDenied,
    EtcdError::RoleNotGranted,
    EtcdError::PermissionNotGranted,
    EtcdError::AuthNotEnabled,
    EtcdError::InvalidAuthToken,
    EtcdError::InvalidAuthMgmt,
    EtcdError::AuthOldRevision,
];

impl From<EtcdError> for Status {
    fn from(e: EtcdError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

/// Errors of the storage engine underneath: never shown to a client as they are.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("rocksdb: {0}")]
    RocksDb(#[from] rocksdb::Error),
    #[error("corrupt record in {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
}

impl From<StorageError> for EtcdError {
    fn from(e: StorageError) -> EtcdError {
        EtcdError::Internal(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip_keeps_etcd_text() {
        for e in ALL_KNOWN {
            let status = Status::from(e.clone());
            assert_eq!(
                EtcdError::from_wire(status.code() as i32, status.message()),
                *e
            );
        }
        assert_eq!(
            Status::from(EtcdError::Compacted).message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
    }
}
