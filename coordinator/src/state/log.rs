//! An append-only file of records.
//!
//! Each record is `u32 length | u32 CRC32C of the body | body (JSON)`,
//! little-endian, and is flushed to disk (`fdatasync`) before the change it
//! describes is acknowledged. A crash can leave a damaged tail: a torn
//! record, or zeros or garbage in blocks the file system allocated but did
//! not write. On load, damage with no valid record after it is such a
//! tail: it is saved beside the log (`NAME.damaged-SECONDS`), logged as an
//! error, and cut off (nothing in it was acknowledged). Damage followed by
//! a valid record is corruption and stops the coordinator rather than
//! silently losing registrations.
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

/// The record at the start of `rest`, with its size, if one is there
/// whole: a length within bounds and not zero (no record is empty), the
/// body's checksum, and a body that decodes. Why not, otherwise.
fn record_at(rest: &[u8]) -> Result<(Record, usize), String> {
    if rest.len() < 8 {
        return Err(format!("{} stray bytes", rest.len()));
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    if len == 0 {
        return Err("a record of length 0 (zero-filled?)".into());
    }
    if len > MAX_RECORD {
        return Err(format!("length {len} exceeds {MAX_RECORD}"));
    }
    if rest.len() < 8 + len {
        return Err(format!("record of {len} bytes cut short"));
    }
    let body = &rest[8..8 + len];
    if crc32c::crc32c(body) != crc {
        return Err("checksum mismatch".into());
    }
    let record = serde_json::from_slice(body).map_err(|e| format!("undecodable body: {e}"))?;
    Ok((record, 8 + len))
}

/// Where in `bytes`, from `from` on, a whole valid record starts, if
/// anywhere. Random bytes rarely pass the length bound (1 in 4096) and
/// almost never the checksum, so this is a scan, not a search of lengths.
fn next_record(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len().saturating_sub(8)).find(|&at| record_at(&bytes[at..]).is_ok())
}

/// Parses a log image. Damage with no whole record after it is a damaged
/// tail: a torn last write, or the zeros or garbage a crash leaves in
/// blocks the file system had allocated but not written. Nothing in it was
/// acknowledged, so it is cut off (as etcd's WAL repair does). Damage
/// followed by a valid record is corruption: cutting there would silently
/// drop acknowledged registrations, so it is an error.
fn parse(bytes: &[u8], path: &Path) -> Result<Parsed, StateError> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match record_at(&bytes[at..]) {
            Ok((record, size)) => {
                records.push(record);
                at += size;
            }
            Err(reason) => {
                if let Some(next) = next_record(bytes, at + 1) {
                    return Err(StateError::Corrupt {
                        path: path.display().to_string(),
                        index: records.len(),
                        reason: format!(
                            "{reason} at byte {at}, yet a valid record follows at byte {next}"
                        ),
                    });
                }
                return Ok(Parsed {
                    records,
                    good_len: at,
                    torn: Some(format!("{reason} at byte {at}")),
                });
            }
        }
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
            // The cut bytes go to a file beside the log first, for a look.
            let mut kept = self.path.as_os_str().to_owned();
            kept.push(format!(
                ".damaged-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            ));
            let kept = PathBuf::from(kept);
            std::fs::write(&kept, &bytes[parsed.good_len..]).map_err(|e| io(&kept, e))?;
            tracing::error!(
                path = %self.path.display(), kept_records = parsed.records.len(),
                cut_bytes = bytes.len() - parsed.good_len, saved_to = %kept.display(), %reason,
                "the state log ends in damage with no valid record after it (a torn write or \
                 a crash's zeros or garbage, never acknowledged): cutting it off"
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
                request: 0,
                of: 0,
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
    fn a_zero_filled_or_garbage_tail_is_cut_off_and_kept_aside() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(23);
        let mut garbage = vec![0u8; 64 * 1024];
        rng.fill(&mut garbage[..]);
        for (what, tail) in [("zeros", vec![0u8; 8192]), ("garbage", garbage)] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.log");
            let mut log = FileLog::open(&path).unwrap();
            for id in 1..=3 {
                log.append(&grant(id)).unwrap();
            }
            drop(log);
            let good = std::fs::read(&path).unwrap();
            let mut damaged = good.clone();
            damaged.extend_from_slice(&tail);
            std::fs::write(&path, &damaged).unwrap();
            let mut log = FileLog::open(&path).unwrap();
            let want: Vec<Record> = (1..=3).map(grant).collect();
            assert_eq!(log.load().unwrap(), want, "{what}");
            assert_eq!(
                std::fs::read(&path).unwrap(),
                good,
                "{what}: cut to the last record"
            );
            let saved: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.to_string_lossy().contains(".damaged-"))
                .collect();
            assert_eq!(saved.len(), 1, "{what}: {saved:?}");
            assert_eq!(std::fs::read(&saved[0]).unwrap(), tail, "{what}");
            log.append(&grant(4)).unwrap();
            drop(log);
            let mut log = FileLog::open(&path).unwrap();
            assert_eq!(log.load().unwrap().len(), 4, "{what}: appends go on");
        }
    }

    #[test]
    fn garbage_followed_by_a_valid_record_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.log");
        let mut log = FileLog::open(&path).unwrap();
        log.append(&grant(1)).unwrap();
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[0xAB; 100]);
        encode(&grant(2), &mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        let err = FileLog::open(&path).unwrap().load().unwrap_err();
        assert!(matches!(err, StateError::Corrupt { index: 1, .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing was cut");
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
