//! Opening a device port by IP address.

use std::ffi::CStr;
use std::fs;
use std::net::IpAddr;
use std::ptr::NonNull;

use rdma_sys as sys;

use crate::VerbsError;

const LINK_LAYER_INFINIBAND: u8 = 1;

/// An opened RDMA device and the port (and GID) rmem uses on it.
#[derive(Debug)]
pub struct Context {
    ctx: NonNull<sys::ibv_context>,
    name: String,
    port: u8,
    gid_index: u8,
    gid: [u8; 16],
    lid: u16,
    mtu: u8,
    max_qp_rd_atom: u8,
}

// SAFETY: an ibv_context may be used from any thread; libibverbs and its
// providers serialise what needs it. Context only hands out the pointer to
// verbs calls.
unsafe impl Send for Context {}
// SAFETY: as above; no method mutates Context's own fields.
unsafe impl Sync for Context {}

/// Names of the RDMA devices present.
pub(crate) fn device_names() -> Result<Vec<String>, VerbsError> {
    let list = DeviceList::get()?;
    Ok(list.iter().map(|d| d.1).collect())
}

/// The result of ibv_get_device_list, freed on drop.
struct DeviceList {
    list: *mut *mut sys::ibv_device,
    len: usize,
}

impl DeviceList {
    fn get() -> Result<Self, VerbsError> {
        let mut n: i32 = 0;
        // SAFETY: `n` is a valid out pointer; the returned array is freed in Drop.
        let list = unsafe { sys::ibv_get_device_list(&mut n) };
        if list.is_null() {
            // ENOSYS: no kernel support at all; that is "no devices".
            return Err(VerbsError::NoDevices);
        }
        Ok(Self {
            list,
            len: n.max(0) as usize,
        })
    }

    fn iter(&self) -> impl Iterator<Item = (*mut sys::ibv_device, String)> + '_ {
        (0..self.len).map(|i| {
            // SAFETY: `i < len`, the length ibv_get_device_list reported.
            let slot = unsafe { self.list.add(i) };
            // SAFETY: `slot` points at an entry of the live list.
            let dev = unsafe { *slot };
            // SAFETY: `dev` is a device of the live list.
            let ptr = unsafe { sys::ibv_get_device_name(dev) };
            // SAFETY: the name is a NUL-terminated string owned by the list.
            let name = unsafe { CStr::from_ptr(ptr) };
            (dev, name.to_string_lossy().into_owned())
        })
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: `list` came from ibv_get_device_list and is freed once.
        unsafe { sys::ibv_free_device_list(self.list) };
    }
}

/// The 16-byte GID form of an IP address (IPv4 mapped into IPv6).
fn gid_of(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Whether sysfs says a GID entry is RoCE v2 (routable over UDP/IP);
/// `None` when sysfs does not say (older kernels, InfiniBand).
fn gid_is_roce_v2(dev: &str, port: u8, index: usize) -> Option<bool> {
    let path = format!("/sys/class/infiniband/{dev}/ports/{port}/gid_attrs/types/{index}");
    fs::read_to_string(path)
        .ok()
        .map(|t| t.trim().eq_ignore_ascii_case("RoCE v2"))
}

impl Context {
    /// Opens the device port that reaches `ip`: on RoCE, the port whose GID
    /// table holds `ip` (a RoCE v2 entry preferred); on InfiniBand, the
    /// first active port of `device` (which must then be named). `device`
    /// restricts the search to one device.
    pub fn open(ip: IpAddr, device: Option<&str>) -> Result<Self, VerbsError> {
        let list = DeviceList::get()?;
        let mut seen = Vec::new();
        let want = gid_of(ip);
        for (dev, name) in list.iter() {
            if device.is_some_and(|d| d != name) {
                continue;
            }
            seen.push(name.clone());
            // SAFETY: `dev` is a device of the live list.
            let raw = unsafe { sys::ibv_open_device(dev) };
            let Some(ctx) = NonNull::new(raw) else {
                tracing::warn!(device = %name, error = %std::io::Error::last_os_error(), "cannot open RDMA device");
                continue;
            };
            let mut opened = Self {
                ctx,
                name,
                port: 0,
                gid_index: 0,
                gid: [0; 16],
                lid: 0,
                mtu: 0,
                max_qp_rd_atom: 1,
            };
            if opened.pick_port(&want, device.is_some())? {
                tracing::info!(
                    device = %opened.name,
                    port = opened.port,
                    gid_index = opened.gid_index,
                    %ip,
                    "RDMA device opened"
                );
                return Ok(opened);
            }
            // `opened` drops here and closes the device.
        }
        if seen.is_empty() {
            return Err(match device {
                Some(d) => VerbsError::NoSuchDevice(d.to_string()),
                None => VerbsError::NoDevices,
            });
        }
        Err(VerbsError::NoPortForAddress {
            ip,
            devices: seen.join(", "),
        })
    }

    /// Finds an active port with `want` in its GID table (or, on an
    /// InfiniBand port of a named device, the port itself).
    fn pick_port(&mut self, want: &[u8; 16], named: bool) -> Result<bool, VerbsError> {
        // SAFETY: ibv_device_attr is plain data; zero is a valid value.
        let mut dattr: sys::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open and `dattr` is a valid out pointer.
        let ret = unsafe { sys::ibv_query_device(self.ctx.as_ptr(), &mut dattr) };
        if ret != 0 {
            return Err(VerbsError::call("ibv_query_device", ret));
        }
        self.max_qp_rd_atom = dattr.max_qp_rd_atom.clamp(1, 255) as u8;
        for port in 1..=dattr.phys_port_cnt {
            // SAFETY: ibv_port_attr is plain data; zero is a valid value.
            let mut pattr: sys::ibv_port_attr = unsafe { std::mem::zeroed() };
            // SAFETY: the context is open, `port` is in range, `pattr` is a
            // valid out pointer.
            let ret = unsafe { sys::___ibv_query_port(self.ctx.as_ptr(), port, &mut pattr) };
            if ret != 0 || pattr.state != sys::ibv_port_state::IBV_PORT_ACTIVE {
                continue;
            }
            let mut fallback = None;
            for index in 0..pattr.gid_tbl_len.clamp(0, 256) as usize {
                // SAFETY: ibv_gid is a union of plain data; zero is valid.
                let mut gid: sys::ibv_gid = unsafe { std::mem::zeroed() };
                // SAFETY: as above; `gid` is a valid out pointer and the
                // index is below the table length.
                let ret =
                    unsafe { sys::ibv_query_gid(self.ctx.as_ptr(), port, index as i32, &mut gid) };
                if ret != 0 {
                    continue;
                }
                // SAFETY: every bit pattern of the union is a valid `raw`.
                let raw = unsafe { gid.raw };
                let ib = pattr.link_layer == LINK_LAYER_INFINIBAND;
                if ib && named && index == 0 {
                    fallback = Some((index, raw));
                    break;
                }
                if raw != *want {
                    continue;
                }
                match gid_is_roce_v2(&self.name, port, index) {
                    Some(true) => {
                        fallback = Some((index, raw));
                        break;
                    }
                    Some(false) | None => {
                        fallback.get_or_insert((index, raw));
                    }
                }
            }
            if let Some((index, raw)) = fallback {
                self.port = port;
                self.gid_index = index as u8;
                self.gid = raw;
                self.lid = pattr.lid;
                self.mtu = pattr.active_mtu as u8;
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_context {
        self.ctx.as_ptr()
    }

    /// The device's name (e.g. `rxe0`, `mlx5_0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port in use.
    pub fn port(&self) -> u8 {
        self.port
    }

    /// The GID table index in use.
    pub fn gid_index(&self) -> u8 {
        self.gid_index
    }

    /// The GID in use.
    pub fn gid(&self) -> [u8; 16] {
        self.gid
    }

    /// The port's LID (InfiniBand; 0 on RoCE).
    pub fn lid(&self) -> u16 {
        self.lid
    }

    /// The port's active MTU (verbs enum value).
    pub fn mtu(&self) -> u8 {
        self.mtu
    }

    /// How many RDMA READs a queue pair of this device may have in flight.
    pub fn max_rd_atomic(&self) -> u8 {
        self.max_qp_rd_atom
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the context is open and every object made from it holds an
        // Arc of it, so none is left when this runs.
        let ret = unsafe { sys::ibv_close_device(self.ctx.as_ptr()) };
        if ret != 0 {
            tracing::warn!(device = %self.name, "ibv_close_device failed");
        }
    }
}
