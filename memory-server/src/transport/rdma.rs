//! The RDMA data plane, server side.
//!
//! A client sets up a reliable-connected queue pair over its authenticated
//! TCP connection (RDMA_CONNECT); the queue pair lives as long as that TCP
//! session. The server never posts work on the data path: clients READ
//! pages straight from the pool and WRITE pages into their connection's
//! staging buffer, then commit them with PUT_STAGED over TCP, where the
//! page's checksum is checked and the page stored like a TCP PUT.
//!
//! Isolation: one protection domain per **holder** (a tenant, or an agent
//! within its tenant: `Store::holder`); a connection's queue pair is in
//! its holder's domain, and the pool is registered per holder **extent**
//! (the store gives each holder extents of its own, and an agent's PUTs
//! fill its own), so an rkey handed to one agent reaches only that agent's
//! pages, and a queue pair of another agent or tenant cannot use it at
//! all. LOCATE moves a page of the tenant's own extents (its pages from
//! before a restart) into the asking agent's, once the agent's capability
//! for it is checked, and answers address 0 (the client's cue to read over
//! TCP, where capabilities are checked too) for a page in another agent's
//! extent. An extent's
//! region is deregistered before the extent can change hands
//! ([`ExtentListener`]).
//!
//! Lock order: a region is registered inside [`Store::while_owned`] (the
//! holder's extent lock), then the `regions` shard lock is taken to
//! publish it; the store calls the listener, which takes the shard lock,
//! with the extent lock held or after it — never the other way round.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use rmem_proto::wire::{Location, PAGE_SIZE, PageStatus, RdmaAccept, RdmaEndpoint, RemoteBuffer};
use rmem_verbs::{Access, Buffer, Context, Mr, Pd, Qp, QpCaps, VerbsError};

use crate::store::{ExtentListener, Store, Tenant};

/// Pages in each connection's staging buffer: the most pages one
/// PUT_STAGED can commit.
pub const STAGING_PAGES: u32 = 64;

/// Why RDMA could not be set up for a connection.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    #[error("cannot open an RDMA device for {ip}")]
    Device {
        ip: IpAddr,
        #[source]
        source: VerbsError,
    },
    #[error("RDMA device {device} does not have address {ip} (the server uses one device)")]
    OtherAddress { device: String, ip: IpAddr },
    #[error("cannot set up the queue pair")]
    QueuePair(#[source] VerbsError),
    #[error("the store already has an RDMA server")]
    Listener(#[source] crate::store::StoreError),
}

/// RDMA state shared by every connection of a server.
#[derive(Debug)]
pub struct RdmaServer {
    // Field order is drop order: regions before the pool they cover (the
    // store) and before their domains and device.
    /// By (holder, extent).
    regions: DashMap<(u32, u32), Mr>,
    /// By holder.
    pds: DashMap<u32, Arc<Pd>>,
    ctx: OnceLock<Arc<Context>>,
    store: Arc<Store>,
    device: Option<String>,
}

/// One connection's queue pair and staging buffer.
#[derive(Debug)]
pub struct RdmaSession {
    // Field order: the queue pair is destroyed before the staging region.
    _qp: Qp,
    staging: Buffer,
}

impl RdmaServer {
    /// RDMA for `store`'s pool, on `device` or the device that has the
    /// address clients connect to.
    pub fn new(store: Arc<Store>, device: Option<String>) -> Result<Arc<Self>, RdmaError> {
        let me = Arc::new(Self {
            regions: DashMap::new(),
            pds: DashMap::new(),
            ctx: OnceLock::new(),
            store: store.clone(),
            device,
        });
        store
            .set_extent_listener(Arc::new(Listener(Arc::downgrade(&me))))
            .map_err(RdmaError::Listener)?;
        Ok(me)
    }

    /// Opens the device for `ip` now, so a misconfiguration shows at start.
    pub fn open(&self, ip: IpAddr) -> Result<(), RdmaError> {
        self.context(ip).map(|_| ())
    }

    fn context(&self, ip: IpAddr) -> Result<&Arc<Context>, RdmaError> {
        if let Some(ctx) = self.ctx.get() {
            return Ok(ctx);
        }
        let ctx = Context::open(ip, self.device.as_deref())
            .map_err(|source| RdmaError::Device { ip, source })?;
        // Two first connections may race; the loser's context is dropped.
        Ok(self.ctx.get_or_init(|| Arc::new(ctx)))
    }

    fn pd(&self, ctx: &Arc<Context>, holder: u32) -> Result<Arc<Pd>, RdmaError> {
        if let Some(pd) = self.pds.get(&holder) {
            return Ok(pd.clone());
        }
        let pd = Pd::new(ctx.clone()).map_err(RdmaError::QueuePair)?;
        Ok(self.pds.entry(holder).or_insert(pd).clone())
    }

    /// Sets up a queue pair for `holder` (one of its tenant's), reached at
    /// `local_ip`, connected to the client's `peer` endpoint.
    pub fn accept(
        &self,
        holder: u32,
        local_ip: IpAddr,
        peer: &RdmaEndpoint,
    ) -> Result<(RdmaSession, RdmaAccept), RdmaError> {
        let ctx = self.context(local_ip)?.clone();
        let want = match local_ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        if ctx.gid() != want && ctx.lid() == 0 {
            return Err(RdmaError::OtherAddress {
                device: ctx.name().to_string(),
                ip: local_ip,
            });
        }
        let pd = self.pd(&ctx, holder)?;
        let staging = Buffer::new(&pd, STAGING_PAGES as usize * PAGE_SIZE, Access::RemoteWrite)
            .map_err(RdmaError::QueuePair)?;
        let mut qp = Qp::new(
            &pd,
            QpCaps {
                max_send_wr: 1,
                remote_access: true,
            },
        )
        .map_err(RdmaError::QueuePair)?;
        qp.connect(peer).map_err(RdmaError::QueuePair)?;
        let accept = RdmaAccept {
            endpoint: qp.endpoint(),
            staging: RemoteBuffer {
                addr: staging.mr().addr(),
                rkey: staging.mr().rkey(),
                pages: STAGING_PAGES,
            },
        };
        Ok((RdmaSession { _qp: qp, staging }, accept))
    }

    /// Where `handle` of `tenant` is, for a connection of `holder`,
    /// registering its extent for the holder if it is not yet. A page of
    /// the tenant's own extents (reloaded after a restart) is first moved
    /// into the holder's ([`Store::adopt`]; the session has checked the
    /// holder may use the handle). A page that cannot be reached over RDMA
    /// (in another agent's extent, or no region could be registered) is
    /// `ok` with address 0: the client then fetches it over TCP.
    pub fn locate(&self, tenant: &Tenant, holder: u32, handle: u64) -> Location {
        let Some(found) = self.store.adopt(tenant, holder, handle) else {
            return Location::missing(PageStatus::NotFound);
        };
        match self.rkey(holder, found.extent) {
            Some(rkey) => Location {
                status: PageStatus::Ok,
                crc: found.crc,
                addr: self.store.slot_addr(found.slot),
                rkey,
            },
            None => Location {
                status: PageStatus::Ok,
                crc: found.crc,
                addr: 0,
                rkey: 0,
            },
        }
    }

    /// The rkey of `extent`'s region in `holder`'s domain, registered on
    /// first use; `None` when the holder does not own the extent. The key
    /// is read under the map's shard lock, which the release of the extent
    /// must take to drop the region: a key handed out belongs to a region
    /// that was registered while the holder owned the extent.
    fn rkey(&self, holder: u32, extent: u32) -> Option<u32> {
        if let Some(mr) = self.regions.get(&(holder, extent)) {
            return Some(mr.rkey());
        }
        let ctx = self.ctx.get()?;
        let pd = self.pd(ctx, holder).ok()?;
        // Registered while the store guarantees the holder owns the extent
        // (its release waits), and published before that guarantee ends,
        // so the release that follows finds and drops it.
        // An anonymous pool is registered writable (locally) so the kernel
        // pins its real pages, not the shared zero page of untouched slots;
        // a file's pages are pinned read-only, which the kernel allows.
        let access = if self.store.persistent() {
            Access::RemoteRead
        } else {
            Access::RemoteReadPinned
        };
        let registered = self.store.while_owned(holder, extent, |ptr, len| {
            let register = || {
                // SAFETY: the pool mapping lives as long as the store, which
                // this server holds, and is never remapped; the region is
                // dropped when the extent is released or with the server.
                unsafe { Mr::register(&pd, ptr, len, access) }
            };
            match off_worker(register) {
                Ok(mr) => Some(self.regions.entry((holder, extent)).or_insert(mr).rkey()),
                Err(e) => {
                    tracing::error!(holder, extent, error = %e, "cannot register pool memory for RDMA; pages go over TCP");
                    None
                }
            }
        });
        registered.flatten()
    }

    fn released(&self, holder: u32, extent: u32) {
        self.regions.remove(&(holder, extent));
    }

    /// Number of registered pool regions (for stats).
    pub fn regions(&self) -> usize {
        self.regions.len()
    }
}

/// Runs `f`, which blocks for a while (pinning 2 MiB of pages for a
/// memory region), telling a multi-threaded tokio runtime first so it moves
/// this worker's other tasks elsewhere; elsewhere it just runs `f`.
fn off_worker<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl RdmaSession {
    /// Page `index` of the staging buffer as a byte range, if in range.
    pub fn staged(&self, index: u32) -> Option<std::ops::Range<usize>> {
        let start = (index as usize).checked_mul(PAGE_SIZE)?;
        let end = start + PAGE_SIZE;
        (end <= self.staging.mr().len()).then_some(start..end)
    }

    /// Copies page `index` of the staging buffer (checked with
    /// [`RdmaSession::staged`]) into `out`. The client may be writing the
    /// buffer by RDMA meanwhile, so the bytes are copied with volatile
    /// reads: whatever they are, the caller checks them against the
    /// checksum.
    pub fn copy_staged(&self, index: u32, out: &mut [u8; PAGE_SIZE]) {
        let range = self.staged(index).expect("index checked by the caller");
        let src = self.staging.as_ptr().wrapping_add(range.start);
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: `src + i` is inside the registered buffer (range
            // checked above), which lives as long as self; a volatile read
            // of memory a device may write is defined for u8.
            *b = unsafe { std::ptr::read_volatile(src.wrapping_add(i)) };
        }
    }
}

/// Deregisters a holder's region when the store takes its extent back.
#[derive(Debug)]
struct Listener(std::sync::Weak<RdmaServer>);

impl ExtentListener for Listener {
    fn extent_released(&self, tenant: u32, extent: u32) {
        if let Some(server) = self.0.upgrade() {
            server.released(tenant, extent);
        }
    }
}
