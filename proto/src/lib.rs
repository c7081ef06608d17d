//! rmem's protocols.
//!
//! - [`wire`]: the binary, length-prefixed data-plane protocol that moves
//!   pages between agents and memory servers.
//! - [`admin`]: the gRPC administration API of a memory server (tonic/prost,
//!   generated at build time from `proto/`).
//! - [`control`]: the gRPC control plane served by the coordinator.

pub mod wire;

/// gRPC administration API of a memory server.
pub mod admin {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_debug_implementations, clippy::all)]
        tonic::include_proto!("rmem.admin.v1");
    }
}

/// gRPC control plane: membership, placement, interval registrations and
/// invalidation fan-out, served by `rmem-coordinator`.
pub mod control {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_debug_implementations, clippy::all)]
        tonic::include_proto!("rmem.control.v1");
    }
}

/// Encoded `FileDescriptorSet` of every rmem `.proto`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/rmem_descriptor.bin"));
