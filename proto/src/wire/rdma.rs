//! The frames that set up an RDMA queue pair over an authenticated TCP
//! connection and tell the client where its pages are.

use super::codec::{FrameWriter, batch_prefix, exact, u16_at, u32_at, u64_at};
use super::header::{DecodeError, Opcode, PageStatus};

/// Bytes of an encoded [`RdmaEndpoint`].
pub const ENDPOINT_LEN: usize = 28;
/// Bytes of an encoded [`RdmaAccept`].
pub const ACCEPT_LEN: usize = ENDPOINT_LEN + 16;
/// Bytes of one LOCATED entry.
pub const LOCATION_LEN: usize = 24;

/// One side of a reliable-connected queue pair: what the peer needs to
/// move its own queue pair to ready-to-receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RdmaEndpoint {
    /// The port's GID (RoCE: the IPv4-mapped address of the interface).
    pub gid: [u8; 16],
    pub qpn: u32,
    /// First packet sequence number.
    pub psn: u32,
    /// Local identifier (InfiniBand fabrics; 0 on RoCE).
    pub lid: u16,
    /// The port's active MTU, as the verbs enum (1 = 256 … 5 = 4096).
    pub mtu: u8,
    /// RDMA READs this side accepts in flight as a responder; the peer
    /// keeps its own outstanding READs within it.
    pub max_rd_atomic: u8,
}

/// A buffer of the server's that the client may RDMA WRITE into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemoteBuffer {
    pub addr: u64,
    pub rkey: u32,
    pub pages: u32,
}

/// The server's answer to RDMA_CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RdmaAccept {
    pub endpoint: RdmaEndpoint,
    /// Where PUT_STAGED finds its pages: page `i` of a staged batch is at
    /// `addr + i * PAGE_SIZE`.
    pub staging: RemoteBuffer,
}

/// Where a stored page is, for a one-sided RDMA READ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub status: PageStatus,
    /// Checksum of the stored bytes; the reader checks what it read
    /// against it (a page freed and its slot reused fails the check).
    pub crc: u32,
    pub addr: u64,
    pub rkey: u32,
}

impl Location {
    /// A page that has no location.
    pub fn missing(status: PageStatus) -> Self {
        Self {
            status,
            crc: 0,
            addr: 0,
            rkey: 0,
        }
    }
}

/// One page of a PUT_STAGED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagedPut {
    pub handle: u64,
    pub crc: u32,
    /// Page index in the connection's staging buffer.
    pub index: u32,
}

/// The entries of a PUT_STAGED, validated for length.
#[derive(Debug, Clone, Copy)]
pub struct StagedPuts<'a> {
    bytes: &'a [u8],
}

impl<'a> StagedPuts<'a> {
    /// Bytes of one entry.
    pub const ENTRY_LEN: usize = 16;

    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }
    /// Number of pages.
    pub fn len(&self) -> usize {
        self.bytes.len() / Self::ENTRY_LEN
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    /// The entries in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = StagedPut> + 'a {
        self.bytes.chunks_exact(Self::ENTRY_LEN).map(|e| StagedPut {
            handle: u64_at(e, 0),
            crc: u32_at(e, 8),
            index: u32_at(e, 12),
        })
    }
}

/// The entries of a LOCATED, validated.
#[derive(Debug, Clone, Copy)]
pub struct Locations<'a> {
    bytes: &'a [u8],
}

impl<'a> Locations<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        for e in bytes.chunks_exact(LOCATION_LEN) {
            PageStatus::from_u8(e[0]).ok_or(DecodeError::BadStatus(e[0]))?;
            if e[1..4] != [0, 0, 0] || e[20..24] != [0, 0, 0, 0] {
                return Err(DecodeError::ReservedBits);
            }
        }
        Ok(Self { bytes })
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.bytes.len() / LOCATION_LEN
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    /// The entries in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Location> + 'a {
        self.bytes.chunks_exact(LOCATION_LEN).map(|e| Location {
            status: PageStatus::from_u8(e[0]).expect("validated on decode"),
            crc: u32_at(e, 4),
            addr: u64_at(e, 8),
            rkey: u32_at(e, 16),
        })
    }
}

fn put_endpoint(p: &mut Vec<u8>, e: &RdmaEndpoint) {
    p.extend_from_slice(&e.gid);
    p.extend_from_slice(&e.qpn.to_le_bytes());
    p.extend_from_slice(&e.psn.to_le_bytes());
    p.extend_from_slice(&e.lid.to_le_bytes());
    p.push(e.mtu);
    p.push(e.max_rd_atomic);
}

fn get_endpoint(b: &[u8]) -> Result<RdmaEndpoint, DecodeError> {
    Ok(RdmaEndpoint {
        gid: b[0..16].try_into().expect("16 bytes"),
        qpn: u32_at(b, 16),
        psn: u32_at(b, 20),
        lid: u16_at(b, 24),
        mtu: b[26],
        max_rd_atomic: b[27],
    })
}

pub(super) fn decode_endpoint(p: &[u8]) -> Result<RdmaEndpoint, DecodeError> {
    exact(Opcode::RdmaConnect, p, ENDPOINT_LEN)?;
    get_endpoint(p)
}

pub(super) fn decode_accept(p: &[u8]) -> Result<RdmaAccept, DecodeError> {
    exact(Opcode::RdmaAccept, p, ACCEPT_LEN)?;
    let b = &p[ENDPOINT_LEN..];
    Ok(RdmaAccept {
        endpoint: get_endpoint(p)?,
        staging: RemoteBuffer {
            addr: u64_at(b, 0),
            rkey: u32_at(b, 8),
            pages: u32_at(b, 12),
        },
    })
}

/// Appends an RDMA_CONNECT.
pub fn encode_rdma_connect(buf: &mut Vec<u8>, request_id: u64, endpoint: &RdmaEndpoint) {
    let mut w = FrameWriter::begin(buf, Opcode::RdmaConnect, request_id);
    put_endpoint(w.payload(), endpoint);
    w.finish();
}

/// Appends an RDMA_ACCEPT.
pub fn encode_rdma_accept(buf: &mut Vec<u8>, request_id: u64, accept: &RdmaAccept) {
    let mut w = FrameWriter::begin(buf, Opcode::RdmaAccept, request_id);
    let p = w.payload();
    put_endpoint(p, &accept.endpoint);
    p.extend_from_slice(&accept.staging.addr.to_le_bytes());
    p.extend_from_slice(&accept.staging.rkey.to_le_bytes());
    p.extend_from_slice(&accept.staging.pages.to_le_bytes());
    w.finish();
}

/// Appends a PUT_STAGED.
pub fn encode_put_staged(buf: &mut Vec<u8>, request_id: u64, puts: &[StagedPut]) {
    let mut w = FrameWriter::begin(buf, Opcode::PutStaged, request_id);
    let p = w.payload();
    batch_prefix(p, puts.len());
    for e in puts {
        p.extend_from_slice(&e.handle.to_le_bytes());
        p.extend_from_slice(&e.crc.to_le_bytes());
        p.extend_from_slice(&e.index.to_le_bytes());
    }
    w.finish();
}

/// Appends a LOCATED.
pub fn encode_located(
    buf: &mut Vec<u8>,
    request_id: u64,
    locations: impl ExactSizeIterator<Item = Location>,
) {
    let mut w = FrameWriter::begin(buf, Opcode::Located, request_id);
    let p = w.payload();
    batch_prefix(p, locations.len());
    for l in locations {
        p.extend_from_slice(&[l.status as u8, 0, 0, 0]);
        p.extend_from_slice(&l.crc.to_le_bytes());
        p.extend_from_slice(&l.addr.to_le_bytes());
        p.extend_from_slice(&l.rkey.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
    }
    w.finish();
}

#[cfg(test)]
mod tests {
    use super::super::{Request, Response, split_frame};
    use super::*;

    fn one(buf: &[u8]) -> (super::super::FrameHeader, &[u8]) {
        let (h, p, rest) = split_frame(buf, 1 << 20).unwrap().unwrap();
        assert!(rest.is_empty());
        (h, p)
    }

    #[test]
    fn connect_and_accept_round_trip() {
        let endpoint = RdmaEndpoint {
            gid: [7; 16],
            qpn: 0x11,
            psn: 0xabcdef,
            lid: 3,
            mtu: 3,
            max_rd_atomic: 16,
        };
        let mut buf = Vec::new();
        encode_rdma_connect(&mut buf, 9, &endpoint);
        let (h, p) = one(&buf);
        match Request::decode(&h, p, 64).unwrap() {
            Request::RdmaConnect(e) => assert_eq!(e, endpoint),
            other => panic!("{other:?}"),
        }
        let accept = RdmaAccept {
            endpoint,
            staging: RemoteBuffer {
                addr: 0x7f00_0000_1000,
                rkey: 42,
                pages: 64,
            },
        };
        buf.clear();
        encode_rdma_accept(&mut buf, 9, &accept);
        let (h, p) = one(&buf);
        match Response::decode(&h, p, 64).unwrap() {
            Response::RdmaAccept(a) => assert_eq!(a, accept),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn staged_puts_and_locations_round_trip() {
        let puts = [
            StagedPut {
                handle: 5,
                crc: 6,
                index: 0,
            },
            StagedPut {
                handle: u64::MAX,
                crc: 1,
                index: 1,
            },
        ];
        let mut buf = Vec::new();
        encode_put_staged(&mut buf, 1, &puts);
        let (h, p) = one(&buf);
        match Request::decode(&h, p, 64).unwrap() {
            Request::PutStaged(s) => assert_eq!(s.iter().collect::<Vec<_>>(), puts),
            other => panic!("{other:?}"),
        }
        // Over the batch limit: refused before anything is read.
        assert!(matches!(
            Request::decode(&h, p, 1),
            Err(DecodeError::BatchTooLarge { count: 2, max: 1 })
        ));
        let locs = [
            Location {
                status: PageStatus::Ok,
                crc: 77,
                addr: 0x1000,
                rkey: 9,
            },
            Location::missing(PageStatus::NotFound),
        ];
        buf.clear();
        encode_located(&mut buf, 1, locs.iter().copied());
        let (h, p) = one(&buf);
        match Response::decode(&h, p, 64).unwrap() {
            Response::Located(l) => assert_eq!(l.iter().collect::<Vec<_>>(), locs),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_located_entries_are_refused() {
        let mut buf = Vec::new();
        encode_located(
            &mut buf,
            1,
            [Location::missing(PageStatus::NotFound)].into_iter(),
        );
        let mut bad_status = buf.clone();
        bad_status[16 + 8] = 99;
        let (h, p) = one(&bad_status);
        assert_eq!(
            Response::decode(&h, p, 64).unwrap_err(),
            DecodeError::BadStatus(99)
        );
        let mut reserved = buf.clone();
        reserved[16 + 8 + 21] = 1;
        let (h, p) = one(&reserved);
        assert_eq!(
            Response::decode(&h, p, 64).unwrap_err(),
            DecodeError::ReservedBits
        );
        // A connect of the wrong length.
        let mut short = Vec::new();
        encode_rdma_connect(&mut short, 1, &RdmaEndpoint::default());
        short.pop();
        short[0] -= 1;
        let (h, p) = one(&short);
        assert!(matches!(
            Request::decode(&h, p, 64),
            Err(DecodeError::Length { .. })
        ));
    }
}
