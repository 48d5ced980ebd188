//! Wire definitions for Flotilla, generated from the `.proto` files under
//! `proto/`: the etcd v3 client API (`etcdserverpb`, `mvccpb`, `authpb`) and
//! Flotilla's own member-to-member protocol (`flotillapb`).
//!
//! The modules are siblings at the crate root because the generated code
//! refers across packages with paths such as `super::mvccpb::KeyValue`.

/// etcd's MVCC types: key-values and watch events.
#[allow(clippy::all)]
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

/// etcd's auth store types: users, roles and permissions.
#[allow(clippy::all)]
pub mod authpb {
    tonic::include_proto!("authpb");
}

/// The etcd v3 gRPC services and their request and response messages.
#[allow(clippy::all)]
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// Flotilla's peer protocol: Raft transport, request forwarding and the
/// commands stored in the Raft log.
#[allow(clippy::all)]
pub mod flotillapb {
    tonic::include_proto!("flotillapb");
}
