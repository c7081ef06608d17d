//! rmem memory server.
pub mod store;
