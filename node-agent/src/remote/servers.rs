//! The servers pages go to, by index, and a thread's connections to them.
//!
//! A backend's table of servers (index 0..=255) only grows: a server is
//! added when the coordinator grants capacity on it (or named in the
//! configuration) and keeps its index, so a book entry or a connection can
//! name it by one byte. Each thread keeps its own connections
//! ([`Remotes`]), opened on first use.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rmem_client::ClientConfig;

use super::conn::{RemoteConn, thread_config};
use super::errors::ErrorCounts;
use super::seal::Seal;

/// Most servers one table holds (an index is one byte).
pub const MAX_SERVERS: usize = 256;

/// Servers by index (0..=255), as pages and connections name them.
/// Servers are added while they are in use, never removed or reordered, so
/// an index stays valid.
#[derive(Debug, Default)]
pub struct Servers {
    list: RwLock<Vec<ClientConfig>>,
    /// With sealing on: the key every page to and from these servers is
    /// sealed and opened with.
    seal: Option<Arc<Seal>>,
    /// What went wrong talking to them, by reason (every connection of
    /// every thread counts here).
    errors: Arc<ErrorCounts>,
}

impl Servers {
    pub fn new(list: Vec<ClientConfig>) -> Result<Self, ServersError> {
        if list.len() > MAX_SERVERS {
            return Err(ServersError::TooMany);
        }
        Ok(Self {
            list: RwLock::new(list),
            seal: None,
            errors: Arc::default(),
        })
    }

    /// Pages to and from these servers sealed with `seal`.
    pub fn sealed(mut self, seal: Option<Arc<Seal>>) -> Self {
        self.seal = seal;
        self
    }

    /// Errors met talking to these servers, by reason.
    pub fn errors(&self) -> &Arc<ErrorCounts> {
        &self.errors
    }

    /// The seal of these servers' pages, if sealing is on.
    pub fn seal(&self) -> Option<&Arc<Seal>> {
        self.seal.as_ref()
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
    pub fn add(&self, cfg: ClientConfig) -> Result<u8, ServersError> {
        let mut list = self.list.write().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = list.iter().position(|s| s.addr == cfg.addr) {
            return Ok(i as u8);
        }
        if list.len() >= MAX_SERVERS {
            return Err(ServersError::TooMany);
        }
        list.push(cfg);
        Ok((list.len() - 1) as u8)
    }

    /// The index of the server at `addr`, if it is known.
    pub fn index_of(&self, addr: &str) -> Option<u8> {
        self.list
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .position(|s| s.addr == addr)
            .map(|i| i as u8)
    }

    /// Address of server `index`, for logs.
    pub fn addr(&self, index: u8) -> String {
        self.get(index).map(|s| s.addr).unwrap_or_default()
    }
}

/// Why a server cannot be added.
#[derive(Debug, thiserror::Error)]
pub enum ServersError {
    #[error("at most {MAX_SERVERS} servers")]
    TooMany,
}

/// A thread's connections, one per server of a table, opened on first use.
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
    pub fn get(&mut self, servers: &Servers, index: u8) -> Option<&mut RemoteConn> {
        let i = usize::from(index);
        if i >= self.conns.len() {
            self.conns.resize_with(i + 1, || None);
        }
        if self.conns[i].is_none() {
            let mut cfg = thread_config(&servers.get(index)?, self.timeout);
            cfg.spin = self.spin;
            self.conns[i] = Some(
                RemoteConn::new(cfg)
                    .sealed(servers.seal.clone())
                    .counting(servers.errors.clone()),
            );
        }
        self.conns[i].as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_keep_their_index() {
        let s = Servers::new(vec![ClientConfig::new("a"), ClientConfig::new("b")]).unwrap();
        assert_eq!(s.add(ClientConfig::new("c")).unwrap(), 2);
        assert_eq!(s.add(ClientConfig::new("b")).unwrap(), 1);
        assert_eq!((s.addr(2), s.len()), ("c".to_string(), 3));
        assert!(s.get(3).is_none());
    }
}
