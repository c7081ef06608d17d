//! The run journal: what the book knows of where each stored handle is,
//! kept on tmpfs so that a restarted kernel agent knows it too.
//!
//! The module keeps its device pages (and their handles) across an agent
//! restart; without the layout of their runs a new agent could only ask
//! every server for each handle and learn it as a single copy, so a page
//! whose copy or stripe slot was on a server lost since would fail its
//! fault although its other copies or its stripe still hold it. The
//! journal records, as the book changes:
//!
//! - `R`: a run stored (first handle, pages, copies wanted, its layout
//!   when erasure coded, its servers by address, and, once rewritten, its
//!   live counts), before the module commits the eviction;
//! - `F`: handles taken off the book (freed);
//! - `M`: a slot of a run moved to another server (a drain or rebuild).
//!
//! Replayed in order into an empty book they give back the runs, slots and
//! live counts of the last run of the agent (the grants are the
//! coordinator's business). When the file holds many more lines than the
//! book has runs, it is rewritten from the book. A torn last line (the
//! agent died while writing it) is ignored: its batch was not committed.
//! The file names the member it belongs to; another member's (or one from
//! when the module held no page) is started afresh.
//!
//! Text, one record per line, numbers in hexadecimal: small, and readable
//! by an operator who wants to know where a page is.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::book::{Piece, Run, Slot, Slots};
use super::space::replace_file;
use super::stripe::Layout;

/// First line of a journal: the format and the member it belongs to.
const MAGIC: &str = "rmem-runs 1";

/// Lines beyond twice the book's runs before the file is rewritten.
const SLACK: u64 = 4096;

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    Run(Stored),
    Freed(Vec<u64>),
    Moved {
        first: u64,
        slot: usize,
        server: String,
    },
}

/// A run as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    pub first: u64,
    pub pages: u64,
    pub wanted: u8,
    /// Live handles, when not all of them.
    pub live: Option<u64>,
    pub layout: Option<Layout>,
    /// Live data pages per stripe, when not all of them.
    pub stripe_live: Option<Vec<u8>>,
    /// Each slot's server address.
    pub servers: Vec<String>,
}

#[derive(Debug)]
pub(crate) struct Journal {
    path: PathBuf,
    owner: String,
    file: File,
    /// Lines since the file was last written whole.
    lines: u64,
    /// While a rewrite is formatted outside the book's lock
    /// ([`Journal::begin_rewrite`]): what was appended since its snapshot,
    /// to follow the snapshot in the new file.
    tail: Option<String>,
}

/// The runs as a rewrite takes them under the book's lock (cheap: no
/// formatting), to be formatted outside it ([`Snapshot::format`]).
#[derive(Debug)]
pub(crate) struct Snapshot {
    runs: Vec<SnapRun>,
}

#[derive(Debug)]
struct SnapRun {
    first: u64,
    pages: u64,
    wanted: u8,
    live: u64,
    layout: Option<Layout>,
    stripe_live: Option<Vec<u8>>,
    servers: Vec<u8>,
}

impl Snapshot {
    fn of(runs: &BTreeMap<u64, Run>) -> Self {
        Self {
            runs: runs
                .iter()
                .map(|(&first, r)| SnapRun {
                    first,
                    pages: r.pages,
                    wanted: r.wanted,
                    live: r.live,
                    layout: r.striped.as_ref().map(|s| s.layout),
                    stripe_live: r.striped.as_ref().map(|s| s.live.clone()),
                    servers: r.slots.servers().collect(),
                })
                .collect(),
        }
    }

    /// The journal's lines for these runs.
    pub fn format(&self, addr: &dyn Fn(u8) -> String) -> String {
        let mut text = String::new();
        for r in &self.runs {
            let servers: Vec<String> = r.servers.iter().map(|&s| addr(s)).collect();
            text.push_str(&run_line(
                r.first,
                r.pages,
                r.wanted,
                Some(r.live),
                r.layout.as_ref(),
                r.stripe_live.as_deref(),
                &servers,
            ));
        }
        text
    }

    pub fn len(&self) -> usize {
        self.runs.len()
    }
}

impl Journal {
    /// Opens the journal at `path` for `owner`; with `keep`, returns what
    /// it holds (nothing if it is another owner's), else starts it afresh.
    /// The caller replays the entries into its book and then calls
    /// [`Journal::rewrite`].
    pub fn open(path: &Path, owner: &str, keep: bool) -> io::Result<(Self, Vec<Entry>)> {
        let entries = if keep {
            match std::fs::read_to_string(path) {
                Ok(text) => parse(&text, owner),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(e),
            }
        } else {
            Vec::new()
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = fresh(path, owner, "")?;
        let journal = Self {
            path: path.to_owned(),
            owner: owner.to_owned(),
            file,
            lines: 0,
            tail: None,
        };
        Ok((journal, entries))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records stored pieces (every handle live).
    pub fn stored(&mut self, pieces: &[Piece], addr: &dyn Fn(u8) -> String) -> io::Result<()> {
        let mut text = String::new();
        for p in pieces.iter().filter(|p| p.count > 0) {
            let servers: Vec<String> = p.slots.servers().map(addr).collect();
            text.push_str(&run_line(
                p.first,
                p.count as u64,
                p.wanted,
                None,
                p.stripes.as_ref(),
                None,
                &servers,
            ));
        }
        self.append(&text)
    }

    /// Records handles taken off the book.
    pub fn freed(&mut self, handles: &[u64]) -> io::Result<()> {
        if handles.is_empty() {
            return Ok(());
        }
        let mut text = String::from("F");
        for h in handles {
            text.push_str(&format!(" {h:x}"));
        }
        text.push('\n');
        self.append(&text)
    }

    /// Records that slot `slot` of the run at `first` is now on `server`.
    pub fn moved(&mut self, first: u64, slot: usize, server: &str) -> io::Result<()> {
        self.append(&format!("M {first:x} {slot:x} {server}\n"))
    }

    /// Whether the file holds enough lines beyond `runs` records to be
    /// rewritten.
    pub fn due(&self, runs: usize) -> bool {
        self.lines > 2 * runs as u64 + SLACK
    }

    /// Whether the file has grown so far past [`Journal::due`] that the
    /// rewrite cannot wait for the thread that does it outside the lock.
    pub fn overdue(&self, runs: usize) -> bool {
        self.lines > 8 * runs as u64 + 4 * SLACK
    }

    /// Writes the file whole from the book's runs, at once (under the
    /// book's lock: O(runs); see [`Journal::begin_rewrite`]).
    pub fn rewrite(
        &mut self,
        runs: &BTreeMap<u64, Run>,
        addr: &dyn Fn(u8) -> String,
    ) -> io::Result<()> {
        let snapshot = Snapshot::of(runs);
        self.tail = None;
        self.file = fresh(&self.path, &self.owner, &snapshot.format(addr))?;
        self.lines = runs.len() as u64;
        Ok(())
    }

    /// Starts a rewrite: the runs now, to be formatted outside the book's
    /// lock; from here every append is also kept for the new file. `None`
    /// if one is already under way.
    pub fn begin_rewrite(&mut self, runs: &BTreeMap<u64, Run>) -> Option<Snapshot> {
        if self.tail.is_some() {
            return None;
        }
        self.tail = Some(String::new());
        Some(Snapshot::of(runs))
    }

    /// Ends a rewrite (under the book's lock again): the file becomes the
    /// snapshot's lines `body` (`runs` of them) followed by what was
    /// appended since.
    pub fn finish_rewrite(&mut self, body: &str, runs: usize) -> io::Result<()> {
        let Some(tail) = self.tail.take() else {
            return Ok(());
        };
        let tail_lines = tail.bytes().filter(|&b| b == b'\n').count() as u64;
        self.file = fresh(&self.path, &self.owner, &format!("{body}{tail}"))?;
        self.lines = runs as u64 + tail_lines;
        Ok(())
    }

    fn append(&mut self, text: &str) -> io::Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        // One write: a crash leaves whole lines and at most one torn one.
        self.file.write_all(text.as_bytes())?;
        if let Some(tail) = &mut self.tail {
            tail.push_str(text);
        }
        self.lines += text.bytes().filter(|&b| b == b'\n').count() as u64;
        Ok(())
    }
}

/// Replaces the file with the header and `body`; returns it open for
/// appending.
fn fresh(path: &Path, owner: &str, body: &str) -> io::Result<File> {
    replace_file(path, format!("{MAGIC} {owner}\n{body}").as_bytes())?;
    std::fs::OpenOptions::new().append(true).open(path)
}

fn run_line(
    first: u64,
    pages: u64,
    wanted: u8,
    live: Option<u64>,
    layout: Option<&Layout>,
    stripe_live: Option<&[u8]>,
    servers: &[String],
) -> String {
    let live = live
        .filter(|&l| l != pages)
        .map_or("-".into(), |l| format!("{l:x}"));
    let layout = layout.map_or("-".into(), |l| {
        format!("{:x},{:x},{:x}", l.data, l.parity, l.parity_first)
    });
    let stripe_live = stripe_live.map_or("-".into(), |v| {
        v.iter()
            .map(|n| format!("{n:x}"))
            .collect::<Vec<_>>()
            .join(",")
    });
    format!(
        "R {first:x} {pages:x} {wanted:x} {live} {layout} {stripe_live} {}\n",
        servers.join(",")
    )
}

/// The entries of a journal's text, if it is `owner`'s; lines that do not
/// parse (a torn last one) are left out.
fn parse(text: &str, owner: &str) -> Vec<Entry> {
    let mut lines = text.split_inclusive('\n');
    let header = format!("{MAGIC} {owner}\n");
    if lines.next() != Some(header.as_str()) {
        return Vec::new();
    }
    lines
        .filter_map(|l| l.strip_suffix('\n'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Entry> {
    let hex = |s: &str| u64::from_str_radix(s, 16).ok();
    let mut f = line.split(' ');
    match f.next()? {
        "F" => f.map(hex).collect::<Option<Vec<u64>>>().map(Entry::Freed),
        "M" => {
            let (first, slot, server) = (hex(f.next()?)?, hex(f.next()?)?, f.next()?);
            (f.next().is_none() && !server.is_empty()).then(|| Entry::Moved {
                first,
                slot: slot as usize,
                server: server.to_owned(),
            })
        }
        "R" => {
            let first = hex(f.next()?)?;
            let pages = hex(f.next()?)?;
            let wanted = u8::try_from(hex(f.next()?)?).ok()?;
            let live = match f.next()? {
                "-" => None,
                l => Some(hex(l)?),
            };
            let layout = match f.next()? {
                "-" => None,
                l => {
                    let v: Vec<u64> = l.split(',').map(hex).collect::<Option<_>>()?;
                    let [data, parity, parity_first] = v[..] else {
                        return None;
                    };
                    Some(Layout {
                        first,
                        count: pages,
                        data: u8::try_from(data).ok()?,
                        parity: u8::try_from(parity).ok()?,
                        parity_first,
                    })
                }
            };
            let stripe_live = match f.next()? {
                "-" => None,
                l => Some(
                    l.split(',')
                        .map(|n| hex(n).and_then(|n| u8::try_from(n).ok()))
                        .collect::<Option<Vec<u8>>>()?,
                ),
            };
            let servers: Vec<String> = f.next()?.split(',').map(str::to_owned).collect();
            let sane = f.next().is_none()
                && pages > 0
                && live.is_none_or(|l| l <= pages)
                && !servers.is_empty()
                && servers.len() <= super::book::MAX_SHARDS
                && servers.iter().all(|s| !s.is_empty())
                && layout.is_none_or(|l| {
                    l.data > 1 && l.width() == servers.len() && usize::from(l.parity) >= 1
                })
                && stripe_live
                    .as_ref()
                    .is_none_or(|v| layout.is_some_and(|l| v.len() as u64 == l.stripes()));
            sane.then_some(Entry::Run(Stored {
                first,
                pages,
                wanted,
                live,
                layout,
                stripe_live,
                servers,
            }))
        }
        _ => None,
    }
}

/// Replays `entries` into an empty `book`, servers named by `index`;
/// returns the runs it then holds and those left out (a server no longer
/// known: their handles are looked for on a fault, as before).
pub(crate) fn replay(
    entries: Vec<Entry>,
    book: &mut super::book::Book,
    index: &dyn Fn(&str) -> Option<u8>,
) -> (usize, usize) {
    let mut skipped = 0;
    for e in entries {
        match e {
            Entry::Run(s) => {
                let Some(indices) = s
                    .servers
                    .iter()
                    .map(|a| index(a))
                    .collect::<Option<Vec<u8>>>()
                else {
                    skipped += 1;
                    continue;
                };
                let mut slots = Slots::default();
                for server in indices {
                    slots.push(Slot {
                        server,
                        grant: None,
                    });
                }
                book.record(&[Piece {
                    first: s.first,
                    count: s.pages as usize,
                    slots,
                    stripes: s.layout,
                    wanted: s.wanted,
                }]);
                let run = book.runs.get_mut(&s.first).expect("just recorded");
                if let Some(live) = s.live {
                    run.live = live;
                }
                if let (Some(v), Some(st)) = (s.stripe_live, run.striped.as_mut()) {
                    st.live = v;
                }
                if run.live == 0 {
                    book.runs.remove(&s.first);
                }
            }
            Entry::Freed(handles) => {
                for h in handles {
                    book.forget(h);
                }
            }
            Entry::Moved {
                first,
                slot,
                server,
            } => {
                let to = index(&server);
                let Some(run) = book.runs.get_mut(&first) else {
                    continue;
                };
                match to {
                    Some(to) if slot < run.slots.len() && !run.slots.has_server(to) => {
                        *run.slots.slot_mut(slot) = Slot {
                            server: to,
                            grant: None,
                        };
                    }
                    // Moved to a server no longer known, or nonsense: the
                    // run is forgotten (its handles are looked for).
                    _ => {
                        book.runs.remove(&first);
                        skipped += 1;
                    }
                }
            }
        }
    }
    (book.runs.len(), skipped)
}

#[cfg(test)]
mod tests {
    use super::super::book::Book;
    use super::*;

    fn piece(first: u64, count: usize, servers: &[u8], layout: Option<Layout>) -> Piece {
        let mut slots = Slots::default();
        for &s in servers {
            slots.push(Slot {
                server: s,
                grant: Some(0),
            });
        }
        Piece {
            first,
            count,
            slots,
            stripes: layout,
            wanted: servers.len() as u8,
        }
    }

    fn addr(i: u8) -> String {
        format!("10.0.0.{i}:7480")
    }

    fn index(a: &str) -> Option<u8> {
        a.strip_prefix("10.0.0.")?
            .strip_suffix(":7480")?
            .parse()
            .ok()
    }

    /// A run as (first, pages, live, servers, stripe live).
    type Shape = (u64, u64, u64, Vec<u8>, Option<Vec<u8>>);

    /// The book's runs.
    fn shape(b: &Book) -> Vec<Shape> {
        b.runs
            .iter()
            .map(|(&f, r)| {
                (
                    f,
                    r.pages,
                    r.live,
                    r.slots.servers().collect(),
                    r.striped.as_ref().map(|s| s.live.clone()),
                )
            })
            .collect()
    }

    fn reload(path: &Path, owner: &str) -> Book {
        // As the agent does: replayed, then written whole from the book.
        let (mut j, entries) = Journal::open(path, owner, true).unwrap();
        let mut b = Book::default();
        replay(entries, &mut b, &index);
        j.rewrite(&b.runs, &addr).unwrap();
        b
    }

    /// A book changed by stores, frees and moves comes back the same from
    /// its journal, appended to or rewritten, and a torn last line or
    /// another member's file changes nothing.
    #[test]
    fn a_replayed_journal_gives_back_the_book() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs");
        let (mut j, entries) = Journal::open(&path, "node/kmod", true).unwrap();
        assert!(entries.is_empty());
        let mut book = Book::default();
        let layout = Layout {
            first: 100,
            count: 7,
            data: 2,
            parity: 1,
            parity_first: 900,
        };
        let pieces = [
            piece(10, 5, &[1, 2], None),
            piece(100, 7, &[3, 4, 5], Some(layout)),
            piece(200, 3, &[6], None),
        ];
        book.record(&pieces);
        j.stored(&pieces, &addr).unwrap();
        let freed = [11, 12, 100, 101, 102, 200, 201, 202];
        for h in freed {
            book.forget(h);
        }
        j.freed(&freed).unwrap();
        *book.runs.get_mut(&10).unwrap().slots.slot_mut(1) = Slot {
            server: 7,
            grant: None,
        };
        j.moved(10, 1, &addr(7)).unwrap();
        let want = shape(&book);
        assert_eq!(want.len(), 2, "the third run died whole");
        assert_eq!(shape(&reload(&path, "node/kmod")), want);
        // Rewritten from the book: the same, in a line per run.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert_eq!(shape(&reload(&path, "node/kmod")), want);
        // A torn last line is left out.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"F d")
            .unwrap();
        assert_eq!(shape(&reload(&path, "node/kmod")), want);
        // Another member's journal, or none kept: nothing.
        assert!(shape(&reload(&path, "other/kmod")).is_empty());
        Journal::open(&path, "node/kmod", false).unwrap();
        assert!(shape(&reload(&path, "node/kmod")).is_empty());
    }

    /// A run with a server no longer known, or moved to one, is left out
    /// (its handles are looked for as before); nonsense lines are ignored.
    #[test]
    fn runs_on_unknown_servers_and_bad_lines_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs");
        let (mut j, _) = Journal::open(&path, "n", true).unwrap();
        j.stored(&[piece(10, 2, &[1], None), piece(20, 2, &[2], None)], &addr)
            .unwrap();
        j.append("R 30 2 1 - - - elsewhere:1\nM 14 0 elsewhere:1\nR zz\nQ 1\nR 40 0 1 - - - 10.0.0.1:7480\n")
            .unwrap();
        let (_, entries) = Journal::open(&path, "n", true).unwrap();
        let mut b = Book::default();
        let (restored, skipped) = replay(entries, &mut b, &index);
        assert_eq!(b.runs.keys().copied().collect::<Vec<_>>(), vec![10]);
        assert_eq!((restored, skipped), (1, 2));
    }

    #[test]
    fn it_is_due_for_a_rewrite_past_twice_the_runs() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(&dir.path().join("runs"), "n", false).unwrap();
        for h in 0..SLACK + 10 {
            j.freed(&[h]).unwrap();
        }
        assert!(j.due(4));
        assert!(!j.due(10_000));
    }

    /// A rewrite formatted outside the lock: what is appended between its
    /// snapshot and its end follows the snapshot in the new file, so the
    /// replay gives back the book as it is at the end.
    #[test]
    fn a_rewrite_outside_the_lock_keeps_what_came_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs");
        let (mut j, _) = Journal::open(&path, "node/kmod", true).unwrap();
        let mut book = Book::default();
        let first = [piece(10, 5, &[1, 2], None), piece(20, 4, &[3], None)];
        book.record(&first);
        j.stored(&first, &addr).unwrap();
        for h in [11, 12] {
            book.forget(h);
        }
        j.freed(&[11, 12]).unwrap();
        let snapshot = j.begin_rewrite(&book.runs).expect("none under way");
        assert!(j.begin_rewrite(&book.runs).is_none(), "one at a time");
        // Meanwhile (the lock released): a store, frees, a move.
        let later = [piece(30, 2, &[2, 3], None)];
        book.record(&later);
        j.stored(&later, &addr).unwrap();
        for h in [13, 20] {
            book.forget(h);
        }
        j.freed(&[13, 20]).unwrap();
        book.runs.get_mut(&10).unwrap().slots.slot_mut(1).server = 4;
        j.moved(10, 1, &addr(4)).unwrap();
        let body = snapshot.format(&addr);
        j.finish_rewrite(&body, snapshot.len()).unwrap();
        assert_eq!(j.lines, 2 + 3);
        // Finishing with none under way changes nothing.
        j.finish_rewrite("", 0).unwrap();
        assert_eq!(shape(&reload(&path, "node/kmod")), shape(&book));
    }
}
