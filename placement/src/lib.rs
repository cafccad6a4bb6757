//! The placement driver (PD): cluster metadata, ID allocation, routing lookups and the
//! scheduler. The scheduler is pure — a cluster view in, operators out.
//!
//! Boundary: PD never links the storage engine; stores talk to it through `rangekv-rpc`.
//! (The service and metadata store land with the replication-core issue; this is the
//! routing table both PD and the client's range cache use.)

pub mod routing;
