//! Reliable-connected queue pairs, connected by hand from the peer's
//! [`Endpoint`].

use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use rdma_sys as sys;

use crate::{Cq, Pd, VerbsError};

/// One side of a queue pair, as the peer needs it: the data plane's
/// RDMA_CONNECT / RDMA_ACCEPT carry exactly this.
pub use rmem_proto::wire::RdmaEndpoint as Endpoint;

/// Sizes of a queue pair.
#[derive(Debug, Clone, Copy)]
pub struct QpCaps {
    /// Work requests in flight on the send queue (READs and WRITEs).
    pub max_send_wr: u32,
    /// Whether peers may READ and WRITE the domain's regions through it.
    pub remote_access: bool,
}

/// One RDMA READ or WRITE: `len` bytes between local and remote memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub local_addr: u64,
    pub lkey: u32,
    pub len: u32,
    pub remote_addr: u64,
    pub rkey: u32,
}

/// A reliable-connected queue pair with its own completion queue.
pub struct Qp {
    qp: NonNull<sys::ibv_qp>,
    /// The same queue pair for [`QpBreaker`]s; emptied when it is destroyed.
    shared: Arc<Mutex<Option<QpPtr>>>,
    // Dropped after the queue pair (Drop destroys `qp` first).
    cq: Cq,
    pd: Arc<Pd>,
    caps: QpCaps,
    psn: u32,
    sges: Vec<sys::ibv_sge>,
    wrs: Vec<sys::ibv_send_wr>,
}

/// A queue pair pointer that may cross threads (see [`QpBreaker`]).
struct QpPtr(NonNull<sys::ibv_qp>);

// SAFETY: ibv_modify_qp may be called from any thread, also while another
// thread posts to or polls the same queue pair; the pointer is only used
// under the mutex that Qp's Drop takes before destroying the queue pair.
unsafe impl Send for QpPtr {}

/// Moves a queue pair to the error state from any thread, as a failing link
/// or a dying peer would, also while a transfer is in flight (for tests of
/// recovery). Outliving its queue pair is harmless: it then does nothing.
#[derive(Clone)]
pub struct QpBreaker(Arc<Mutex<Option<QpPtr>>>);

impl std::fmt::Debug for QpBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QpBreaker").finish_non_exhaustive()
    }
}

/// Moves `qp` to the error state.
fn modify_to_error(qp: NonNull<sys::ibv_qp>) -> Result<(), VerbsError> {
    use sys::ibv_qp_attr_mask as m;
    // SAFETY: plain data; zero is a valid start.
    let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
    attr.qp_state = sys::ibv_qp_state::IBV_QPS_ERR;
    // SAFETY: the caller holds a live queue pair; only the state changes.
    let ret = unsafe { sys::ibv_modify_qp(qp.as_ptr(), &mut attr, m::IBV_QP_STATE.0 as i32) };
    if ret != 0 {
        return Err(VerbsError::call("ibv_modify_qp(ERR)", ret));
    }
    Ok(())
}

impl QpBreaker {
    /// Moves the queue pair to the error state: every outstanding and
    /// later work request completes with an error. False when the queue
    /// pair is already gone.
    pub fn break_now(&self) -> Result<bool, VerbsError> {
        let guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match &*guard {
            Some(qp) => modify_to_error(qp.0).map(|()| true),
            None => Ok(false),
        }
    }
}

impl std::fmt::Debug for Qp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qp")
            .field("qpn", &self.qpn())
            .field("psn", &self.psn)
            .field("caps", &self.caps)
            .finish_non_exhaustive()
    }
}

// SAFETY: a queue pair is driven by one thread at a time (`&mut self` for
// every post and poll); libibverbs lets that be any thread.
unsafe impl Send for Qp {}

/// ACK timeout exponent: 4.096 µs × 2^17 ≈ 0.5 s per try (generous, so a
/// slow software device under emulation is not taken for a dead peer).
const ACK_TIMEOUT: u8 = 17;
/// Transport retries before the queue pair goes to error.
const RETRY_COUNT: u8 = 7;

impl Qp {
    /// Creates a queue pair in `pd`, in the INIT state.
    pub fn new(pd: &Arc<Pd>, caps: QpCaps) -> Result<Self, VerbsError> {
        let ctx = pd.context().clone();
        let cq = Cq::new(ctx.clone(), caps.max_send_wr + 1)?;
        // SAFETY: ibv_qp_init_attr is plain data; zero is a valid start.
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.as_ptr();
        init.recv_cq = cq.as_ptr();
        init.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        init.cap = sys::ibv_qp_cap {
            max_send_wr: caps.max_send_wr.max(1),
            max_recv_wr: 1,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 0,
        };
        // SAFETY: domain and queue are live; `init` is fully initialised.
        let raw = unsafe { sys::ibv_create_qp(pd.as_ptr(), &mut init) };
        let qp = NonNull::new(raw).ok_or_else(|| VerbsError::call("ibv_create_qp", 0))?;
        let mut me = Self {
            qp,
            shared: Arc::new(Mutex::new(Some(QpPtr(qp)))),
            cq,
            pd: pd.clone(),
            caps,
            psn: rand_psn(),
            sges: Vec::with_capacity(caps.max_send_wr as usize),
            wrs: Vec::with_capacity(caps.max_send_wr as usize),
        };
        me.init()?;
        Ok(me)
    }

    fn modify(
        &mut self,
        attr: &mut sys::ibv_qp_attr,
        mask: u32,
        op: &'static str,
    ) -> Result<(), VerbsError> {
        // SAFETY: the queue pair is live; `attr` is initialised for `mask`.
        let ret = unsafe { sys::ibv_modify_qp(self.qp.as_ptr(), attr, mask as i32) };
        if ret != 0 {
            return Err(VerbsError::call(op, ret));
        }
        Ok(())
    }

    fn init(&mut self) -> Result<(), VerbsError> {
        use sys::ibv_access_flags as a;
        use sys::ibv_qp_attr_mask as m;
        // SAFETY: plain data; zero is a valid start.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = self.pd.context().port();
        attr.qp_access_flags = if self.caps.remote_access {
            a::IBV_ACCESS_REMOTE_READ.0 | a::IBV_ACCESS_REMOTE_WRITE.0
        } else {
            0
        };
        let mask = m::IBV_QP_STATE.0
            | m::IBV_QP_PKEY_INDEX.0
            | m::IBV_QP_PORT.0
            | m::IBV_QP_ACCESS_FLAGS.0;
        self.modify(&mut attr, mask, "ibv_modify_qp(INIT)")
    }

    /// This side's endpoint, for the peer.
    pub fn endpoint(&self) -> Endpoint {
        let ctx = self.pd.context();
        Endpoint {
            gid: ctx.gid(),
            // SAFETY: the queue pair is live; qp_num is immutable.
            qpn: unsafe { (*self.qp.as_ptr()).qp_num },
            psn: self.psn,
            lid: ctx.lid(),
            mtu: ctx.mtu(),
            max_rd_atomic: responder_depth(ctx),
        }
    }

    /// Connects to the peer: INIT → ready to receive → ready to send.
    pub fn connect(&mut self, peer: &Endpoint) -> Result<(), VerbsError> {
        use sys::ibv_qp_attr_mask as m;
        let ctx = self.pd.context().clone();
        // As responder we take what we announced; as initiator we keep
        // within what the peer announced.
        let responder = responder_depth(&ctx);
        let initiator = ctx.max_rd_atomic().min(peer.max_rd_atomic).clamp(1, 16);
        // SAFETY: plain data; zero is a valid start.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = u32::from(ctx.mtu().min(peer.mtu).max(1));
        attr.dest_qp_num = peer.qpn;
        attr.rq_psn = peer.psn;
        attr.max_dest_rd_atomic = responder;
        attr.min_rnr_timer = 12;
        attr.ah_attr.is_global = 1;
        attr.ah_attr.grh.dgid.raw = peer.gid;
        attr.ah_attr.grh.sgid_index = ctx.gid_index();
        attr.ah_attr.grh.hop_limit = 64;
        attr.ah_attr.dlid = peer.lid;
        attr.ah_attr.sl = 0;
        attr.ah_attr.port_num = ctx.port();
        let mask = m::IBV_QP_STATE.0
            | m::IBV_QP_AV.0
            | m::IBV_QP_PATH_MTU.0
            | m::IBV_QP_DEST_QPN.0
            | m::IBV_QP_RQ_PSN.0
            | m::IBV_QP_MAX_DEST_RD_ATOMIC.0
            | m::IBV_QP_MIN_RNR_TIMER.0;
        self.modify(&mut attr, mask, "ibv_modify_qp(RTR)")?;

        // SAFETY: plain data; zero is a valid start.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_RTS;
        attr.timeout = ACK_TIMEOUT;
        attr.retry_cnt = RETRY_COUNT;
        attr.rnr_retry = 7;
        attr.sq_psn = self.psn;
        attr.max_rd_atomic = initiator;
        let mask = m::IBV_QP_STATE.0
            | m::IBV_QP_TIMEOUT.0
            | m::IBV_QP_RETRY_CNT.0
            | m::IBV_QP_RNR_RETRY.0
            | m::IBV_QP_SQ_PSN.0
            | m::IBV_QP_MAX_QP_RD_ATOMIC.0;
        self.modify(&mut attr, mask, "ibv_modify_qp(RTS)")
    }

    /// Moves the queue pair to the error state: every outstanding work
    /// request completes with a flush error and the peer's operations on
    /// it fail. Used to tear a connection down on purpose.
    pub fn set_error(&mut self) -> Result<(), VerbsError> {
        modify_to_error(self.qp)
    }

    /// A handle that moves this queue pair to the error state from any
    /// thread.
    pub fn breaker(&self) -> QpBreaker {
        QpBreaker(self.shared.clone())
    }

    /// Posts READs (`write = false`) or WRITEs as one chain; only the last
    /// is signaled (a reliable connection completes them in order, and an
    /// error completes whichever failed). Its completion has `wr_id`.
    pub fn post(&mut self, write: bool, wr_id: u64, ops: &[Transfer]) -> Result<(), VerbsError> {
        assert!(
            !ops.is_empty() && ops.len() <= self.caps.max_send_wr as usize,
            "a post carries 1..=max_send_wr transfers"
        );
        self.sges.clear();
        self.wrs.clear();
        let opcode = if write {
            sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE
        } else {
            sys::ibv_wr_opcode::IBV_WR_RDMA_READ
        };
        for op in ops {
            self.sges.push(sys::ibv_sge {
                addr: op.local_addr,
                length: op.len,
                lkey: op.lkey,
            });
            // SAFETY: plain data; zero is a valid start.
            let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
            wr.wr_id = wr_id;
            wr.opcode = opcode;
            wr.num_sge = 1;
            wr.wr.rdma = sys::rdma_t {
                remote_addr: op.remote_addr,
                rkey: op.rkey,
            };
            self.wrs.push(wr);
        }
        // Link the chain now that neither vector moves any more.
        let n = self.wrs.len();
        let sges = self.sges.as_mut_ptr();
        let wrs = self.wrs.as_mut_ptr();
        for i in 0..n {
            let wr = &mut self.wrs[i];
            // SAFETY: `i < n`, within both vectors.
            wr.sg_list = unsafe { sges.add(i) };
            wr.next = if i + 1 < n {
                // SAFETY: `i + 1 < n`.
                unsafe { wrs.add(i + 1) }
            } else {
                std::ptr::null_mut()
            };
        }
        self.wrs[n - 1].send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
        let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the chain points into `self.sges`/`self.wrs`, which live
        // until the call returns (the device copies work requests on post).
        let ret = unsafe { sys::ibv_post_send(self.qp.as_ptr(), wrs, &mut bad) };
        if ret != 0 {
            return Err(VerbsError::call("ibv_post_send", ret));
        }
        Ok(())
    }

    /// The completion queue of this queue pair.
    pub fn cq(&mut self) -> &mut Cq {
        &mut self.cq
    }

    /// The queue pair number.
    pub fn qpn(&self) -> u32 {
        self.endpoint().qpn
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // No breaker may use the pointer from here on.
        self.shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // SAFETY: created once, destroyed once, before its queue and domain.
        let ret = unsafe { sys::ibv_destroy_qp(self.qp.as_ptr()) };
        if ret != 0 {
            tracing::warn!(
                "ibv_destroy_qp failed: {}",
                std::io::Error::from_raw_os_error(ret)
            );
        }
    }
}

/// RDMA READs a queue pair of `ctx` accepts in flight as responder.
fn responder_depth(ctx: &crate::Context) -> u8 {
    ctx.max_rd_atomic().clamp(1, 16)
}

/// A random 24-bit packet sequence number.
fn rand_psn() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: `b` is a valid 4-byte buffer; getrandom fills what it returns.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let seed = if n == 4 {
        u32::from_le_bytes(b)
    } else {
        std::process::id()
            ^ (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0))
    };
    seed & 0x00ff_ffff
}
