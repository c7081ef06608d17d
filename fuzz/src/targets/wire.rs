//! Every frame of a byte stream, decoded as a request and as a response.

use rmem_proto::wire::{self, Request, Response};

/// One input.
pub fn target(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some((header, payload, after))) = wire::split_frame(rest, 1 << 22) {
        let _ = Request::decode(&header, payload, wire::DEFAULT_MAX_BATCH_PAGES);
        let _ = Response::decode(&header, payload, wire::DEFAULT_MAX_BATCH_PAGES);
        rest = after;
    }
}
