//! Completion queues with a completion channel: poll for a bounded time,
//! then sleep until the device signals a completion.

use std::ffi::CStr;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_sys as sys;

use crate::{Context, VerbsError};

/// One work completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    pub status: u32,
    pub opcode: u32,
    pub vendor_err: u32,
}

impl Completion {
    /// Ok for a successful completion, the error otherwise.
    pub fn check(&self) -> Result<(), VerbsError> {
        if self.status == sys::ibv_wc_status::IBV_WC_SUCCESS {
            return Ok(());
        }
        // SAFETY: ibv_wc_status_str takes any value.
        let ptr = unsafe { sys::ibv_wc_status_str(self.status) };
        // SAFETY: it returns a static NUL-terminated string for any value.
        let name = unsafe { CStr::from_ptr(ptr) };
        Err(VerbsError::Completion {
            opcode: match self.opcode {
                sys::ibv_wc_opcode::IBV_WC_RDMA_READ => "READ",
                sys::ibv_wc_opcode::IBV_WC_RDMA_WRITE => "WRITE",
                sys::ibv_wc_opcode::IBV_WC_SEND => "SEND",
                _ => "work request",
            },
            status: self.status,
            name: name.to_str().unwrap_or("unknown"),
            vendor: self.vendor_err,
        })
    }
}

/// A completion queue and the channel that wakes its waiter.
#[derive(Debug)]
pub struct Cq {
    // Field order: the queue is destroyed before its channel.
    cq: NonNull<sys::ibv_cq>,
    channel: NonNull<sys::ibv_comp_channel>,
    armed: bool,
    ctx: Arc<Context>,
}

// SAFETY: the queue and channel are used by one thread at a time (`&mut
// self`), and libibverbs allows that thread to be any thread.
unsafe impl Send for Cq {}

impl Cq {
    /// A completion queue of `entries` entries on `ctx`.
    pub fn new(ctx: Arc<Context>, entries: u32) -> Result<Self, VerbsError> {
        // SAFETY: the context is open.
        let ch = unsafe { sys::ibv_create_comp_channel(ctx.as_ptr()) };
        let channel =
            NonNull::new(ch).ok_or_else(|| VerbsError::call("ibv_create_comp_channel", 0))?;
        // SAFETY: the channel was just created; its fd is ours to configure.
        let fd = unsafe { (*channel.as_ptr()).fd };
        // SAFETY: `fd` is an open descriptor; O_NONBLOCK lets a wake-up
        // without an event return instead of blocking.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
        // SAFETY: context and channel are live; no cq_context is used.
        let raw = unsafe {
            sys::ibv_create_cq(
                ctx.as_ptr(),
                entries.max(1) as i32,
                std::ptr::null_mut(),
                channel.as_ptr(),
                0,
            )
        };
        let Some(cq) = NonNull::new(raw) else {
            let err = VerbsError::call("ibv_create_cq", 0);
            // SAFETY: the channel has no queue attached.
            unsafe { sys::ibv_destroy_comp_channel(channel.as_ptr()) };
            return Err(err);
        };
        Ok(Self {
            cq,
            channel,
            armed: false,
            ctx,
        })
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_cq {
        self.cq.as_ptr()
    }

    /// The device this queue belongs to.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    fn fd(&self) -> RawFd {
        // SAFETY: the channel is live for as long as self.
        unsafe { (*self.channel.as_ptr()).fd }
    }

    /// One completion if there is one, without waiting.
    pub fn try_next(&mut self) -> Result<Option<Completion>, VerbsError> {
        // SAFETY: ibv_wc is plain data; zero is a valid value.
        let mut wc: sys::ibv_wc = unsafe { std::mem::zeroed() };
        // SAFETY: the queue is live; `wc` has room for the one entry asked for.
        let n = unsafe { sys::ibv_poll_cq(self.cq.as_ptr(), 1, &mut wc) };
        match n {
            0 => Ok(None),
            1 => Ok(Some(Completion {
                wr_id: wc.wr_id,
                status: wc.status,
                opcode: wc.opcode,
                vendor_err: wc.vendor_err,
            })),
            _ => Err(VerbsError::call("ibv_poll_cq", -n)),
        }
    }

    /// The next completion: polls for up to `spin`, then sleeps on the
    /// completion channel until `deadline`. Spinning keeps a fast
    /// completion free of a thread wake-up; sleeping keeps an idle or slow
    /// queue from burning a core.
    pub fn next(&mut self, spin: Duration, deadline: Instant) -> Result<Completion, VerbsError> {
        let started = Instant::now();
        let spin_until = started + spin;
        loop {
            if let Some(c) = self.try_next()? {
                return Ok(c);
            }
            let now = Instant::now();
            if now < spin_until {
                std::hint::spin_loop();
                continue;
            }
            if !self.armed {
                // SAFETY: the queue is live; arming asks for one event on the
                // channel at the next completion.
                let ret = unsafe { sys::ibv_req_notify_cq(self.cq.as_ptr(), 0) };
                if ret != 0 {
                    return Err(VerbsError::call("ibv_req_notify_cq", ret));
                }
                self.armed = true;
                // A completion may have landed before arming: poll again.
                continue;
            }
            if now >= deadline {
                return Err(VerbsError::Timeout(now - started));
            }
            let wait = deadline - now;
            let mut pfd = libc::pollfd {
                fd: self.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: `pfd` is one valid pollfd.
            let ret = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ret < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(VerbsError::Call {
                    op: "poll",
                    source: err,
                });
            }
            if ret == 0 {
                continue;
            }
            self.consume_event();
        }
    }

    /// Takes one event off the channel (the queue is then disarmed).
    fn consume_event(&mut self) {
        let mut cq: *mut sys::ibv_cq = std::ptr::null_mut();
        let mut ctx: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: the channel is live and non-blocking; out pointers valid.
        let ret = unsafe { sys::ibv_get_cq_event(self.channel.as_ptr(), &mut cq, &mut ctx) };
        if ret == 0 {
            // SAFETY: one event was taken from this queue; it is acknowledged
            // at once so destroying the queue never waits for it.
            unsafe { sys::ibv_ack_cq_events(self.cq.as_ptr(), 1) };
            self.armed = false;
        }
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: every queue pair using this queue holds it through an
        // Arc<Mutex> or owns it, and is destroyed first; every event was
        // acknowledged.
        let ret = unsafe { sys::ibv_destroy_cq(self.cq.as_ptr()) };
        if ret != 0 {
            tracing::warn!(
                "ibv_destroy_cq failed: {}",
                std::io::Error::from_raw_os_error(ret)
            );
        }
        // SAFETY: its only queue is gone.
        unsafe { sys::ibv_destroy_comp_channel(self.channel.as_ptr()) };
    }
}
