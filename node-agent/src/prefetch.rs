//! Stream detection for prefetching, in the spirit of Leap (Al Maruf and
//! Chowdhury, ATC '20): watch the page numbers of accesses that reach the
//! agent, find a stride that repeats, and fetch ahead along it with a window
//! that doubles while the stream holds and collapses when it breaks.
//!
//! Accesses the agent sees are remote faults and first touches of
//! prefetched pages (minor faults), so a stream keeps being observed while
//! it runs through prefetched pages. A sequential window is mapped ahead of
//! the program but for its last page, the *marker*: the stream runs through
//! the window with no fault, and the detector is told so
//! ([`Streams::mapped_ahead`]); the marker's touch counts the window's
//! pages as used ([`Streams::reached`]).

/// Largest stride (in pages) treated as a stream.
pub const MAX_STRIDE: i64 = 16;

/// What to fetch ahead of a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ahead {
    pub stride: i64,
    pub count: usize,
}

impl Ahead {
    /// No prefetch.
    pub const NONE: Ahead = Ahead {
        stride: 0,
        count: 0,
    };

    /// The pages to fetch after `page`, inside `0..pages`.
    pub fn pages(self, page: usize, pages: usize) -> impl Iterator<Item = usize> {
        (1..=self.count as i64)
            .map(move |k| page as i64 + k * self.stride)
            .take_while(move |&p| p >= 0 && (p as usize) < pages)
            .map(|p| p as usize)
    }
}

/// Most threads tracked at once; past it the table starts over.
const MAX_STREAMS: usize = 256;

/// Most windows mapped ahead whose marker was not touched yet; past it
/// the oldest are forgotten (their pages then never count as used).
const MAX_WINDOWS: usize = 1024;

/// One detector per faulting thread, so threads that each scan their own
/// part of a region are each seen as a stream.
#[derive(Debug)]
pub struct Streams {
    max: usize,
    by_thread: std::collections::HashMap<u32, Detector>,
    /// Windows mapped ahead: marker page -> pages mapped before it.
    windows: std::collections::BTreeMap<usize, u64>,
}

impl Streams {
    /// Streams fetching at most `max` pages ahead (0 disables).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            by_thread: std::collections::HashMap::new(),
            windows: std::collections::BTreeMap::new(),
        }
    }

    /// Thread `tid`'s stream is mapped ahead up to `last` (so it runs on
    /// with no fault until `marker`, left unmapped), `mapped` pages. The
    /// stream's next access continues it.
    pub fn mapped_ahead(&mut self, tid: u32, last: usize, marker: usize, mapped: u64) {
        if let Some(d) = self.by_thread.get_mut(&tid) {
            d.advance(last);
        }
        if self.windows.len() >= MAX_WINDOWS {
            self.windows.pop_first();
        }
        self.windows.insert(marker, mapped);
    }

    /// `n` pages of the window of `marker` could not be mapped after all.
    pub fn not_mapped(&mut self, marker: usize, n: u64) {
        if let Some(m) = self.windows.get_mut(&marker) {
            *m = m.saturating_sub(n);
        }
    }

    /// The marker page `page` was touched: the pages mapped ahead before
    /// it (0 if it is no marker).
    pub fn reached(&mut self, page: usize) -> u64 {
        self.windows.remove(&page).unwrap_or(0)
    }

    /// Records an access to `page` by thread `tid`.
    pub fn observe(&mut self, tid: u32, page: usize) -> Ahead {
        if self.by_thread.len() >= MAX_STREAMS && !self.by_thread.contains_key(&tid) {
            self.by_thread.clear();
        }
        let max = self.max;
        self.by_thread
            .entry(tid)
            .or_insert_with(|| Detector::new(max))
            .observe(page)
    }
}

/// Stream detector of one thread.
#[derive(Debug)]
pub struct Detector {
    max: usize,
    last: Option<usize>,
    stride: i64,
    streak: u32,
}

impl Detector {
    /// A detector fetching at most `max` pages ahead (0 disables).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            last: None,
            stride: 0,
            streak: 0,
        }
    }

    /// The stream ran on to `page` along its stride with no fault seen
    /// (pages mapped ahead of it): the next access after it continues the
    /// stream. Anything else is ignored.
    pub fn advance(&mut self, page: usize) {
        let Some(last) = self.last else { return };
        let delta = page as i64 - last as i64;
        if self.stride != 0 && delta % self.stride == 0 && delta / self.stride > 0 {
            self.last = Some(page);
        }
    }

    /// Records an access to `page` and says what to fetch ahead of it.
    pub fn observe(&mut self, page: usize) -> Ahead {
        let delta = self.last.map_or(0, |l| page as i64 - l as i64);
        self.last = Some(page);
        if delta != 0 && delta == self.stride && delta.abs() <= MAX_STRIDE {
            self.streak = self.streak.saturating_add(1);
        } else {
            self.stride = delta;
            self.streak = 0;
        }
        if self.max == 0 || self.streak == 0 {
            return Ahead::NONE;
        }
        Ahead {
            stride: self.stride,
            count: (1usize << self.streak.min(16)).min(self.max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_stream_grows_the_window() {
        let mut d = Detector::new(32);
        assert_eq!(d.observe(10), Ahead::NONE);
        assert_eq!(d.observe(11), Ahead::NONE);
        assert_eq!(
            d.observe(12),
            Ahead {
                stride: 1,
                count: 2
            }
        );
        assert_eq!(d.observe(13).count, 4);
        for p in 14..30 {
            d.observe(p);
        }
        assert_eq!(d.observe(30).count, 32);
    }

    #[test]
    fn strided_and_backward_streams() {
        let mut d = Detector::new(8);
        d.observe(100);
        d.observe(104);
        assert_eq!(
            d.observe(108),
            Ahead {
                stride: 4,
                count: 2
            }
        );
        let mut d = Detector::new(8);
        d.observe(50);
        d.observe(49);
        let a = d.observe(48);
        assert_eq!(
            a,
            Ahead {
                stride: -1,
                count: 2
            }
        );
        assert_eq!(a.pages(48, 100).collect::<Vec<_>>(), [47, 46]);
        assert_eq!(a.pages(1, 100).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn random_access_never_prefetches() {
        let mut d = Detector::new(32);
        for p in [5, 900, 17, 3000, 42, 7, 1234] {
            assert_eq!(d.observe(p), Ahead::NONE);
        }
        // Huge strides are not streams.
        let mut d = Detector::new(32);
        for p in (0..10).map(|k| k * 1000) {
            assert_eq!(d.observe(p), Ahead::NONE);
        }
    }

    #[test]
    fn broken_stream_collapses_the_window() {
        let mut d = Detector::new(32);
        for p in 0..10 {
            d.observe(p);
        }
        assert_eq!(d.observe(500), Ahead::NONE);
        assert_eq!(d.observe(501), Ahead::NONE);
        assert_eq!(d.observe(502).count, 2);
    }

    #[test]
    fn threads_are_separate_streams() {
        let mut s = Streams::new(8);
        for k in 0..3 {
            s.observe(1, 100 + k);
            s.observe(2, 5000 + k);
        }
        assert_eq!(s.observe(1, 103).count, 4);
        assert_eq!(s.observe(2, 5003).count, 4);
    }

    #[test]
    fn a_window_mapped_ahead_continues_the_stream_and_counts_at_its_marker() {
        let mut s = Streams::new(8);
        for p in 0..4 {
            s.observe(1, p);
        }
        // Pages 4..=10 mapped, 11 the marker: the touch of 11 continues
        // the stream at its full window.
        s.mapped_ahead(1, 10, 11, 7);
        assert_eq!(s.observe(1, 11).count, 8);
        assert_eq!(s.reached(11), 7);
        assert_eq!(s.reached(11), 0);
        assert_eq!(s.reached(12), 0);
        // Backwards or off the stride: nothing moves.
        let mut d = Detector::new(8);
        for p in [100, 98, 96] {
            d.observe(p);
        }
        d.advance(97);
        d.advance(120);
        assert_eq!(d.observe(94).count, 4);
        // Old windows go first past the limit.
        for m in 0..MAX_WINDOWS + 1 {
            s.mapped_ahead(9, 0, 1000 + m, 1);
        }
        assert_eq!(s.reached(1000), 0);
        assert_eq!(s.reached(1001), 1);
    }

    #[test]
    fn disabled_detector_never_prefetches() {
        let mut d = Detector::new(0);
        for p in 0..10 {
            assert_eq!(d.observe(p), Ahead::NONE);
        }
    }
}
