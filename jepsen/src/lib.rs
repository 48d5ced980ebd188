//! Flotilla's chaos suite: real store members in network namespaces, faults injected with
//! iptables and signals, client histories recorded and checked.
//!
//! `net` builds the network, `db` runs the members, `nemesis` applies faults, `client` and
//! `workload` produce operations, `runner` drives a test, `history` records it, `wgl`, `elle` and
//! `check` judge it, `report` writes the files.

pub mod check;
pub mod client;
pub mod db;
pub mod elle;
pub mod history;
pub mod nemesis;
pub mod net;
pub mod report;
pub mod runner;
pub mod wgl;
pub mod workload;
