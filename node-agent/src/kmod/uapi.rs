//! The `/dev/rmem` interface: the Rust mirror of `kmod/include/uapi/rmem.h`.
//! Layouts and ioctl numbers must match the header: the tests below parse
//! it and compare every constant, every structure's fields and offsets, and
//! every ioctl number with what is here (the module checks its own copy's
//! sizes at build time).

/// The interface version this agent speaks.
pub const UAPI_VERSION: u32 = 5;
/// Bytes per page moved through the module.
pub const PAGE_SIZE: usize = 4096;
/// Most pages one eviction may take.
pub const MAX_BATCH: u32 = 512;
/// A handle that means "keep this page local" in a commit.
pub const NO_HANDLE: u64 = u64::MAX;
/// Most attachments one LIST describes.
pub const MAX_LIST: u32 = 4096;
/// Attach every mapping of the process.
pub const ATTACH_ALL: u32 = 1;
/// LIST: the attachment's process has exited.
pub const ATT_EXITED: u32 = 2;
/// A CPU touched a remote page.
pub const EVENT_FETCH: u32 = 1;
/// The last mapping of a remote page went away.
pub const EVENT_FREED: u32 = 2;

/// `struct rmem_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Info {
    pub version: u32,
    pub page_size: u32,
    pub capacity_pages: u64,
    pub pages_in_use: u64,
    pub faults: u64,
    pub restored: u64,
    pub evicted: u64,
    pub fetch_timeouts: u64,
    pub attachments: u32,
    pub agent_pid: u32,
    /// Of `faults`, pages brought back ahead of a fault (sequential scans).
    pub prefetched: u64,
    /// Faults that dropped the target's `mmap_lock` while their pages were
    /// fetched (a first try staging them; its retry migrates them).
    pub retried: u64,
    /// Pages eviction left in RAM because they are KSM's: merged (shared
    /// through KSM's stable tree) or in a mergeable mapping.
    pub skipped_ksm: u64,
    /// Pages eviction left in RAM because their mapping is mlocked.
    pub skipped_locked: u64,
    /// Pages eviction left in RAM because their mapping is one it never
    /// takes (userfaultfd-registered, I/O or PFN maps, not private
    /// anonymous memory).
    pub skipped_mappings: u64,
    /// Faults that ended in SIGBUS because their page could not move back
    /// for `fault_timeout_ms` (the kernel kept refusing the migration).
    pub stuck_faults: u64,
}

/// `struct rmem_attach`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Attach {
    pub pid: i32,
    pub flags: u32,
    pub start: u64,
    pub len: u64,
    pub id: u64,
}

/// `struct rmem_att_info`: an attachment the module holds.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttInfo {
    pub id: u64,
    pub pid: i32,
    /// [`ATTACH_ALL`], [`ATT_EXITED`].
    pub flags: u32,
    pub start: u64,
    pub len: u64,
}

/// `struct rmem_list`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct List {
    pub max: u32,
    pub count: u32,
    pub atts: u64,
}

/// `struct rmem_detach`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Detach {
    pub id: u64,
    pub restored: u64,
}

/// `struct rmem_evict`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Evict {
    pub id: u64,
    pub start: u64,
    pub max_pages: u32,
    pub npages: u32,
    pub data: u64,
    pub addrs: u64,
}

/// `struct rmem_commit`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Commit {
    pub id: u64,
    pub start: u64,
    pub max_pages: u32,
    pub npages: u32,
    pub addrs: u64,
    pub handles: u64,
    pub data: u64,
    pub status: u64,
    pub moved: u32,
    pub pad: u32,
}

/// `struct rmem_event`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Event {
    pub kind: u32,
    pub pid: u32,
    pub id: u64,
    pub handle: u64,
    pub addr: u64,
}

/// `struct rmem_wait`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Wait {
    pub max: u32,
    pub count: u32,
    pub timeout_ms: u32,
    pub pad: u32,
    pub events: u64,
}

/// `struct rmem_reply`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Reply {
    pub id: u64,
    pub error: i32,
    pub pad: u32,
    pub data: u64,
}

const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((b'R' as u64) << 8) | nr
}

pub const IOC_INFO: u64 = ioc(IOC_READ, 0x00, size_of::<Info>());
pub const IOC_ATTACH: u64 = ioc(IOC_READ | IOC_WRITE, 0x01, size_of::<Attach>());
pub const IOC_DETACH: u64 = ioc(IOC_READ | IOC_WRITE, 0x02, size_of::<Detach>());
pub const IOC_EVICT_BEGIN: u64 = ioc(IOC_READ | IOC_WRITE, 0x03, size_of::<Evict>());
pub const IOC_EVICT_COMMIT: u64 = ioc(IOC_READ | IOC_WRITE, 0x04, size_of::<Commit>());
pub const IOC_WAIT: u64 = ioc(IOC_READ | IOC_WRITE, 0x06, size_of::<Wait>());
pub const IOC_REPLY: u64 = ioc(IOC_WRITE, 0x07, size_of::<Reply>());
pub const IOC_LIST: u64 = ioc(IOC_READ | IOC_WRITE, 0x08, size_of::<List>());

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes the C header's layout gives (all fields naturally aligned,
    /// explicit padding): the module checks the same numbers at build time.
    #[test]
    fn layouts_match_the_header() {
        assert_eq!(size_of::<Info>(), 112);
        assert_eq!(size_of::<Attach>(), 32);
        assert_eq!(size_of::<Detach>(), 16);
        assert_eq!(size_of::<Evict>(), 40);
        assert_eq!(size_of::<Commit>(), 64);
        assert_eq!(size_of::<Event>(), 32);
        assert_eq!(size_of::<Wait>(), 24);
        assert_eq!(size_of::<Reply>(), 24);
        assert_eq!(size_of::<AttInfo>(), 32);
        assert_eq!(size_of::<List>(), 16);
    }

    const HEADER: &str = include_str!("../../../kmod/include/uapi/rmem.h");

    /// The header's `#define NAME VALUE` lines, values evaluated where they
    /// are a number or `(1u << N)`.
    fn defines() -> std::collections::BTreeMap<String, String> {
        HEADER
            .lines()
            .filter_map(|l| l.strip_prefix("#define "))
            .filter_map(|l| {
                let (name, value) = l.split_once(char::is_whitespace)?;
                let value = value.split("/*").next()?.trim();
                Some((name.to_string(), value.to_string()))
            })
            .collect()
    }

    fn number(v: &str) -> u64 {
        if let Some(shift) = v.strip_prefix("(1u << ").and_then(|v| v.strip_suffix(')')) {
            return 1 << shift.parse::<u32>().unwrap();
        }
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
            None => v.parse().unwrap_or_else(|_| panic!("not a number: {v}")),
        }
    }

    /// Each `struct rmem_NAME`: its fields with their offsets (natural
    /// alignment, as every field is a fixed-size integer), and its size.
    fn structs() -> std::collections::BTreeMap<String, (Vec<(String, usize)>, usize)> {
        let mut out = std::collections::BTreeMap::new();
        let mut lines = HEADER.lines();
        while let Some(l) = lines.next() {
            let Some(name) = l
                .strip_prefix("struct rmem_")
                .and_then(|l| l.strip_suffix(" {"))
            else {
                continue;
            };
            let (mut fields, mut at, mut align) = (Vec::new(), 0usize, 1usize);
            for l in lines.by_ref() {
                if l.starts_with("};") {
                    break;
                }
                let decl = l.split("/*").next().unwrap().trim();
                let Some(decl) = decl.strip_suffix(';') else {
                    continue;
                };
                let (ty, field) = decl.split_once(char::is_whitespace).unwrap();
                let size = match ty {
                    "__u32" | "__s32" => 4,
                    "__u64" | "__s64" => 8,
                    other => panic!("struct rmem_{name}: a field of type {other}"),
                };
                at = at.next_multiple_of(size);
                fields.push((field.trim().to_string(), at));
                at += size;
                align = align.max(size);
            }
            out.insert(name.to_string(), (fields, at.next_multiple_of(align)));
        }
        out
    }

    /// The Rust side of a structure: its size and each field's offset.
    macro_rules! layout {
        ($t:ty { $($f:ident),* $(,)? }) => {
            (
                size_of::<$t>(),
                vec![$((stringify!($f).to_string(), std::mem::offset_of!($t, $f))),*],
            )
        };
    }

    #[test]
    fn the_header_and_this_mirror_agree() {
        let d = defines();
        let constants: [(&str, u64); 8] = [
            ("RMEM_UAPI_VERSION", UAPI_VERSION.into()),
            ("RMEM_PAGE_SIZE", PAGE_SIZE as u64),
            ("RMEM_MAX_BATCH", MAX_BATCH.into()),
            ("RMEM_ATTACH_ALL", ATTACH_ALL.into()),
            ("RMEM_ATT_EXITED", ATT_EXITED.into()),
            ("RMEM_EVENT_FETCH", EVENT_FETCH.into()),
            ("RMEM_EVENT_FREED", EVENT_FREED.into()),
            ("RMEM_IOC_MAGIC", u64::from(b'R')),
        ];
        for (name, value) in constants {
            let c = d
                .get(name)
                .unwrap_or_else(|| panic!("{name} is not in the header"));
            let c = if name == "RMEM_IOC_MAGIC" {
                u64::from(c.trim_matches('\'').as_bytes()[0])
            } else {
                number(c)
            };
            assert_eq!(c, value, "{name}");
        }
        let rust = [
            (
                "info",
                layout!(Info {
                    version,
                    page_size,
                    capacity_pages,
                    pages_in_use,
                    faults,
                    restored,
                    evicted,
                    fetch_timeouts,
                    attachments,
                    agent_pid,
                    prefetched,
                    retried,
                    skipped_ksm,
                    skipped_locked,
                    skipped_mappings,
                    stuck_faults
                }),
            ),
            (
                "attach",
                layout!(Attach {
                    pid,
                    flags,
                    start,
                    len,
                    id
                }),
            ),
            (
                "att_info",
                layout!(AttInfo {
                    id,
                    pid,
                    flags,
                    start,
                    len
                }),
            ),
            ("list", layout!(List { max, count, atts })),
            ("detach", layout!(Detach { id, restored })),
            (
                "evict",
                layout!(Evict {
                    id,
                    start,
                    max_pages,
                    npages,
                    data,
                    addrs
                }),
            ),
            (
                "commit",
                layout!(Commit {
                    id,
                    start,
                    max_pages,
                    npages,
                    addrs,
                    handles,
                    data,
                    status,
                    moved,
                    pad
                }),
            ),
            (
                "event",
                layout!(Event {
                    kind,
                    pid,
                    id,
                    handle,
                    addr
                }),
            ),
            (
                "wait",
                layout!(Wait {
                    max,
                    count,
                    timeout_ms,
                    pad,
                    events
                }),
            ),
            (
                "reply",
                layout!(Reply {
                    id,
                    error,
                    pad,
                    data
                }),
            ),
        ];
        let c = structs();
        assert_eq!(
            c.keys().collect::<Vec<_>>(),
            {
                let mut names: Vec<_> = rust.iter().map(|(n, _)| n.to_string()).collect();
                names.sort();
                names
            }
            .iter()
            .collect::<Vec<_>>(),
            "the header's structures and this file's"
        );
        for (name, (size, fields)) in &rust {
            let (c_fields, c_size) = &c[*name];
            assert_eq!(c_fields, fields, "struct rmem_{name}'s fields and offsets");
            assert_eq!(c_size, size, "struct rmem_{name}'s size");
        }
        // Every ioctl, numbered as the kernel's _IOR/_IOW/_IOWR compute it
        // from the header's structure sizes.
        let ours = [
            ("RMEM_IOC_INFO", IOC_INFO),
            ("RMEM_IOC_ATTACH", IOC_ATTACH),
            ("RMEM_IOC_DETACH", IOC_DETACH),
            ("RMEM_IOC_EVICT_BEGIN", IOC_EVICT_BEGIN),
            ("RMEM_IOC_EVICT_COMMIT", IOC_EVICT_COMMIT),
            ("RMEM_IOC_WAIT", IOC_WAIT),
            ("RMEM_IOC_REPLY", IOC_REPLY),
            ("RMEM_IOC_LIST", IOC_LIST),
        ];
        let header_iocs: Vec<&String> = d
            .keys()
            .filter(|k| k.starts_with("RMEM_IOC_") && *k != "RMEM_IOC_MAGIC")
            .collect();
        assert_eq!(header_iocs.len(), ours.len(), "ioctls: {header_iocs:?}");
        for (name, value) in ours {
            let def = &d[name];
            let (mac, args) = def.split_once('(').unwrap();
            let args: Vec<&str> = args
                .trim_end_matches(')')
                .split(',')
                .map(str::trim)
                .collect();
            let dir = match mac {
                "_IOR" => IOC_READ,
                "_IOW" => IOC_WRITE,
                "_IOWR" => IOC_READ | IOC_WRITE,
                other => panic!("{name}: {other}"),
            };
            let st = args[2].strip_prefix("struct rmem_").unwrap();
            assert_eq!(ioc(dir, number(args[1]), c[st].1), value, "{name}");
        }
    }

    /// `_IOR('R', 0, struct rmem_info)` as the kernel's macros compute it.
    #[test]
    fn ioctl_numbers_follow_the_kernel_encoding() {
        assert_eq!(IOC_INFO, 0x8070_5200);
        assert_eq!(IOC_REPLY, 0x4018_5207);
        assert_eq!(IOC_ATTACH, 0xc020_5201);
    }
}
