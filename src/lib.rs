//! The Tether API crate: Rust code generated from `proto/tether/v1` plus a few
//! helpers every client and the server share.

/// Generated messages, clients and servers of package `tether.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("tether.v1");
}

/// The encoded `FileDescriptorSet` of every tether.v1 proto (and its
/// imports), for server reflection and dynamic JSON encoding.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tether_descriptor.bin"));

/// The agent stream protocol versions this build speaks.
pub const PROTOCOL_VERSION_MIN: u32 = 1;
/// See [`PROTOCOL_VERSION_MIN`].
pub const PROTOCOL_VERSION_MAX: u32 = 4;
/// The first protocol version in which accepted starts are not answered and
/// an AssignmentAck may carry the start (rule 7 of `AgentService.Connect`).
pub const PROTOCOL_LEAN_STARTS: u32 = 2;
/// The first protocol version in which a server that is going away tells
/// its agents to reconnect elsewhere (rule 11 of `AgentService.Connect`).
pub const PROTOCOL_RECONNECT: u32 = 3;
/// The first protocol version whose agents take a job's secrets from its
/// Assignment (rule 12 of `AgentService.Connect`): the server sends a job
/// with secrets to no older agent.
pub const PROTOCOL_SECRETS: u32 = 4;

pub mod codec;
pub mod mask;
pub mod time;
