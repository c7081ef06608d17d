//! Where a region's pages go: the memory servers it uses and which server
//! each run of pages is placed on.
//!
//! A region has a small table of servers (index 0..=255) and a list of
//! segments (runs of pages, each placed on one server). A page evicted for
//! the first time goes to its segment's server; from then on the page's
//! own state word records the server holding it (`State::server`), so a
//! fault reads one word to know where to fetch from, and a page keeps its
//! server even after its segment is re-placed (until it is moved).
//!
//! Segments can be re-pointed at another server (a drained server's
//! capacity is replaced) and servers can be added, both while the region
//! runs; threads keep one connection per server, opened on first use.

use std::sync::RwLock;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use rmem_client::ClientConfig;

use crate::remote::{RemoteConn, thread_config};

/// Most servers one region uses.
pub const MAX_SERVERS: usize = 256;

/// A run of pages placed on one server.
#[derive(Debug)]
pub struct Segment {
    pub first: usize,
    pub pages: usize,
    server: AtomicU8,
}

impl Segment {
    pub fn server(&self) -> u8 {
        self.server.load(Ordering::Acquire)
    }

    pub fn set_server(&self, s: u8) {
        self.server.store(s, Ordering::Release);
    }
}

/// Servers by index (0..=255), as pages and connections name them.
/// Servers are added while they are in use, never removed or reordered, so
/// an index stays valid.
#[derive(Debug, Default)]
pub struct Servers {
    list: RwLock<Vec<ClientConfig>>,
}

impl Servers {
    pub fn new(list: Vec<ClientConfig>) -> Result<Self, PlacementError> {
        if list.len() > MAX_SERVERS {
            return Err(PlacementError::TooManyServers);
        }
        Ok(Self {
            list: RwLock::new(list),
        })
    }

    /// Connection settings of server `index`.
    pub fn get(&self, index: u8) -> Option<ClientConfig> {
        self.list
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(usize::from(index))
            .cloned()
    }

    /// Number of servers known.
    pub fn len(&self) -> usize {
        self.list.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a server (or finds it by address); returns its index.
    pub fn add(&self, cfg: ClientConfig) -> Result<u8, PlacementError> {
        let mut list = self.list.write().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = list.iter().position(|s| s.addr == cfg.addr) {
            return Ok(i as u8);
        }
        if list.len() >= MAX_SERVERS {
            return Err(PlacementError::TooManyServers);
        }
        list.push(cfg);
        Ok((list.len() - 1) as u8)
    }

    /// Address of server `index`, for logs.
    pub fn addr(&self, index: u8) -> String {
        self.get(index).map(|s| s.addr).unwrap_or_default()
    }
}

impl AsRef<Servers> for Servers {
    fn as_ref(&self) -> &Servers {
        self
    }
}

/// A region's servers and segments.
#[derive(Debug)]
pub struct Placement {
    servers: Servers,
    segments: Vec<Segment>,
}

impl AsRef<Servers> for Placement {
    fn as_ref(&self) -> &Servers {
        &self.servers
    }
}

/// Why a placement is not usable.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("segments must cover pages 0..{pages} in order without gaps")]
    Coverage { pages: usize },
    #[error("segment names server {index}, but only {servers} are known")]
    UnknownServer { index: usize, servers: usize },
    #[error("a region uses at most {MAX_SERVERS} servers")]
    TooManyServers,
}

impl Placement {
    /// Every page on one server.
    pub fn single(server: ClientConfig, pages: usize) -> Self {
        Self {
            servers: Servers {
                list: RwLock::new(vec![server]),
            },
            segments: vec![Segment {
                first: 0,
                pages,
                server: AtomicU8::new(0),
            }],
        }
    }

    /// Pages spread over `servers`: `segments` are (pages, server index),
    /// in page order, covering the region.
    pub fn new(
        servers: Vec<ClientConfig>,
        segments: &[(usize, u8)],
        pages: usize,
    ) -> Result<Self, PlacementError> {
        let servers = Servers::new(servers)?;
        let mut first = 0;
        let mut out = Vec::with_capacity(segments.len());
        for &(n, s) in segments {
            if usize::from(s) >= servers.len() {
                return Err(PlacementError::UnknownServer {
                    index: s.into(),
                    servers: servers.len(),
                });
            }
            if n == 0 {
                return Err(PlacementError::Coverage { pages });
            }
            out.push(Segment {
                first,
                pages: n,
                server: AtomicU8::new(s),
            });
            first += n;
        }
        if first != pages {
            return Err(PlacementError::Coverage { pages });
        }
        Ok(Self {
            servers,
            segments: out,
        })
    }

    /// The server a page not stored anywhere yet goes to.
    pub fn server_for(&self, page: usize) -> u8 {
        let k = self.segments.partition_point(|s| s.first + s.pages <= page);
        self.segments[k.min(self.segments.len() - 1)].server()
    }

    /// Pages covered.
    pub fn pages(&self) -> usize {
        self.segments.last().map_or(0, |s| s.first + s.pages)
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Connection settings of server `index`.
    pub fn server(&self, index: u8) -> Option<ClientConfig> {
        self.servers.get(index)
    }

    /// Number of servers known.
    pub fn server_count(&self) -> usize {
        self.servers.len()
    }

    /// Adds a server (or finds it by address); returns its index.
    pub fn add_server(&self, cfg: ClientConfig) -> Result<u8, PlacementError> {
        self.servers.add(cfg)
    }

    /// Address of server `index`, for logs.
    pub fn addr(&self, index: u8) -> String {
        self.servers.addr(index)
    }
}

/// A thread's connections, one per server of a table (a region's
/// placement, the kernel agent's servers), opened on first use.
#[derive(Debug)]
pub struct Remotes {
    conns: Vec<Option<RemoteConn>>,
    timeout: Duration,
    spin: Duration,
}

impl Remotes {
    /// Connections whose requests give up after `timeout` and that poll
    /// for a reply for `spin` before blocking (see `ClientConfig::spin`).
    pub fn new(timeout: Duration, spin: Duration) -> Self {
        Self {
            conns: Vec::new(),
            timeout,
            spin,
        }
    }

    /// The connection to server `index` of `servers`.
    pub fn get(&mut self, servers: &impl AsRef<Servers>, index: u8) -> Option<&mut RemoteConn> {
        let i = usize::from(index);
        if i >= self.conns.len() {
            self.conns.resize_with(i + 1, || None);
        }
        if self.conns[i].is_none() {
            let mut cfg = thread_config(&servers.as_ref().get(index)?, self.timeout);
            cfg.spin = self.spin;
            self.conns[i] = Some(RemoteConn::new(cfg));
        }
        self.conns[i].as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(a: &str) -> ClientConfig {
        ClientConfig::new(a)
    }

    #[test]
    fn pages_map_to_their_segment() {
        let p = Placement::new(vec![cfg("a"), cfg("b")], &[(10, 0), (5, 1), (1, 0)], 16).unwrap();
        let got: Vec<u8> = (0..16).map(|i| p.server_for(i)).collect();
        assert_eq!(got, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0]);
        let c = p.add_server(cfg("c")).unwrap();
        assert_eq!(c, 2);
        assert_eq!(p.add_server(cfg("b")).unwrap(), 1);
        p.segments()[1].set_server(c);
        assert_eq!(p.server_for(12), 2);
        assert_eq!(p.addr(2), "c");
    }

    #[test]
    fn bad_placements_are_refused() {
        assert!(Placement::new(vec![cfg("a")], &[(10, 0)], 11).is_err());
        assert!(Placement::new(vec![cfg("a")], &[(10, 1)], 10).is_err());
        assert!(Placement::new(vec![cfg("a")], &[(0, 0), (10, 0)], 10).is_err());
    }
}
