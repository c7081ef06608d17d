//! Sealed pages, for memory servers that are not trusted with them.
//!
//! With sealing on, a store encrypts and authenticates every page before it
//! leaves the node (AES-256-GCM, through ring, the crypto rustls already
//! links here) and checks every page that comes back. A server, or anyone
//! who reads its pool file or its RDMA memory, sees no plaintext, and a page
//! it alters, moves to another handle or replaces comes back as a missing
//! copy (another copy is read, or the page is rebuilt from its stripe),
//! never as wrong bytes.
//!
//! - **Key**: each store (handle space) draws its own 256-bit key, kept in
//!   this process only. Two stores never share a key, so handle epochs that
//!   repeat across stores or runs never repeat a (key, nonce) pair.
//! - **Nonce**: the handle. A handle names one stored copy and is written
//!   once: a retried PUT, a drain's move and a stripe's rebuild all write
//!   the same plaintext again, so the same (key, nonce) only ever seals the
//!   same bytes to the same ciphertext. [`Seal::seal`] checks that: a
//!   different tag for a handle already sealed is refused before anything is
//!   sent.
//! - **Associated data**: the handle (it is the page's version, as handles
//!   are never rewritten) under a domain label.
//! - **Tags** stay here, 16 bytes per stored handle (a page slot on a server
//!   is one page, with no room for them), and leave when the handle is freed.
//! - **The kernel agent's** pages outlive it (the module keeps them across
//!   agent restarts), so its key and tags must too: each space's are
//!   written to a file of their own in a directory beside the admin socket
//!   (tmpfs, 0700, gone at reboot with the module's pages): a header with
//!   the key, then a record per sealed handle, appended once per batch
//!   before the batch is sent, and rewritten from the live tags when
//!   records of freed handles pile up. A restarted agent loads the files
//!   of the spaces whose pages the module still holds; a space with no
//!   file was not sealed and its pages pass as they are.

use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use ring::rand::{SecureRandom as _, SystemRandom};
use rmem_client::Page;

use super::space::{SPACE_BITS, replace_file};

/// Bytes of a tag.
pub const TAG_LEN: usize = 16;

/// Domain label of the associated data, so a sealed page can never pass
/// for anything else sealed with the same key.
const LABEL: &[u8; 12] = b"rmem-page-v1";

/// Why a page could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// A second, different plaintext under a handle already sealed: sealing
    /// it would reuse a nonce. Nothing was sent.
    #[error("page {0:#x} was sealed before with other contents: refusing to reuse its nonce")]
    Rewritten(u64),
    /// No tag is known for the handle (never sealed here, or freed).
    #[error("page {0:#x} has no seal here")]
    Unknown(u64),
    /// The page or its handle was altered.
    #[error("page {0:#x} failed its seal: altered, or another page's")]
    Forged(u64),
    /// The tags could not be recorded (the kernel agent's file): the batch
    /// was not sent.
    #[error("cannot record the seals of a batch in {0}")]
    Log(String),
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct SealStats {
    pub sealed: AtomicU64,
    pub opened: AtomicU64,
    /// Pages that came back altered, or with no tag here.
    pub refused: AtomicU64,
}

/// How a handle space's pages are kept.
enum Space {
    Sealed(Box<LessSafeKey>),
    /// An earlier kernel-agent run's space that was not sealed: its pages
    /// pass as they are.
    Plain,
}

/// A store's keys (its own space's, and the kernel agent's earlier runs')
/// and the tags of its stored pages.
pub struct Seal {
    /// By space base.
    spaces: Vec<(u64, Space)>,
    tags: DashMap<u64, [u8; TAG_LEN]>,
    /// The kernel agent's record of its own space's key and tags.
    log: Option<Mutex<Log>>,
    pub stats: SealStats,
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seal")
            .field("tags", &self.tags.len())
            .finish_non_exhaustive()
    }
}

fn nonce(handle: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&handle.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aad(handle: u64) -> [u8; 20] {
    let mut a = [0u8; 20];
    a[..12].copy_from_slice(LABEL);
    a[12..].copy_from_slice(&handle.to_le_bytes());
    a
}

fn random_key() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random source");
    bytes
}

fn key(bytes: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("a 256-bit key"))
}

fn base_of(handle: u64) -> u64 {
    handle >> SPACE_BITS << SPACE_BITS
}

impl Seal {
    /// A new random key for the space at `base`, kept in this process
    /// only, with no page sealed yet.
    pub fn generate(base: u64) -> Self {
        Self {
            spaces: vec![(base, Space::Sealed(Box::new(key(&random_key()))))],
            tags: DashMap::new(),
            log: None,
            stats: SealStats::default(),
        }
    }

    /// The kernel agent's seal, kept in `dir`: a new key for its space at
    /// `base` when `seal`, and the keys and tags of the `older` spaces
    /// whose pages the module still holds (a space with no file there was
    /// not sealed). Files of other spaces are garbage and deleted. `None`
    /// when nothing is sealed.
    pub fn for_kernel(
        dir: &Path,
        base: u64,
        seal: bool,
        older: &[u64],
    ) -> io::Result<Option<Self>> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let tags = DashMap::new();
        let mut spaces = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let Some(b) = Log::base_of_file(&path) else {
                continue;
            };
            if !older.contains(&b) {
                std::fs::remove_file(&path)?;
            }
        }
        for &b in older {
            match Log::load(&Log::file(dir, b), b, &tags)? {
                Some(k) => spaces.push((b, Space::Sealed(Box::new(key(&k))))),
                None => spaces.push((b, Space::Plain)),
            }
        }
        let log = if seal {
            let k = random_key();
            let log = Log::create(dir, base, &k)?;
            spaces.insert(0, (base, Space::Sealed(Box::new(key(&k)))));
            Some(Mutex::new(log))
        } else {
            spaces.insert(0, (base, Space::Plain));
            None
        };
        if spaces.iter().all(|(_, s)| matches!(s, Space::Plain)) {
            return Ok(None);
        }
        Ok(Some(Self {
            spaces,
            tags,
            log,
            stats: SealStats::default(),
        }))
    }

    fn space(&self, handle: u64) -> Option<&Space> {
        let base = base_of(handle);
        self.spaces.iter().find(|(b, _)| *b == base).map(|(_, s)| s)
    }

    /// Seals a batch into `out` (one page each), and, for the kernel
    /// agent, records the new tags before returning (so before the batch
    /// is sent).
    pub fn seal_batch(&self, pages: &[(u64, &Page)], out: &mut [Page]) -> Result<(), SealError> {
        assert!(out.len() >= pages.len(), "a sealed page for every page");
        let mut new = Vec::new();
        for (&(h, p), o) in pages.iter().zip(out.iter_mut()) {
            if let Some(tag) = self.seal_one(h, p, o)? {
                new.push((h, tag));
            }
        }
        if let (Some(log), false) = (&self.log, new.is_empty()) {
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = log.append(&new, &self.tags) {
                // Not recorded: as if never sealed (they are never sent).
                for (h, _) in &new {
                    self.tags.remove(h);
                }
                return Err(SealError::Log(format!("{}: {e}", log.path.display())));
            }
        }
        Ok(())
    }

    /// Encrypts `page` (stored under `handle`) into `out` and keeps its tag.
    pub fn seal(&self, handle: u64, page: &Page, out: &mut Page) -> Result<(), SealError> {
        self.seal_batch(&[(handle, page)], std::slice::from_mut(out))
    }

    /// Seals one page; its tag if it is new.
    fn seal_one(
        &self,
        handle: u64,
        page: &Page,
        out: &mut Page,
    ) -> Result<Option<[u8; TAG_LEN]>, SealError> {
        out.copy_from_slice(page);
        let key = match self.space(handle) {
            Some(Space::Sealed(k)) => k,
            Some(Space::Plain) => return Ok(None),
            None => {
                out.fill(0);
                return Err(SealError::Unknown(handle));
            }
        };
        let tag = key
            .seal_in_place_separate_tag(nonce(handle), Aad::from(aad(handle)), &mut out[..])
            .expect("a page is far below AES-GCM's length limit");
        let tag: [u8; TAG_LEN] = tag.as_ref().try_into().expect("a 16-byte tag");
        let new = match self.tags.entry(handle) {
            dashmap::mapref::entry::Entry::Occupied(e) if *e.get() != tag => {
                // `out` holds the new ciphertext: wipe it, it must not leave.
                out.fill(0);
                return Err(SealError::Rewritten(handle));
            }
            dashmap::mapref::entry::Entry::Occupied(_) => None,
            dashmap::mapref::entry::Entry::Vacant(e) => {
                e.insert(tag);
                Some(tag)
            }
        };
        self.stats.sealed.fetch_add(1, Ordering::Relaxed);
        Ok(new)
    }

    /// Checks and decrypts, in place, the page a server returned for
    /// `handle`. On failure the page is zeroed: its bytes must not be used.
    pub fn open(&self, handle: u64, page: &mut Page) -> Result<(), SealError> {
        let key = match self.space(handle) {
            Some(Space::Sealed(k)) => k,
            Some(Space::Plain) => return Ok(()),
            None => {
                page.fill(0);
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                return Err(SealError::Unknown(handle));
            }
        };
        let Some(tag) = self.tags.get(&handle).map(|t| *t) else {
            page.fill(0);
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(SealError::Unknown(handle));
        };
        let opened = key.open_in_place_separate_tag(
            nonce(handle),
            Aad::from(aad(handle)),
            Tag::from(tag),
            &mut page[..],
            0..,
        );
        if opened.is_err() {
            page.fill(0);
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(SealError::Forged(handle));
        }
        self.stats.opened.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Drops the tags of freed handles.
    pub fn forget(&self, handles: impl IntoIterator<Item = u64>) {
        for h in handles {
            self.tags.remove(&h);
        }
    }

    /// Handles with a tag here.
    pub fn len(&self) -> usize {
        self.tags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }
}

/// Magic of a kernel agent's seal file.
const LOG_MAGIC: &[u8; 8] = b"RMEMSEAL";
/// Header: magic, space base, key.
const LOG_HEADER: usize = 8 + 8 + 32;
/// A record: handle, tag.
const LOG_RECORD: usize = 8 + TAG_LEN;
/// Records of freed handles tolerated before the file is rewritten from
/// the live tags (besides as many as are live).
const LOG_SLACK: u64 = 1 << 16;

/// A kernel agent's record of one space's key and tags.
struct Log {
    path: PathBuf,
    base: u64,
    key: [u8; 32],
    file: std::fs::File,
    /// Records in the file.
    records: u64,
}

impl Log {
    fn file(dir: &Path, base: u64) -> PathBuf {
        dir.join(format!("{:06x}.seal", base >> SPACE_BITS))
    }

    fn base_of_file(path: &Path) -> Option<u64> {
        let name = path.file_name()?.to_str()?;
        let epoch = u64::from_str_radix(name.strip_suffix(".seal")?, 16).ok()?;
        (epoch < 1 << (64 - SPACE_BITS)).then_some(epoch << SPACE_BITS)
    }

    fn header(base: u64, key: &[u8; 32]) -> [u8; LOG_HEADER] {
        let mut h = [0u8; LOG_HEADER];
        h[..8].copy_from_slice(LOG_MAGIC);
        h[8..16].copy_from_slice(&base.to_le_bytes());
        h[16..].copy_from_slice(key);
        h
    }

    fn write_new(path: &Path, bytes: &[u8]) -> io::Result<std::fs::File> {
        replace_file(path, bytes)?;
        std::fs::OpenOptions::new().append(true).open(path)
    }

    fn create(dir: &Path, base: u64, key: &[u8; 32]) -> io::Result<Self> {
        let path = Self::file(dir, base);
        let file = Self::write_new(&path, &Self::header(base, key))?;
        Ok(Self {
            path,
            base,
            key: *key,
            file,
            records: 0,
        })
    }

    /// The key of the space at `base` and its tags (into `tags`), or
    /// `None` when it has no file (it was not sealed). A torn last record
    /// is ignored (its batch was never sent).
    fn load(
        path: &Path,
        base: u64,
        tags: &DashMap<u64, [u8; TAG_LEN]>,
    ) -> io::Result<Option<[u8; 32]>> {
        let mut bytes = Vec::new();
        match std::fs::File::open(path) {
            Ok(mut f) => f.read_to_end(&mut bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {why}", path.display()),
            )
        };
        if bytes.len() < LOG_HEADER || &bytes[..8] != LOG_MAGIC {
            return Err(bad("not a seal file"));
        }
        if bytes[8..16] != base.to_le_bytes() {
            return Err(bad("the seal file of another space"));
        }
        let key: [u8; 32] = bytes[16..LOG_HEADER].try_into().expect("32 bytes");
        for r in bytes[LOG_HEADER..].chunks_exact(LOG_RECORD) {
            let h = u64::from_le_bytes(r[..8].try_into().expect("8 bytes"));
            if base_of(h) != base {
                return Err(bad("a record of another space"));
            }
            tags.insert(h, r[8..].try_into().expect("16 bytes"));
        }
        Ok(Some(key))
    }

    /// Appends `new` records (one write); when the file holds too many
    /// records of freed handles, rewrites it from the live `tags` first.
    fn append(
        &mut self,
        new: &[(u64, [u8; TAG_LEN])],
        tags: &DashMap<u64, [u8; TAG_LEN]>,
    ) -> io::Result<()> {
        let live = tags.len() as u64;
        if self.records > 2 * live + LOG_SLACK {
            let mut bytes = Self::header(self.base, &self.key).to_vec();
            let mut records = 0;
            for t in tags.iter() {
                if base_of(*t.key()) == self.base {
                    bytes.extend_from_slice(&t.key().to_le_bytes());
                    bytes.extend_from_slice(t.value());
                    records += 1;
                }
            }
            // `new` are among the live tags already.
            self.file = Self::write_new(&self.path, &bytes)?;
            self.records = records;
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(new.len() * LOG_RECORD);
        for (h, tag) in new {
            bytes.extend_from_slice(&h.to_le_bytes());
            bytes.extend_from_slice(tag);
        }
        self.file.write_all(&bytes)?;
        self.records += new.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Page {
        let mut p = [0u8; rmem_client::PAGE_SIZE];
        for (i, x) in p.iter_mut().enumerate() {
            *x = b ^ (i as u8);
        }
        p
    }

    #[test]
    fn a_sealed_page_hides_its_bytes_and_opens_back() {
        let s = Seal::generate(0);
        let plain = page(7);
        let mut out = [0u8; rmem_client::PAGE_SIZE];
        s.seal(42, &plain, &mut out).unwrap();
        assert_ne!(out, plain);
        // The same bytes under the same handle: the same ciphertext (a
        // retried PUT or a drain's move), accepted.
        let mut again = [0u8; rmem_client::PAGE_SIZE];
        s.seal(42, &plain, &mut again).unwrap();
        assert_eq!(again, out);
        s.open(42, &mut out).unwrap();
        assert_eq!(out, plain);
        assert_eq!(s.stats.opened.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn altered_moved_or_unknown_pages_are_refused() {
        let s = Seal::generate(0);
        let mut a = [0u8; rmem_client::PAGE_SIZE];
        let mut b = [0u8; rmem_client::PAGE_SIZE];
        s.seal(1, &page(1), &mut a).unwrap();
        s.seal(2, &page(2), &mut b).unwrap();
        // One bit flipped.
        let mut flipped = a;
        flipped[100] ^= 1;
        assert_eq!(s.open(1, &mut flipped), Err(SealError::Forged(1)));
        assert_eq!(
            flipped,
            [0u8; rmem_client::PAGE_SIZE],
            "no altered byte is left"
        );
        // Another handle's (valid) page in this handle's place.
        let mut swapped = b;
        assert_eq!(s.open(1, &mut swapped), Err(SealError::Forged(1)));
        // Another store's key.
        let other = Seal::generate(0);
        let mut c = [0u8; rmem_client::PAGE_SIZE];
        other.seal(1, &page(1), &mut c).unwrap();
        assert_eq!(s.open(1, &mut c), Err(SealError::Forged(1)));
        // Freed: no tag, refused.
        s.forget([2]);
        assert_eq!(s.open(2, &mut b), Err(SealError::Unknown(2)));
        assert_eq!(s.stats.refused.load(Ordering::Relaxed), 4);
        // The genuine page still opens.
        s.open(1, &mut a).unwrap();
        assert_eq!(a, page(1));
    }

    #[test]
    fn a_kernel_agents_seals_outlive_it_while_the_module_holds_pages() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().join("seal");
        let (one, two, three) = (1u64 << SPACE_BITS, 2u64 << SPACE_BITS, 3u64 << SPACE_BITS);
        // Run one seals two pages.
        let s1 = Seal::for_kernel(&dir, one, true, &[])
            .unwrap()
            .expect("sealed");
        let mut a = [0u8; rmem_client::PAGE_SIZE];
        let mut b = [0u8; rmem_client::PAGE_SIZE];
        let mut out = vec![[0u8; rmem_client::PAGE_SIZE]; 2];
        s1.seal_batch(&[(one + 1, &page(1)), (one + 2, &page(2))], &mut out)
            .unwrap();
        a.copy_from_slice(&out[0]);
        b.copy_from_slice(&out[1]);
        drop(s1);
        // Run two, unsealed, while the module holds run one's pages: it
        // opens them; its own pages pass as they are.
        let s2 = Seal::for_kernel(&dir, two, false, &[one])
            .unwrap()
            .expect("run one's seals");
        let mut x = a;
        s2.open(one + 1, &mut x).unwrap();
        assert_eq!(x, page(1));
        let mut plain = page(5);
        s2.open(two + 7, &mut plain).unwrap();
        assert_eq!(plain, page(5));
        // A handle of no space it knows is refused.
        let mut stray = b;
        assert_eq!(
            s2.open(three + 1, &mut stray),
            Err(SealError::Unknown(three + 1))
        );
        drop(s2);
        // Run three, sealed, keeps run one's (two's had no file).
        let s3 = Seal::for_kernel(&dir, three, true, &[one, two])
            .unwrap()
            .expect("sealed");
        let mut y = b;
        s3.open(one + 2, &mut y).unwrap();
        assert_eq!(y, page(2));
        // Swapped between handles: refused.
        let mut swapped = a;
        assert_eq!(
            s3.open(one + 2, &mut swapped),
            Err(SealError::Forged(one + 2))
        );
        drop(s3);
        // The module emptied: every file is garbage.
        assert!(Seal::for_kernel(&dir, two, false, &[]).unwrap().is_none());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    }

    #[test]
    fn a_seal_file_is_rewritten_from_the_live_tags() {
        let dir = tempfile::tempdir().unwrap();
        let base = 5u64 << SPACE_BITS;
        let s = Seal::for_kernel(dir.path(), base, true, &[])
            .unwrap()
            .unwrap();
        let mut out = vec![[0u8; rmem_client::PAGE_SIZE]; 64];
        let plain = page(3);
        let batch = |first: u64| -> Vec<(u64, &Page)> {
            (first..first + 64).map(|h| (h, &plain)).collect()
        };
        // Seal and free far more than the slack: the file stays small.
        let rounds = 2 * LOG_SLACK / 64 + 4;
        for r in 0..rounds {
            let first = base + r * 64;
            s.seal_batch(&batch(first), &mut out).unwrap();
            if r + 1 < rounds {
                s.forget(first..first + 64);
            }
        }
        let file = Log::file(dir.path(), base);
        let len = std::fs::metadata(&file).unwrap().len() as usize;
        assert!(
            len < LOG_HEADER + (LOG_SLACK as usize + 1024) * LOG_RECORD,
            "the file kept freed records: {len} bytes"
        );
        // The live ones are all there for the next run.
        drop(s);
        let again = Seal::for_kernel(dir.path(), base + (1 << SPACE_BITS), false, &[base])
            .unwrap()
            .unwrap();
        let last = base + (rounds - 1) * 64;
        assert!(again.tags.contains_key(&last) && again.tags.contains_key(&(last + 63)));
    }

    #[test]
    fn other_bytes_under_a_sealed_handle_are_refused_and_never_leave() {
        let s = Seal::generate(0);
        let mut out = [0u8; rmem_client::PAGE_SIZE];
        s.seal(9, &page(1), &mut out).unwrap();
        let mut second = [0u8; rmem_client::PAGE_SIZE];
        assert_eq!(
            s.seal(9, &page(2), &mut second),
            Err(SealError::Rewritten(9))
        );
        assert_eq!(second, [0u8; rmem_client::PAGE_SIZE]);
        // The first seal still stands.
        s.open(9, &mut out).unwrap();
        assert_eq!(out, page(1));
    }
}
