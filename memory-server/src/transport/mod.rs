//! Network transports of the data plane. Each speaks the protocol of
//! [`rmem_proto::wire`] with the same semantics; requests are executed by
//! [`session::Session`], which is independent of the transport.

pub mod admission;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod session;
pub mod tcp;
