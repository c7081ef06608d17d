//! The client's handling of what a server sends.

/// One input.
pub fn target(data: &[u8]) {
    rmem_client::fuzzing::replies(data);
}
