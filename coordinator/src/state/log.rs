//! An append-only file of records.
//!
//! Each record is `u32 length | u32 CRC32C of the body | body (JSON)`,
//! little-endian, and is flushed to disk (`fdatasync`) before the change it
//! describes is acknowledged. A crash can leave a torn record at the end:
//! on load it is detected by its length or checksum, logged, and cut off
//! (it was never acknowledged). A bad record anywhere else is corruption
//! and stops the coordinator rather than silently losing registrations.
//!
//! Compaction writes a snapshot to `NAME.tmp`, syncs it, renames it over
//! the log and syncs the directory, so the log is always either the old or
//! the new one.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::{Record, StateError, StateStore};

/// Largest record accepted when reading (a registration is a few hundred
/// bytes; anything near this is damage).
const MAX_RECORD: usize = 1 << 20;

/// The file-backed [`StateStore`].
#[derive(Debug)]
pub struct FileLog {
    path: PathBuf,
    file: File,
    appended: usize,
}

impl FileLog {
    /// Opens (creating if needed) the log at `path`.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            appended: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn io(path: &Path, source: std::io::Error) -> StateError {
    StateError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn encode(record: &Record, out: &mut Vec<u8>) {
    let body = serde_json::to_vec(record).expect("records serialize");
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
}

/// Outcome of parsing a log image.
#[derive(Debug)]
struct Parsed {
    records: Vec<Record>,
    /// Bytes of whole, valid records.
    good_len: usize,
    /// Why parsing stopped before the end, if it did.
    torn: Option<String>,
}

fn parse(bytes: &[u8], path: &Path) -> Result<Parsed, StateError> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let torn = |reason: String| Parsed {
            records: Vec::new(),
            good_len: at,
            torn: Some(reason),
        };
        if rest.len() < 8 {
            return Ok(Parsed {
                records,
                ..torn(format!("{} stray bytes", rest.len()))
            });
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        if len > MAX_RECORD || rest.len() < 8 + len {
            // Only a torn tail may be short; a huge length mid-file is damage
            // that the checksum of the next record would not explain.
            if len <= MAX_RECORD {
                return Ok(Parsed {
                    records,
                    ..torn(format!("record of {len} bytes cut short"))
                });
            }
            return Err(StateError::Corrupt {
                path: path.display().to_string(),
                index: records.len(),
                reason: format!("length {len} exceeds {MAX_RECORD}"),
            });
        }
        let body = &rest[8..8 + len];
        if crc32c::crc32c(body) != crc {
            if at + 8 + len == bytes.len() {
                return Ok(Parsed {
                    records,
                    ..torn("checksum mismatch in the last record".into())
                });
            }
            return Err(StateError::Corrupt {
                path: path.display().to_string(),
                index: records.len(),
                reason: "checksum mismatch".into(),
            });
        }
        let record = serde_json::from_slice(body).map_err(|e| StateError::Corrupt {
            path: path.display().to_string(),
            index: records.len(),
            reason: e.to_string(),
        })?;
        records.push(record);
        at += 8 + len;
    }
    Ok(Parsed {
        records,
        good_len: at,
        torn: None,
    })
}

impl StateStore for FileLog {
    fn load(&mut self) -> Result<Vec<Record>, StateError> {
        let mut bytes = Vec::new();
        let mut f = File::open(&self.path).map_err(|e| io(&self.path, e))?;
        f.read_to_end(&mut bytes).map_err(|e| io(&self.path, e))?;
        let parsed = parse(&bytes, &self.path)?;
        if let Some(reason) = parsed.torn {
            tracing::warn!(
                path = %self.path.display(), kept = parsed.records.len(), %reason,
                "cutting a torn record off the end of the state log (it was never acknowledged)"
            );
            self.file
                .set_len(parsed.good_len as u64)
                .and_then(|()| self.file.sync_data())
                .map_err(|e| io(&self.path, e))?;
        }
        self.appended = 0;
        Ok(parsed.records)
    }

    fn append(&mut self, record: &Record) -> Result<(), StateError> {
        let mut buf = Vec::with_capacity(256);
        encode(record, &mut buf);
        let before = self.file.metadata().map_err(|e| io(&self.path, e))?.len();
        let written = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // A partial record (disk full) followed by later good ones would
            // read as damage mid-file: cut it off now.
            let _ = self
                .file
                .set_len(before)
                .and_then(|()| self.file.sync_data());
            return Err(io(&self.path, e));
        }
        self.appended += 1;
        Ok(())
    }

    fn compact(&mut self, snapshot: &[Record]) -> Result<(), StateError> {
        let mut tmp_name = self.path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let mut buf = Vec::new();
        for r in snapshot {
            encode(r, &mut buf);
        }
        let write = || -> std::io::Result<File> {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
            OpenOptions::new().read(true).append(true).open(&self.path)
        };
        self.file = write().map_err(|e| io(&self.path, e))?;
        self.appended = 0;
        Ok(())
    }

    fn appended(&self) -> usize {
        self.appended
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{GrantRecord, Record};

    fn grant(id: u64) -> Record {
        Record::GrantAdd {
            grant: GrantRecord {
                id,
                agent: 1,
                server: 2,
                tenant: "t".into(),
                pages: 10 * id,
            },
        }
    }

    #[test]
    fn records_survive_reopen_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.log");
        let mut log = FileLog::open(&path).unwrap();
        assert!(log.load().unwrap().is_empty());
        for id in 1..=5 {
            log.append(&grant(id)).unwrap();
        }
        assert_eq!(log.appended(), 5);
        drop(log);
        let mut log = FileLog::open(&path).unwrap();
        let got = log.load().unwrap();
        assert_eq!(got, (1..=5).map(grant).collect::<Vec<_>>());
        log.compact(&[grant(9)]).unwrap();
        log.append(&grant(10)).unwrap();
        drop(log);
        let mut log = FileLog::open(&path).unwrap();
        assert_eq!(log.load().unwrap(), vec![grant(9), grant(10)]);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.log");
        let mut log = FileLog::open(&path).unwrap();
        for id in 1..=3 {
            log.append(&grant(id)).unwrap();
        }
        drop(log);
        let full = std::fs::read(&path).unwrap();
        for cut in [1, 5, 9, 20] {
            std::fs::write(&path, &full[..full.len() - cut]).unwrap();
            let mut log = FileLog::open(&path).unwrap();
            assert_eq!(log.load().unwrap(), vec![grant(1), grant(2)], "cut {cut}");
            log.append(&grant(4)).unwrap();
            drop(log);
            let mut log = FileLog::open(&path).unwrap();
            assert_eq!(log.load().unwrap(), vec![grant(1), grant(2), grant(4)]);
        }
    }

    #[test]
    fn damage_in_the_middle_is_an_error_not_a_silent_loss() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.log");
        let mut log = FileLog::open(&path).unwrap();
        for id in 1..=3 {
            log.append(&grant(id)).unwrap();
        }
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[12] ^= 0xff; // inside the first record's body
        std::fs::write(&path, &bytes).unwrap();
        let err = FileLog::open(&path).unwrap().load().unwrap_err();
        assert!(matches!(err, StateError::Corrupt { index: 0, .. }), "{err}");
    }
}
