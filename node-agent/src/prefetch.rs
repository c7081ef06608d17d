//! Stream detection for prefetching, in the spirit of Leap (Al Maruf and
//! Chowdhury, ATC '20): watch the page numbers of accesses that reach the
//! agent, find a stride that repeats, and fetch ahead along it with a window
//! that doubles while the stream holds and collapses when it breaks.
//!
//! Accesses the agent sees are remote faults and first touches of
//! prefetched pages (minor faults), so a stream keeps being observed while
//! it runs through prefetched pages.

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

/// One detector per faulting thread, so threads that each scan their own
/// part of a region are each seen as a stream.
#[derive(Debug)]
pub struct Streams {
    max: usize,
    by_thread: std::collections::HashMap<u32, Detector>,
}

impl Streams {
    /// Streams fetching at most `max` pages ahead (0 disables).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            by_thread: std::collections::HashMap::new(),
        }
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
    fn disabled_detector_never_prefetches() {
        let mut d = Detector::new(0);
        for p in 0..10 {
            assert_eq!(d.observe(p), Ahead::NONE);
        }
    }
}
