//! Request building and response checking shared by both connection kinds.

use rmem_proto::wire::{
    self, FrameHeader, GetBatch, Hello, HelloOk, Opcode, PAGE_SIZE, PROTOCOL_VERSION, Page,
    PageStatus, Response, page_crc,
};

use crate::{ClientConfig, ClientError};

/// The HELLO frame for `cfg`.
pub fn hello(cfg: &ClientConfig) -> Vec<u8> {
    let mut buf = Vec::new();
    wire::encode_hello(
        &mut buf,
        &Hello {
            version: PROTOCOL_VERSION,
            node_id: cfg.node_id,
            tenant: &cfg.tenant,
            credential: &cfg.credential,
        },
    );
    buf
}

/// Largest HELLO_OK or ERROR we accept before the limits are known.
pub const HANDSHAKE_MAX_FRAME: u32 = 4096;

/// The largest reply accepted once the server announced `limits` (with
/// room for an ERROR). Saturating: a server may announce any size, and a
/// wrapped sum would turn a huge limit into a tiny one (or, checked, panic:
/// the fuzzer found that).
pub fn reply_max(limits: &wire::Limits) -> u32 {
    limits
        .max_frame_bytes
        .max(HANDSHAKE_MAX_FRAME)
        .saturating_add(64)
}

/// Decodes a response, turning an ERROR frame into [`ClientError::Rejected`].
pub fn decode<'a>(
    addr: &str,
    header: &FrameHeader,
    payload: &'a [u8],
    max_batch: u32,
) -> Result<Response<'a>, ClientError> {
    match Response::decode(header, payload, max_batch) {
        Ok(Response::Error(e)) => Err(ClientError::Rejected {
            addr: addr.to_string(),
            code: e.code,
            message: e.message.to_string(),
        }),
        Ok(r) => Ok(r),
        Err(source) => Err(ClientError::Protocol {
            addr: addr.to_string(),
            source,
        }),
    }
}

pub fn unexpected(addr: &str, opcode: Opcode) -> ClientError {
    ClientError::Protocol {
        addr: addr.to_string(),
        source: wire::DecodeError::Unexpected(opcode),
    }
}

/// Checks a HELLO_OK.
pub fn hello_ok(addr: &str, header: &FrameHeader, payload: &[u8]) -> Result<HelloOk, ClientError> {
    match decode(addr, header, payload, 0)? {
        Response::HelloOk(ok)
            if ok.page_size as usize == PAGE_SIZE && ok.limits.max_batch_pages > 0 =>
        {
            Ok(ok)
        }
        Response::HelloOk(_) => Err(ClientError::Rejected {
            addr: addr.to_string(),
            code: wire::ErrorCode::UnsupportedVersion,
            message: "server uses another page size".into(),
        }),
        _ => Err(unexpected(addr, header.opcode)),
    }
}

/// Copies a GET_OK into `out`, verifying every page's checksum; the status
/// of each requested handle goes to `statuses`.
pub fn copy_get(
    addr: &str,
    handles: &[u64],
    batch: &GetBatch<'_>,
    out: &mut [Page],
    statuses: &mut Vec<PageStatus>,
) -> Result<(), ClientError> {
    if batch.len() != handles.len() {
        return Err(ClientError::Protocol {
            addr: addr.to_string(),
            source: wire::DecodeError::Length {
                opcode: Opcode::GetOk,
                got: batch.len(),
                want: handles.len(),
            },
        });
    }
    statuses.clear();
    for ((entry, dst), &handle) in batch.iter().zip(out.iter_mut()).zip(handles) {
        if let Some(data) = entry.data {
            if page_crc(data) != entry.crc {
                return Err(ClientError::Checksum {
                    addr: addr.to_string(),
                    handle,
                });
            }
            dst.copy_from_slice(data);
        }
        statuses.push(entry.status);
    }
    Ok(())
}

/// The statuses of a PUT_OK or FREE_OK answering `count` pages.
pub fn statuses(
    addr: &str,
    response: Response<'_>,
    want: Opcode,
    count: usize,
) -> Result<Vec<PageStatus>, ClientError> {
    let s = match (response, want) {
        (Response::PutOk(s), Opcode::PutOk) | (Response::FreeOk(s), Opcode::FreeOk) => s,
        _ => return Err(unexpected(addr, want)),
    };
    if s.len() != count {
        return Err(ClientError::Protocol {
            addr: addr.to_string(),
            source: wire::DecodeError::Length {
                opcode: want,
                got: s.len(),
                want: count,
            },
        });
    }
    Ok(s.iter().collect())
}

/// Fails with [`ClientError::BatchTooLarge`] past the server's limit.
pub fn check_batch(what: &'static str, pages: usize, max: u32) -> Result<(), ClientError> {
    if pages > max as usize {
        Err(ClientError::BatchTooLarge { what, pages, max })
    } else {
        Ok(())
    }
}
