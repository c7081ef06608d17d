//! On-disk layout of a file-backed pool.
//!
//! ```text
//! offset 0                 superblock (one 4 KiB page)
//! offset 4096              slot table: one 32-byte entry per slot
//! offset data_offset       page data: one 4 KiB page per slot
//! ```
//!
//! A slot entry says which (tenant, handle) the slot holds, the global
//! sequence number of the PUT that wrote it, and the CRC32C of the data; the
//! entry carries its own checksum so a torn entry reads as empty. The store
//! writes a page's data before its entry and clears an entry before it reuses
//! the slot, so after any crash every live entry points at complete data. On
//! open, the newest entry (highest sequence) of a (tenant, handle) wins and
//! older duplicates are freed.
//!
//! Bytes 64..104 of the superblock page hold the [`ClusterView`]: which
//! cluster the stored pages belong to (the coordinator's identity and the
//! highest epoch seen), written on its own whenever it changes.
//!
//! The superblock's `clean` flag is set only by an orderly shutdown after a
//! full flush; when it is not set, the open verifies every live page against
//! its checksum and drops the ones that fail.

use rmem_proto::wire::PAGE_SIZE;

/// First bytes of a pool file.
pub const POOL_MAGIC: [u8; 8] = *b"RMEMPOOL";
/// Layout version written by this build.
pub const POOL_FORMAT: u32 = 1;
/// Bytes of one slot-table entry.
pub const ENTRY_LEN: usize = 32;
const ENTRY_LIVE: u32 = 0x4C49_5645; // "LIVE"

/// The pool file's first page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub slots: u32,
    pub server_id: u64,
    pub clean: bool,
}

impl Superblock {
    /// Where the page data starts for `slots` slots.
    pub fn data_offset(slots: u32) -> usize {
        let table = slots as usize * ENTRY_LEN;
        PAGE_SIZE + table.div_ceil(PAGE_SIZE) * PAGE_SIZE
    }

    /// Total file length for `slots` slots.
    pub fn file_len(slots: u32) -> usize {
        Self::data_offset(slots) + slots as usize * PAGE_SIZE
    }

    /// Encodes into the first bytes of `out`.
    pub fn encode(&self, out: &mut [u8]) {
        out[..64].fill(0);
        out[0..8].copy_from_slice(&POOL_MAGIC);
        out[8..12].copy_from_slice(&POOL_FORMAT.to_le_bytes());
        out[12..16].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        out[16..20].copy_from_slice(&self.slots.to_le_bytes());
        out[20..24].copy_from_slice(&u32::from(self.clean).to_le_bytes());
        out[24..32].copy_from_slice(&self.server_id.to_le_bytes());
        let crc = rmem_proto::wire::page_crc(&out[..32]);
        out[32..36].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes, or says what is wrong.
    pub fn decode(b: &[u8]) -> Result<Self, &'static str> {
        if b.len() < 36 || b[0..8] != POOL_MAGIC {
            return Err("not an rmem pool file (bad magic)");
        }
        let crc = u32::from_le_bytes(b[32..36].try_into().expect("4 bytes"));
        if rmem_proto::wire::page_crc(&b[..32]) != crc {
            return Err("pool superblock checksum mismatch");
        }
        let format = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if format != POOL_FORMAT {
            return Err("pool file format is not supported by this version");
        }
        let page = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
        if page as usize != PAGE_SIZE {
            return Err("pool file page size differs from this build's");
        }
        Ok(Self {
            slots: u32::from_le_bytes(b[16..20].try_into().expect("4 bytes")),
            clean: u32::from_le_bytes(b[20..24].try_into().expect("4 bytes")) == 1,
            server_id: u64::from_le_bytes(b[24..32].try_into().expect("8 bytes")),
        })
    }
}

/// Offset of the [`ClusterView`] in the superblock page.
pub const VIEW_OFFSET: usize = 64;
/// Bytes of an encoded [`ClusterView`].
pub const VIEW_LEN: usize = 40;
// The superblock's own bytes (0..64) and the view do not overlap, and the
// view is inside the superblock page.
const _: () = assert!(VIEW_OFFSET >= 64 && VIEW_OFFSET + VIEW_LEN <= PAGE_SIZE);
const VIEW_MAGIC: [u8; 8] = *b"RMEMCLST";

/// The cluster a server's pages belong to: the coordinator's identity
/// (`RegisterResponse.cluster_id`, 32 hex digits) and the highest epoch the
/// server saw from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterView {
    pub id: u128,
    pub epoch: u64,
}

impl ClusterView {
    /// Parses a coordinator's `cluster_id`.
    pub fn parse_id(s: &str) -> Option<u128> {
        (s.len() == 32)
            .then(|| u128::from_str_radix(s, 16).ok())
            .flatten()
    }

    pub fn encode(&self) -> [u8; VIEW_LEN] {
        let mut b = [0u8; VIEW_LEN];
        b[0..8].copy_from_slice(&VIEW_MAGIC);
        b[8..24].copy_from_slice(&self.id.to_le_bytes());
        b[24..32].copy_from_slice(&self.epoch.to_le_bytes());
        let crc = rmem_proto::wire::page_crc(&b[..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `None` when no view was ever written (or it is damaged: then the
    /// server treats its pages as it does a pool file from before views).
    pub fn decode(b: &[u8; VIEW_LEN]) -> Option<Self> {
        if b[0..8] != VIEW_MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[32..36].try_into().expect("4 bytes"));
        if rmem_proto::wire::page_crc(&b[..32]) != crc {
            return None;
        }
        Some(Self {
            id: u128::from_le_bytes(b[8..24].try_into().expect("16 bytes")),
            epoch: u64::from_le_bytes(b[24..32].try_into().expect("8 bytes")),
        })
    }
}

impl std::fmt::Display for ClusterView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x} (epoch {})", self.id, self.epoch)
    }
}

/// A live slot-table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotEntry {
    pub tenant: u32,
    pub handle: u64,
    pub seq: u64,
    pub crc: u32,
}

impl SlotEntry {
    /// Encodes a live entry.
    pub fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut b = [0u8; ENTRY_LEN];
        b[0..4].copy_from_slice(&ENTRY_LIVE.to_le_bytes());
        b[4..8].copy_from_slice(&self.tenant.to_le_bytes());
        b[8..16].copy_from_slice(&self.handle.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..28].copy_from_slice(&self.crc.to_le_bytes());
        let check = rmem_proto::wire::page_crc(&b[..28]);
        b[28..32].copy_from_slice(&check.to_le_bytes());
        b
    }

    /// Decodes an entry; `None` for an empty or torn one.
    pub fn decode(b: &[u8; ENTRY_LEN]) -> Option<Self> {
        if b[0..4] != ENTRY_LIVE.to_le_bytes() {
            return None;
        }
        let check = u32::from_le_bytes(b[28..32].try_into().expect("4 bytes"));
        if rmem_proto::wire::page_crc(&b[..28]) != check {
            return None;
        }
        Some(Self {
            tenant: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            handle: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            seq: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
            crc: u32::from_le_bytes(b[24..28].try_into().expect("4 bytes")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trip_and_corruption() {
        let sb = Superblock {
            slots: 1234,
            server_id: 99,
            clean: true,
        };
        let mut page = [0u8; PAGE_SIZE];
        sb.encode(&mut page);
        assert_eq!(Superblock::decode(&page), Ok(sb));
        page[17] ^= 1;
        assert!(Superblock::decode(&page).is_err());
        assert!(Superblock::decode(&[0u8; 64]).is_err());
    }

    #[test]
    fn cluster_view_round_trip_and_damage() {
        let v = ClusterView {
            id: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            epoch: 9,
        };
        let mut b = v.encode();
        assert_eq!(ClusterView::decode(&b), Some(v));
        assert_eq!(
            ClusterView::parse_id("0123456789abcdef0011223344556677"),
            Some(v.id)
        );
        assert_eq!(ClusterView::parse_id("12"), None);
        assert_eq!(
            ClusterView::parse_id("0123456789abcdef001122334455667z"),
            None
        );
        b[30] ^= 1;
        assert_eq!(ClusterView::decode(&b), None);
        assert_eq!(ClusterView::decode(&[0u8; VIEW_LEN]), None);
    }

    #[test]
    fn entry_round_trip_and_torn_entry() {
        let e = SlotEntry {
            tenant: 3,
            handle: u64::MAX - 1,
            seq: 77,
            crc: 0xabcd,
        };
        let mut b = e.encode();
        assert_eq!(SlotEntry::decode(&b), Some(e));
        b[10] ^= 0x40;
        assert_eq!(SlotEntry::decode(&b), None);
        assert_eq!(SlotEntry::decode(&[0u8; ENTRY_LEN]), None);
    }

    #[test]
    fn data_is_page_aligned() {
        for slots in [1, 127, 128, 129, 1 << 20] {
            assert_eq!(Superblock::data_offset(slots) % PAGE_SIZE, 0);
            assert!(Superblock::data_offset(slots) >= PAGE_SIZE + slots as usize * ENTRY_LEN);
        }
    }
}
