//! The page pool: one memory mapping, anonymous or backed by a file, divided
//! into 4 KiB slots (and, for a file, the superblock and slot table of
//! [`super::layout`]).
//!
//! This is the only module that touches the mapping through raw pointers.
//! Its contract with [`super::Store`]: a slot is written only by the one
//! holder that allocated it and has not yet published it in the index, and
//! it is read only while it is published (the reader holds the index entry's
//! lock, so it cannot be unpublished and reused meanwhile).
//!
//! It also hands out raw addresses of page data for RDMA
//! ([`Pool::extent_memory`], [`Pool::slot_addr`]): they stay valid for as
//! long as the pool lives, and what the network card reads there follows
//! the same rules (the transport checks the page's CRC on arrival).

use std::fs::OpenOptions;
use std::io;
use std::path::Path;

use memmap2::{MmapOptions, MmapRaw};
use rmem_proto::wire::{PAGE_SIZE, Page};

use super::extent::{EXTENT_PAGES, extent_len};
use super::layout::{ClusterView, ENTRY_LEN, Superblock, VIEW_LEN, VIEW_OFFSET};

/// What a freed slot is filled with (not zero: a zero page is a real page).
pub const POISON: u8 = 0xA5;

/// A mapped page pool.
#[derive(Debug)]
pub struct Pool {
    map: MmapRaw,
    slots: u32,
    /// 0 for an anonymous pool, which has no superblock or slot table.
    data_offset: usize,
    persistent: bool,
}

/// A pool file opened by [`Pool::open_file`].
#[derive(Debug)]
pub struct OpenedFile {
    pub pool: Pool,
    pub superblock: Superblock,
    pub created: bool,
}

impl Pool {
    /// An anonymous pool of `slots` pages, committed lazily by the kernel,
    /// or all at once when `prefault` (no page fault and zeroing on a
    /// slot's first PUT, and the memory is the server's from the start).
    pub fn anonymous(slots: u32, prefault: bool) -> io::Result<Self> {
        let len = slots as usize * PAGE_SIZE;
        let mut opts = MmapOptions::new();
        opts.len(len.max(PAGE_SIZE));
        if prefault {
            opts.populate();
        }
        let map = opts.map_anon()?;
        Ok(Self {
            map: MmapRaw::from(map),
            slots,
            data_offset: 0,
            persistent: false,
        })
    }

    /// Opens or creates a pool file. A new file gets `slots` slots and a
    /// fresh superblock; an existing one keeps its own slot count.
    pub fn open_file(path: &Path, slots: u32, new_server_id: u64) -> io::Result<OpenedFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let existing = file.metadata()?.len();
        let created = existing == 0;
        let superblock = if created {
            file.set_len(Superblock::file_len(slots) as u64)?;
            Superblock {
                slots,
                server_id: new_server_id,
                clean: true,
            }
        } else {
            let mut head = [0u8; 64];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut head, 0)?;
            let sb = Superblock::decode(&head)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let want = Superblock::file_len(sb.slots) as u64;
            if existing < want {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("pool file is {existing} bytes, its superblock needs {want}"),
                ));
            }
            sb
        };
        let map = MmapOptions::new()
            .len(Superblock::file_len(superblock.slots))
            .map_raw(&file)?;
        let pool = Self {
            map,
            slots: superblock.slots,
            data_offset: Superblock::data_offset(superblock.slots),
            persistent: true,
        };
        if created {
            pool.write_superblock(&superblock)?;
        }
        Ok(OpenedFile {
            pool,
            superblock,
            created,
        })
    }

    /// Number of page slots.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Whether pages survive a restart.
    pub fn persistent(&self) -> bool {
        self.persistent
    }

    fn page_ptr(&self, slot: u32) -> *mut u8 {
        assert!(slot < self.slots, "slot {slot} out of range");
        // SAFETY: slot < slots, and the mapping holds data_offset + slots
        // pages, so the offset stays inside the mapping.
        unsafe {
            self.map
                .as_mut_ptr()
                .add(self.data_offset + slot as usize * PAGE_SIZE)
        }
    }

    /// Start and length in bytes of `extent`'s page data: its slots are
    /// contiguous in the mapping, so this is one range to register as an
    /// RDMA memory region. The pointer stays valid while the pool lives;
    /// the pool itself never dereferences it.
    ///
    /// # Panics
    /// If `extent` holds no slot of this pool.
    pub fn extent_memory(&self, extent: u32) -> (*mut u8, usize) {
        let len = extent_len(self.slots, extent);
        assert!(len > 0, "extent {extent} out of range");
        let first = extent * EXTENT_PAGES;
        (self.page_ptr(first), len as usize * PAGE_SIZE)
    }

    /// Address of `slot`'s data as an integer (the remote address of an
    /// RDMA READ; it carries no provenance and is never dereferenced here).
    ///
    /// # Panics
    /// If `slot` is out of range.
    pub fn slot_addr(&self, slot: u32) -> u64 {
        self.page_ptr(slot).addr() as u64
    }

    fn entry_ptr(&self, slot: u32) -> *mut u8 {
        assert!(
            self.persistent && slot < self.slots,
            "no entry for slot {slot}"
        );
        // SAFETY: the slot table starts at PAGE_SIZE and holds `slots`
        // entries of ENTRY_LEN bytes, all inside the mapping.
        unsafe {
            self.map
                .as_mut_ptr()
                .add(PAGE_SIZE + slot as usize * ENTRY_LEN)
        }
    }

    /// Copies `data` into `slot`.
    ///
    /// # Safety
    /// The caller owns `slot` exclusively: it allocated it and has not
    /// published it, so nobody reads or writes it concurrently.
    pub unsafe fn write_page(&self, slot: u32, data: &Page) {
        let dst = self.page_ptr(slot);
        // SAFETY: dst points at PAGE_SIZE bytes of the mapping that only this
        // caller accesses (the function's contract); data cannot overlap the
        // mapping's private slot because it is a different, live page.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, PAGE_SIZE) };
    }

    /// Overwrites `slot` with [`POISON`] bytes, so its old contents can
    /// never be read again: not by another tenant whose extent it later
    /// joins, and not by a one-sided reader holding a stale location (the
    /// bytes fail any real page's checksum).
    ///
    /// # Safety
    /// As for [`Pool::write_page`]: the caller owns the unpublished slot.
    /// (A remote RDMA READ through a stale location may still read it
    /// meanwhile; it checks the checksum and discards what it read.)
    pub unsafe fn poison(&self, slot: u32) {
        let dst = self.page_ptr(slot);
        // SAFETY: dst points at PAGE_SIZE bytes of the mapping owned by the
        // caller (the function's contract).
        unsafe { std::ptr::write_bytes(dst, POISON, PAGE_SIZE) };
    }

    /// Copies `slot` into `out`.
    ///
    /// # Safety
    /// `slot` is published and the caller holds the index lock that keeps it
    /// published, so no writer touches it concurrently.
    pub unsafe fn read_page(&self, slot: u32, out: &mut Page) {
        let src = self.page_ptr(slot);
        // SAFETY: src points at PAGE_SIZE readable bytes that nobody writes
        // concurrently (the function's contract); out is a distinct buffer.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), PAGE_SIZE) };
    }

    /// Borrows `slot` for reading.
    ///
    /// # Safety
    /// As for [`Pool::read_page`], for as long as the returned borrow lives.
    pub unsafe fn page(&self, slot: u32) -> &Page {
        let src = self.page_ptr(slot);
        // SAFETY: src is aligned for u8, points at PAGE_SIZE bytes inside the
        // mapping, and is not written while the borrow lives (contract).
        unsafe { &*src.cast::<Page>() }
    }

    /// Writes `slot`'s table entry.
    ///
    /// # Safety
    /// The caller owns `slot` exclusively (as for [`Pool::write_page`]), or
    /// is clearing the entry of a slot it just unpublished.
    pub unsafe fn write_entry(&self, slot: u32, entry: &[u8; ENTRY_LEN]) {
        let dst = self.entry_ptr(slot);
        // SAFETY: dst points at this slot's ENTRY_LEN bytes, which only the
        // slot's owner writes (contract).
        unsafe { std::ptr::copy_nonoverlapping(entry.as_ptr(), dst, ENTRY_LEN) };
    }

    /// Reads `slot`'s table entry.
    ///
    /// # Safety
    /// Nobody writes the entry concurrently (used while opening the pool).
    pub unsafe fn read_entry(&self, slot: u32) -> [u8; ENTRY_LEN] {
        let mut out = [0u8; ENTRY_LEN];
        let src = self.entry_ptr(slot);
        // SAFETY: src points at ENTRY_LEN bytes inside the mapping that are
        // not written concurrently (contract).
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), ENTRY_LEN) };
        out
    }

    /// Rewrites the superblock and flushes it to the file.
    pub fn write_superblock(&self, sb: &Superblock) -> io::Result<()> {
        let mut page = [0u8; 64];
        sb.encode(&mut page);
        // SAFETY: the superblock occupies the first bytes of a persistent
        // mapping; only open and shutdown (one thread, no traffic) write it.
        unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), self.map.as_mut_ptr(), page.len()) };
        self.map.flush_range(0, PAGE_SIZE)
    }

    /// The cluster view stored in the superblock page, if any.
    pub fn read_view(&self) -> Option<ClusterView> {
        if !self.persistent {
            return None;
        }
        let mut b = [0u8; VIEW_LEN];
        // The view's bytes lie inside the superblock page of a persistent
        // mapping.
        let src = self.map.as_ptr().wrapping_add(VIEW_OFFSET);
        // SAFETY: `src` points at VIEW_LEN mapped bytes; only `write_view`
        // writes them, and the store serializes its calls with reads under
        // one lock.
        unsafe { std::ptr::copy_nonoverlapping(src, b.as_mut_ptr(), VIEW_LEN) };
        ClusterView::decode(&b)
    }

    /// Writes the cluster view and flushes it (no-op for an anonymous pool).
    pub fn write_view(&self, view: &ClusterView) -> io::Result<()> {
        if !self.persistent {
            return Ok(());
        }
        let b = view.encode();
        let dst = self.map.as_mut_ptr().wrapping_add(VIEW_OFFSET);
        // SAFETY: as in `read_view`; the superblock's own bytes (0..64) are
        // not touched.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), dst, VIEW_LEN) };
        self.map.flush_range(0, PAGE_SIZE)
    }

    /// Flushes everything to the file (no-op for an anonymous pool).
    pub fn flush(&self) -> io::Result<()> {
        if self.persistent {
            self.map.flush()
        } else {
            Ok(())
        }
    }

    /// Flushes one slot's data and table entry to the file.
    pub fn flush_slot(&self, slot: u32) -> io::Result<()> {
        if !self.persistent {
            return Ok(());
        }
        let entry_page = (PAGE_SIZE + slot as usize * ENTRY_LEN) / PAGE_SIZE * PAGE_SIZE;
        self.map.flush_range(entry_page, PAGE_SIZE)?;
        self.map
            .flush_range(self.data_offset + slot as usize * PAGE_SIZE, PAGE_SIZE)
    }
}
