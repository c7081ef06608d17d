//! rmem's protocols.
//!
//! - [`wire`]: the binary, length-prefixed data-plane protocol that moves
//!   pages between agents and memory servers.
//! - [`admin`]: the gRPC administration API of a memory server (tonic/prost,
//!   generated at build time from `proto/`).
//! - [`control`]: the gRPC control plane served by the coordinator.
//! - [`agent`]: the gRPC administration API of a node agent (which
//!   processes it attaches through the kernel module).

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

/// gRPC administration API of a node agent's kernel backend, served on
/// its Unix socket by `rmem-agent serve`.
pub mod agent {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_debug_implementations, clippy::all)]
        tonic::include_proto!("rmem.agent.v1");
    }
}

/// Encoded `FileDescriptorSet` of every rmem `.proto`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/rmem_descriptor.bin"));

/// A reflection service builder that knows every rmem service and the
/// standard health service.
pub fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Adds server reflection, v1 and v1alpha, to `router`: every rmem gRPC
/// endpoint serves both, so generic clients (grpcurl) work.
pub fn with_reflection<L>(
    router: tonic::transport::server::Router<L>,
) -> tonic::transport::server::Router<L> {
    router
        .add_service(
            reflection()
                .build_v1()
                .expect("embedded descriptors are valid"),
        )
        .add_service(
            reflection()
                .build_v1alpha()
                .expect("embedded descriptors are valid"),
        )
}
