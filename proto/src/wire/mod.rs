//! The data-plane wire protocol.
//!
//! Every message is a frame: a 16-byte [`FrameHeader`] followed by `len`
//! payload bytes. All integers are little-endian.
//!
//! ```text
//! header   len:u32  opcode:u8  flags:u8(0)  reserved:u16(0)  request_id:u64
//! HELLO    magic "RMEM"  version:u16  flags:u16(0)  node_id:u64
//!          tenant_len:u8  reserved:u8  cred_len:u16  tenant  credential
//! HELLO_OK version:u16  flags:u16  page_size:u32  max_batch_pages:u32
//!          max_frame_bytes:u32  server_id:u64      (flags bit 0: RDMA offered)
//! PUT      count:u32  reserved:u32  count × { handle:u64 crc32c:u32 reserved:u32 data[4096] }
//! GET      count:u32  reserved:u32  count × handle:u64
//! FREE     count:u32  reserved:u32  count × handle:u64
//! STAT     (empty)
//! PUT_OK   count:u32  reserved:u32  count × status:u8
//! FREE_OK  count:u32  reserved:u32  count × status:u8
//! GET_OK   count:u32  reserved:u32  count × { status:u8 reserved[3] crc32c:u32 [data[4096] if status = OK] }
//! STAT_OK  capacity_pages:u64  used_pages:u64  tenant_used_pages:u64  tenant_quota_pages:u64
//! ERROR    code:u16  msg_len:u16  msg (UTF-8)
//! ```
//!
//! RDMA (`docs/ARCHITECTURE.md` has the design): the TCP
//! connection, once authenticated, sets up a reliable-connected queue pair
//! and stays open as its control channel.
//!
//! ```text
//! RDMA_CONNECT  endpoint = gid[16] qpn:u32 psn:u32 lid:u16 mtu:u8 max_rd_atomic:u8
//! RDMA_ACCEPT   endpoint  staging_addr:u64  staging_rkey:u32  staging_pages:u32
//! PUT_STAGED    count:u32  reserved:u32  count × { handle:u64 crc32c:u32 staging_index:u32 }
//! LOCATE        count:u32  reserved:u32  count × handle:u64
//! LOCATED       count:u32  reserved:u32  count × { status:u8 reserved[3] crc32c:u32
//!                                                  addr:u64 rkey:u32 reserved:u32 }
//! ```
//!
//! Capabilities (`caps.rs`): in a cluster an agent may use only the handles
//! its coordinator-signed capabilities name, which it hands each server
//! once per connection and again when renewed.
//!
//! ```text
//! CAPS     count:u32  reserved:u32  count × { len:u16 reserved:u16 token[len] }
//! CAPS_OK  count:u32  reserved:u32  count × verdict:u8
//! ```
//!
//! A page outside them gets the status DENIED.
//!
//! PUT_STAGED and LOCATE are answered by LOCATED: for each page its status
//! and, when OK, where its bytes are (an address and the rkey of the
//! tenant's memory region holding it), so the client can fetch it with a
//! one-sided RDMA READ and check it against the checksum.
//!
//! A connection starts with HELLO / HELLO_OK. After that the client may send
//! any number of requests without waiting (pipelining); each response carries
//! the request id it answers. Every page carries a CRC32C of its 4096 bytes,
//! checked by the server on PUT and by the client on GET. An ERROR frame is
//! fatal: the sender closes the connection after it. Outcomes of single pages
//! (not found, no space, quota) are [`PageStatus`] values inside the normal
//! responses and never close the connection.
//!
//! Decoding never panics and never allocates on a peer's word: a frame's
//! length is checked against the negotiated limit before its payload is read,
//! and counts are checked against the payload actually present.

mod caps;
mod codec;
mod header;
mod rdma;

pub use caps::*;
pub use codec::*;
pub use header::*;
pub use rdma::*;

/// Size of one page, the unit everything moves in.
pub const PAGE_SIZE: usize = 4096;
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 2;
/// First bytes of a HELLO payload.
pub const MAGIC: [u8; 4] = *b"RMEM";
/// Longest tenant name, in bytes.
pub const MAX_TENANT_LEN: usize = 64;
/// Longest credential, in bytes.
pub const MAX_CREDENTIAL_LEN: usize = 1024;
/// Largest batch any peer may negotiate.
pub const MAX_BATCH_PAGES_HARD: u32 = 1024;
/// Default batch limit a server announces.
pub const DEFAULT_MAX_BATCH_PAGES: u32 = 256;
/// Bytes of one PUT entry: handle, checksum, reserved, data.
pub const PUT_ENTRY_LEN: usize = 16 + PAGE_SIZE;
/// Bytes of one GET_OK entry that carries data.
pub const GET_ENTRY_LEN: usize = 8 + PAGE_SIZE;
/// Fixed prefix (count + reserved) of batch payloads.
pub const BATCH_PREFIX_LEN: usize = 8;

/// The largest frame payload needed for a batch of `pages` pages.
pub const fn max_frame_for_batch(pages: u32) -> u32 {
    (BATCH_PREFIX_LEN + pages as usize * PUT_ENTRY_LEN) as u32
}

/// CRC32C of a page (hardware accelerated where the CPU has it).
#[inline]
pub fn page_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}
