//! The daemon's record of its attachments, in the agent's state directory
//! (tmpfs, beside the run journal: as lasting as the module's pages).
//!
//! The module keeps an attachment when its agent dies, and says what it
//! covers (`RMEM_IOC_LIST`); what it does not know is the daemon's: the
//! process's budget and the redundancy asked for it. A restarted daemon
//! reads both and manages the attachments it made as before (see
//! `Supervisor::take_over`). The file is rewritten whole (a temporary file
//! renamed over it) on every attach and detach: a few lines.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file's name in the state directory.
pub const FILE: &str = "attachments";

/// What the daemon knows of one attachment beyond what the module says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The module's attachment id.
    pub id: u64,
    pub pid: i32,
    /// Most bytes kept in RAM (0: no budget).
    pub budget_bytes: u64,
    /// The redundancy asked for it (`None`: the agent's).
    pub redundancy: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct File {
    version: u32,
    attachments: Vec<Record>,
}

const VERSION: u32 = 1;

/// The record file (none without a state directory).
#[derive(Debug, Clone)]
pub struct Records {
    path: Option<PathBuf>,
}

impl Records {
    pub fn new(state_dir: Option<&Path>) -> Self {
        Self {
            path: state_dir.map(|d| d.join(FILE)),
        }
    }

    /// The records saved last; none if there is no file. A file that
    /// cannot be read or parsed is reported and taken as empty: its
    /// attachments are then taken over with the defaults.
    pub fn load(&self) -> Vec<Record> {
        let Some(path) = &self.path else {
            return Vec::new();
        };
        match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<File>(&bytes) {
                Ok(f) if f.version == VERSION => f.attachments,
                Ok(f) => {
                    tracing::warn!(path = %path.display(), version = f.version, "attachment records of an unknown version: ignored");
                    Vec::new()
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "attachment records unreadable: ignored");
                    Vec::new()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the attachment records");
                Vec::new()
            }
        }
    }

    /// Replaces the records with `records` (a failure is reported: a
    /// restart would then take these attachments over with the defaults).
    pub fn save(&self, records: Vec<Record>) {
        let Some(path) = &self.path else { return };
        let write = || -> io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("new");
            let body = serde_json::to_vec(&File {
                version: VERSION,
                attachments: records,
            })
            .map_err(io::Error::other)?;
            std::fs::write(&tmp, body)?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %path.display(), error = %e, "cannot save the attachment records");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_as_saved_and_a_bad_file_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::new(Some(dir.path()));
        assert!(records.load().is_empty());
        let saved = vec![
            Record {
                id: 3,
                pid: 42,
                budget_bytes: 2 << 20,
                redundancy: Some("replicas=2".into()),
            },
            Record {
                id: 4,
                pid: 43,
                budget_bytes: 0,
                redundancy: None,
            },
        ];
        records.save(saved.clone());
        assert_eq!(records.load(), saved);
        records.save(Vec::new());
        assert!(records.load().is_empty());
        std::fs::write(dir.path().join(FILE), b"{\"version\":1,\"attach").unwrap();
        assert!(records.load().is_empty());
        std::fs::write(dir.path().join(FILE), b"{\"version\":9,\"attachments\":[]}").unwrap();
        assert!(records.load().is_empty());
        // No state directory: nothing kept, nothing read.
        let none = Records::new(None);
        none.save(saved);
        assert!(none.load().is_empty());
    }
}
