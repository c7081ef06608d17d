//! Encoding and decoding of frame payloads.
//!
//! Decoders borrow from the received bytes: a PUT's pages are handed to the
//! store straight from the receive buffer, and a GET_OK's pages straight to
//! the caller's memory. Encoders append to a `Vec<u8>` the caller reuses.

use super::header::{DecodeError, ErrorCode, FrameHeader, HEADER_LEN, Limits, Opcode, PageStatus};
use super::rdma::{
    LOCATION_LEN, Locations, RdmaAccept, RdmaEndpoint, StagedPuts, decode_accept, decode_endpoint,
};
use super::{
    BATCH_PREFIX_LEN, GET_ENTRY_LEN, MAGIC, MAX_CREDENTIAL_LEN, MAX_TENANT_LEN, PAGE_SIZE,
    PUT_ENTRY_LEN, page_crc,
};

/// A page's bytes.
pub type Page = [u8; PAGE_SIZE];

/// HELLO_OK flag: the server accepts RDMA_CONNECT on this connection.
pub const HELLO_RDMA: u16 = 1;

/// The client's opening message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello<'a> {
    pub version: u16,
    pub node_id: u64,
    pub tenant: &'a str,
    pub credential: &'a [u8],
}

/// The server's answer to a good HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloOk {
    pub version: u16,
    /// What the server offers beyond TCP ([`HELLO_RDMA`]).
    pub flags: u16,
    pub page_size: u32,
    pub limits: Limits,
    pub server_id: u64,
}

/// Usage as seen by one tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stat {
    pub capacity_pages: u64,
    pub used_pages: u64,
    pub tenant_used_pages: u64,
    /// `u64::MAX` when the tenant has no quota of its own.
    pub tenant_quota_pages: u64,
}

/// A fatal error, sent before closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorFrame<'a> {
    pub code: ErrorCode,
    pub message: &'a str,
}

/// One page of a PUT.
#[derive(Debug, Clone, Copy)]
pub struct PutEntry<'a> {
    pub handle: u64,
    pub crc: u32,
    pub data: &'a Page,
}

impl PutEntry<'_> {
    /// Whether the data matches the checksum the client sent.
    pub fn checksum_ok(&self) -> bool {
        page_crc(self.data) == self.crc
    }
}

/// The pages of a PUT, validated for length.
#[derive(Debug, Clone, Copy)]
pub struct PutBatch<'a> {
    entries: &'a [u8],
}

impl<'a> PutBatch<'a> {
    /// Number of pages.
    pub fn len(&self) -> usize {
        self.entries.len() / PUT_ENTRY_LEN
    }
    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// The pages in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = PutEntry<'a>> + 'a {
        self.entries.chunks_exact(PUT_ENTRY_LEN).map(|e| PutEntry {
            handle: u64::from_le_bytes(e[0..8].try_into().expect("8 bytes")),
            crc: u32::from_le_bytes(e[8..12].try_into().expect("4 bytes")),
            data: e[16..].try_into().expect("page-sized"),
        })
    }
}

/// The handles of a GET or FREE.
#[derive(Debug, Clone, Copy)]
pub struct Handles<'a> {
    bytes: &'a [u8],
}

impl<'a> Handles<'a> {
    /// Number of handles.
    pub fn len(&self) -> usize {
        self.bytes.len() / 8
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    /// The handles in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = u64> + 'a {
        self.bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
    }
}

/// Per-page statuses of a PUT_OK or FREE_OK, validated.
#[derive(Debug, Clone, Copy)]
pub struct Statuses<'a> {
    bytes: &'a [u8],
}

impl<'a> Statuses<'a> {
    /// Number of statuses.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    /// The statuses in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = PageStatus> + 'a {
        self.bytes
            .iter()
            .map(|&b| PageStatus::from_u8(b).expect("validated on decode"))
    }
}

/// One page of a GET_OK.
#[derive(Debug, Clone, Copy)]
pub struct GetEntry<'a> {
    pub status: PageStatus,
    pub crc: u32,
    /// Present exactly when `status` is [`PageStatus::Ok`].
    pub data: Option<&'a Page>,
}

/// The pages of a GET_OK, validated for structure (not for checksums: the
/// caller checks those against its own copy of each page as it consumes it).
#[derive(Debug, Clone, Copy)]
pub struct GetBatch<'a> {
    count: usize,
    entries: &'a [u8],
}

impl<'a> GetBatch<'a> {
    /// Number of pages.
    pub fn len(&self) -> usize {
        self.count
    }
    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// The pages in order.
    pub fn iter(&self) -> GetIter<'a> {
        GetIter {
            rest: self.entries,
            left: self.count,
        }
    }
}

/// Iterator over a [`GetBatch`].
#[derive(Debug)]
pub struct GetIter<'a> {
    rest: &'a [u8],
    left: usize,
}

impl<'a> Iterator for GetIter<'a> {
    type Item = GetEntry<'a>;
    fn next(&mut self) -> Option<GetEntry<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let (entry, rest) = split_get_entry(self.rest).expect("validated on decode");
        self.rest = rest;
        Some(entry)
    }
}

fn split_get_entry(b: &[u8]) -> Result<(GetEntry<'_>, &[u8]), DecodeError> {
    let short = || DecodeError::Length {
        opcode: Opcode::GetOk,
        got: b.len(),
        want: 8,
    };
    let head = b.get(..8).ok_or_else(short)?;
    let status = PageStatus::from_u8(head[0]).ok_or(DecodeError::BadStatus(head[0]))?;
    if head[1..4] != [0, 0, 0] {
        return Err(DecodeError::ReservedBits);
    }
    let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    if status == PageStatus::Ok {
        let body = b.get(8..GET_ENTRY_LEN).ok_or(DecodeError::Length {
            opcode: Opcode::GetOk,
            got: b.len(),
            want: GET_ENTRY_LEN,
        })?;
        let data: &Page = body.try_into().expect("page-sized");
        Ok((
            GetEntry {
                status,
                crc,
                data: Some(data),
            },
            &b[GET_ENTRY_LEN..],
        ))
    } else {
        Ok((
            GetEntry {
                status,
                crc,
                data: None,
            },
            &b[8..],
        ))
    }
}

/// A decoded request (client to server).
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    Hello(Hello<'a>),
    Put(PutBatch<'a>),
    Get(Handles<'a>),
    Free(Handles<'a>),
    Stat,
    RdmaConnect(RdmaEndpoint),
    PutStaged(StagedPuts<'a>),
    Locate(Handles<'a>),
    Caps(super::caps::Tokens<'a>),
}

/// A decoded response (server to client).
#[derive(Debug, Clone, Copy)]
pub enum Response<'a> {
    HelloOk(HelloOk),
    PutOk(Statuses<'a>),
    GetOk(GetBatch<'a>),
    FreeOk(Statuses<'a>),
    StatOk(Stat),
    RdmaAccept(RdmaAccept),
    Located(Locations<'a>),
    CapsOk(super::caps::Verdicts<'a>),
    Error(ErrorFrame<'a>),
}

pub(super) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

pub(super) fn exact(opcode: Opcode, payload: &[u8], want: usize) -> Result<(), DecodeError> {
    if payload.len() == want {
        Ok(())
    } else {
        Err(DecodeError::Length {
            opcode,
            got: payload.len(),
            want,
        })
    }
}

/// Splits a batch payload into its count and entries, checking the count
/// against `max_batch` and the entry bytes against `entry_len` (when fixed).
fn batch(
    opcode: Opcode,
    payload: &[u8],
    max_batch: u32,
    entry_len: Option<usize>,
) -> Result<(u32, &[u8]), DecodeError> {
    if payload.len() < BATCH_PREFIX_LEN {
        return Err(DecodeError::Length {
            opcode,
            got: payload.len(),
            want: BATCH_PREFIX_LEN,
        });
    }
    let count = u32_at(payload, 0);
    if u32_at(payload, 4) != 0 {
        return Err(DecodeError::ReservedBits);
    }
    if count > max_batch {
        return Err(DecodeError::BatchTooLarge {
            count,
            max: max_batch,
        });
    }
    let entries = &payload[BATCH_PREFIX_LEN..];
    if let Some(len) = entry_len {
        exact(opcode, entries, count as usize * len)?;
    }
    Ok((count, entries))
}

impl<'a> Request<'a> {
    /// Decodes a request payload. `max_batch` bounds the pages per batch.
    pub fn decode(
        header: &FrameHeader,
        payload: &'a [u8],
        max_batch: u32,
    ) -> Result<Self, DecodeError> {
        debug_assert_eq!(payload.len(), header.len as usize);
        Ok(match header.opcode {
            Opcode::Hello => Request::Hello(decode_hello(payload)?),
            Opcode::Put => {
                let (_, entries) = batch(Opcode::Put, payload, max_batch, Some(PUT_ENTRY_LEN))?;
                for e in entries.chunks_exact(PUT_ENTRY_LEN) {
                    if e[12..16] != [0, 0, 0, 0] {
                        return Err(DecodeError::ReservedBits);
                    }
                }
                Request::Put(PutBatch { entries })
            }
            Opcode::Get => {
                let (_, bytes) = batch(Opcode::Get, payload, max_batch, Some(8))?;
                Request::Get(Handles { bytes })
            }
            Opcode::Free => {
                let (_, bytes) = batch(Opcode::Free, payload, max_batch, Some(8))?;
                Request::Free(Handles { bytes })
            }
            Opcode::Stat => {
                exact(Opcode::Stat, payload, 0)?;
                Request::Stat
            }
            Opcode::RdmaConnect => Request::RdmaConnect(decode_endpoint(payload)?),
            Opcode::PutStaged => {
                let (_, bytes) = batch(
                    Opcode::PutStaged,
                    payload,
                    max_batch,
                    Some(StagedPuts::ENTRY_LEN),
                )?;
                Request::PutStaged(StagedPuts::new(bytes))
            }
            Opcode::Locate => {
                let (_, bytes) = batch(Opcode::Locate, payload, max_batch, Some(8))?;
                Request::Locate(Handles { bytes })
            }
            Opcode::Caps => Request::Caps(super::caps::decode_caps(payload)?),
            other => return Err(DecodeError::Unexpected(other)),
        })
    }
}

fn decode_hello(p: &[u8]) -> Result<Hello<'_>, DecodeError> {
    const FIXED: usize = 20;
    if p.len() < FIXED {
        return Err(DecodeError::Length {
            opcode: Opcode::Hello,
            got: p.len(),
            want: FIXED,
        });
    }
    if p[0..4] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = u16_at(p, 4);
    if u16_at(p, 6) != 0 || p[17] != 0 {
        return Err(DecodeError::ReservedBits);
    }
    let node_id = u64_at(p, 8);
    let tenant_len = p[16] as usize;
    let cred_len = u16_at(p, 18) as usize;
    if tenant_len > MAX_TENANT_LEN || cred_len > MAX_CREDENTIAL_LEN {
        return Err(DecodeError::BadIdentity);
    }
    exact(Opcode::Hello, p, FIXED + tenant_len + cred_len)?;
    let tenant =
        std::str::from_utf8(&p[FIXED..FIXED + tenant_len]).map_err(|_| DecodeError::BadIdentity)?;
    Ok(Hello {
        version,
        node_id,
        tenant,
        credential: &p[FIXED + tenant_len..],
    })
}

impl<'a> Response<'a> {
    /// Decodes a response payload. `max_batch` bounds the pages per batch.
    pub fn decode(
        header: &FrameHeader,
        payload: &'a [u8],
        max_batch: u32,
    ) -> Result<Self, DecodeError> {
        debug_assert_eq!(payload.len(), header.len as usize);
        Ok(match header.opcode {
            Opcode::HelloOk => {
                exact(Opcode::HelloOk, payload, 24)?;
                let flags = u16_at(payload, 2);
                if flags & !HELLO_RDMA != 0 {
                    return Err(DecodeError::ReservedBits);
                }
                Response::HelloOk(HelloOk {
                    version: u16_at(payload, 0),
                    flags,
                    page_size: u32_at(payload, 4),
                    limits: Limits {
                        max_batch_pages: u32_at(payload, 8),
                        max_frame_bytes: u32_at(payload, 12),
                    },
                    server_id: u64_at(payload, 16),
                })
            }
            op @ (Opcode::PutOk | Opcode::FreeOk) => {
                let (_, bytes) = batch(op, payload, max_batch, Some(1))?;
                if let Some(&b) = bytes.iter().find(|&&b| PageStatus::from_u8(b).is_none()) {
                    return Err(DecodeError::BadStatus(b));
                }
                let statuses = Statuses { bytes };
                if op == Opcode::PutOk {
                    Response::PutOk(statuses)
                } else {
                    Response::FreeOk(statuses)
                }
            }
            Opcode::GetOk => {
                let (count, entries) = batch(Opcode::GetOk, payload, max_batch, None)?;
                let mut rest = entries;
                for _ in 0..count {
                    rest = split_get_entry(rest)?.1;
                }
                if !rest.is_empty() {
                    return Err(DecodeError::Length {
                        opcode: Opcode::GetOk,
                        got: entries.len(),
                        want: entries.len() - rest.len(),
                    });
                }
                Response::GetOk(GetBatch {
                    count: count as usize,
                    entries,
                })
            }
            Opcode::StatOk => {
                exact(Opcode::StatOk, payload, 32)?;
                Response::StatOk(Stat {
                    capacity_pages: u64_at(payload, 0),
                    used_pages: u64_at(payload, 8),
                    tenant_used_pages: u64_at(payload, 16),
                    tenant_quota_pages: u64_at(payload, 24),
                })
            }
            Opcode::RdmaAccept => Response::RdmaAccept(decode_accept(payload)?),
            Opcode::Located => {
                let (_, bytes) = batch(Opcode::Located, payload, max_batch, Some(LOCATION_LEN))?;
                Response::Located(Locations::new(bytes)?)
            }
            Opcode::CapsOk => Response::CapsOk(super::caps::decode_verdicts(payload)?),
            Opcode::Error => {
                if payload.len() < 4 {
                    return Err(DecodeError::Length {
                        opcode: Opcode::Error,
                        got: payload.len(),
                        want: 4,
                    });
                }
                let len = u16_at(payload, 2) as usize;
                exact(Opcode::Error, payload, 4 + len)?;
                Response::Error(ErrorFrame {
                    code: ErrorCode::from_u16(u16_at(payload, 0)),
                    message: std::str::from_utf8(&payload[4..]).unwrap_or("<invalid UTF-8>"),
                })
            }
            other => return Err(DecodeError::Unexpected(other)),
        })
    }
}

/// Appends one frame to a buffer: writes a placeholder header on
/// [`FrameWriter::begin`] and patches the payload length on
/// [`FrameWriter::finish`].
#[derive(Debug)]
pub struct FrameWriter<'b> {
    buf: &'b mut Vec<u8>,
    start: usize,
}

impl<'b> FrameWriter<'b> {
    /// Starts a frame at the end of `buf`.
    pub fn begin(buf: &'b mut Vec<u8>, opcode: Opcode, request_id: u64) -> Self {
        let start = buf.len();
        buf.extend_from_slice(
            &FrameHeader {
                len: 0,
                opcode,
                request_id,
            }
            .encode(),
        );
        Self { buf, start }
    }

    /// The payload bytes written so far can be extended through this.
    pub fn payload(&mut self) -> &mut Vec<u8> {
        self.buf
    }

    /// Patches the header with the payload length.
    pub fn finish(self) {
        let len = u32::try_from(self.buf.len() - self.start - HEADER_LEN)
            .expect("frames are far below 4 GiB");
        self.buf[self.start..self.start + 4].copy_from_slice(&len.to_le_bytes());
    }
}

/// Appends a HELLO.
pub fn encode_hello(buf: &mut Vec<u8>, hello: &Hello<'_>) {
    assert!(hello.tenant.len() <= MAX_TENANT_LEN, "tenant name too long");
    assert!(
        hello.credential.len() <= MAX_CREDENTIAL_LEN,
        "credential too long"
    );
    let mut w = FrameWriter::begin(buf, Opcode::Hello, 0);
    let p = w.payload();
    p.extend_from_slice(&MAGIC);
    p.extend_from_slice(&hello.version.to_le_bytes());
    p.extend_from_slice(&0u16.to_le_bytes());
    p.extend_from_slice(&hello.node_id.to_le_bytes());
    p.push(hello.tenant.len() as u8);
    p.push(0);
    p.extend_from_slice(&(hello.credential.len() as u16).to_le_bytes());
    p.extend_from_slice(hello.tenant.as_bytes());
    p.extend_from_slice(hello.credential);
    w.finish();
}

/// Appends a HELLO_OK.
pub fn encode_hello_ok(buf: &mut Vec<u8>, ok: &HelloOk) {
    let mut w = FrameWriter::begin(buf, Opcode::HelloOk, 0);
    let p = w.payload();
    p.extend_from_slice(&ok.version.to_le_bytes());
    p.extend_from_slice(&ok.flags.to_le_bytes());
    p.extend_from_slice(&ok.page_size.to_le_bytes());
    p.extend_from_slice(&ok.limits.max_batch_pages.to_le_bytes());
    p.extend_from_slice(&ok.limits.max_frame_bytes.to_le_bytes());
    p.extend_from_slice(&ok.server_id.to_le_bytes());
    w.finish();
}

pub(super) fn batch_prefix(p: &mut Vec<u8>, count: usize) {
    p.extend_from_slice(&(count as u32).to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
}

/// Appends a PUT of `pages`, computing each page's checksum.
pub fn encode_put<'p>(
    buf: &mut Vec<u8>,
    request_id: u64,
    pages: impl ExactSizeIterator<Item = (u64, &'p Page)>,
) {
    buf.reserve(HEADER_LEN + BATCH_PREFIX_LEN + pages.len() * PUT_ENTRY_LEN);
    let mut w = FrameWriter::begin(buf, Opcode::Put, request_id);
    let p = w.payload();
    batch_prefix(p, pages.len());
    for (handle, data) in pages {
        p.extend_from_slice(&handle.to_le_bytes());
        p.extend_from_slice(&page_crc(data).to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(data);
    }
    w.finish();
}

/// Appends a GET, FREE or LOCATE of `handles`.
pub fn encode_handles(buf: &mut Vec<u8>, opcode: Opcode, request_id: u64, handles: &[u64]) {
    debug_assert!(matches!(
        opcode,
        Opcode::Get | Opcode::Free | Opcode::Locate
    ));
    let mut w = FrameWriter::begin(buf, opcode, request_id);
    let p = w.payload();
    batch_prefix(p, handles.len());
    for h in handles {
        p.extend_from_slice(&h.to_le_bytes());
    }
    w.finish();
}

/// Appends a STAT.
pub fn encode_stat(buf: &mut Vec<u8>, request_id: u64) {
    FrameWriter::begin(buf, Opcode::Stat, request_id).finish();
}

/// Appends a PUT_OK or FREE_OK.
pub fn encode_statuses(
    buf: &mut Vec<u8>,
    opcode: Opcode,
    request_id: u64,
    statuses: &[PageStatus],
) {
    debug_assert!(matches!(opcode, Opcode::PutOk | Opcode::FreeOk));
    let mut w = FrameWriter::begin(buf, opcode, request_id);
    let p = w.payload();
    batch_prefix(p, statuses.len());
    p.extend(statuses.iter().map(|&s| s as u8));
    w.finish();
}

/// Builds a GET_OK page by page, so the server copies each page from its
/// pool straight into the send buffer.
#[derive(Debug)]
pub struct GetOkWriter<'b> {
    frame: FrameWriter<'b>,
    count_at: usize,
    count: u32,
}

impl<'b> GetOkWriter<'b> {
    /// Starts a GET_OK for up to `capacity` pages.
    pub fn begin(buf: &'b mut Vec<u8>, request_id: u64, capacity: usize) -> Self {
        buf.reserve(HEADER_LEN + BATCH_PREFIX_LEN + capacity * GET_ENTRY_LEN);
        let mut frame = FrameWriter::begin(buf, Opcode::GetOk, request_id);
        let count_at = frame.payload().len();
        batch_prefix(frame.payload(), 0);
        Self {
            frame,
            count_at,
            count: 0,
        }
    }

    /// Adds a found page: `fill` writes its 4096 bytes into the frame.
    pub fn push_page(&mut self, crc: u32, fill: impl FnOnce(&mut Page)) {
        let p = self.frame.payload();
        p.extend_from_slice(&[PageStatus::Ok as u8, 0, 0, 0]);
        p.extend_from_slice(&crc.to_le_bytes());
        let at = p.len();
        p.resize(at + PAGE_SIZE, 0);
        fill((&mut p[at..]).try_into().expect("page-sized"));
        self.count += 1;
    }

    /// Adds a page that is not served, with its status.
    pub fn push_status(&mut self, status: PageStatus) {
        debug_assert_ne!(status, PageStatus::Ok);
        let p = self.frame.payload();
        p.extend_from_slice(&[status as u8, 0, 0, 0, 0, 0, 0, 0]);
        self.count += 1;
    }

    /// Patches the count and length.
    pub fn finish(mut self) {
        let at = self.count_at;
        self.frame.payload()[at..at + 4].copy_from_slice(&self.count.to_le_bytes());
        self.frame.finish();
    }
}

/// Appends a STAT_OK.
pub fn encode_stat_ok(buf: &mut Vec<u8>, request_id: u64, stat: &Stat) {
    let mut w = FrameWriter::begin(buf, Opcode::StatOk, request_id);
    let p = w.payload();
    for v in [
        stat.capacity_pages,
        stat.used_pages,
        stat.tenant_used_pages,
        stat.tenant_quota_pages,
    ] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    w.finish();
}

/// Appends an ERROR; the message is cut to fit.
pub fn encode_error(buf: &mut Vec<u8>, request_id: u64, code: ErrorCode, message: &str) {
    let mut end = message.len().min(1024);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let mut w = FrameWriter::begin(buf, Opcode::Error, request_id);
    let p = w.payload();
    p.extend_from_slice(&(code as u16).to_le_bytes());
    p.extend_from_slice(&(msg.len() as u16).to_le_bytes());
    p.extend_from_slice(msg);
    w.finish();
}

/// A frame split off a buffer: header, payload, and the bytes after it.
pub type SplitFrame<'a> = (FrameHeader, &'a [u8], &'a [u8]);

/// Splits one whole frame off the front of `bytes`: header, payload, rest.
/// `Ok(None)` means more bytes are needed.
pub fn split_frame(bytes: &[u8], max_len: u32) -> Result<Option<SplitFrame<'_>>, DecodeError> {
    let Some(head) = bytes.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let header = FrameHeader::decode(head.try_into().expect("16 bytes"), max_len)?;
    let end = HEADER_LEN + header.len as usize;
    match bytes.get(HEADER_LEN..end) {
        Some(payload) => Ok(Some((header, payload, &bytes[end..]))),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests;
