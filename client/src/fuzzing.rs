//! What a fuzz target drives (`fuzz/`): the client's handling of a
//! server's replies, the way every connection does it. Not an API.

use rmem_proto::wire::{self, Opcode, PAGE_SIZE, Page, Response};

use crate::frame;

/// Treats `data` as what a server sent: its first byte sets how many pages
/// the requests asked for (1 to 64), the rest is a stream of frames, the
/// first of them the HELLO_OK. Every frame goes through the checks a
/// connection makes; errors are answers, a panic is a bug.
pub fn replies(data: &[u8]) {
    let Some((&n, mut rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(n % 64) + 1;
    let handles: Vec<u64> = (0..count as u64).collect();
    let mut out: Vec<Page> = vec![[0u8; PAGE_SIZE]; count];
    let mut statuses = Vec::new();
    let mut limits = None;
    loop {
        let max = limits.map_or(frame::HANDSHAKE_MAX_FRAME, |l: wire::Limits| {
            frame::reply_max(&l)
        });
        let Ok(Some((header, payload, after))) = wire::split_frame(rest, max) else {
            return;
        };
        rest = after;
        let Some(l) = limits else {
            match frame::hello_ok("fuzz", &header, payload) {
                Ok(ok) => limits = Some(ok.limits),
                Err(_) => return,
            }
            continue;
        };
        let Ok(response) = frame::decode("fuzz", &header, payload, l.max_batch_pages) else {
            continue;
        };
        match response {
            Response::GetOk(batch) => {
                let _ = frame::copy_get("fuzz", &handles, &batch, &mut out, &mut statuses);
            }
            r @ Response::PutOk(_) => {
                let _ = frame::statuses("fuzz", r, Opcode::PutOk, count);
            }
            r @ Response::FreeOk(_) => {
                let _ = frame::statuses("fuzz", r, Opcode::FreeOk, count);
            }
            _ => {}
        }
    }
}
