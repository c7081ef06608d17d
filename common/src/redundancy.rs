//! Redundancy policies: how many copies of an evicted page the servers
//! hold, so that losing a server loses no page.
//!
//! - `none`: one copy. A lost server loses its pages (the program gets
//!   SIGBUS after the fault timeout).
//! - `replicas=N`: N copies on N distinct servers (N from 2 to
//!   [`MAX_COPIES`]); survives the loss of N-1 servers. A fault reads one
//!   copy, so a degraded read costs what a healthy one does.
//! - `ec=K+M`: erasure coding. The pages of one eviction batch are cut into
//!   stripes of K data pages plus M parity pages (Reed-Solomon), each on
//!   one of K+M distinct servers; survives the loss of any M servers for
//!   (K+M)/K of the memory (ec=4+2: 1.5x, against 2x for `replicas=2`
//!   with one loss tolerated and 3x for two). A healthy read costs one
//!   page; a degraded one reads K pages and decodes.
//!
//! Written as operators write them (`replicas=2`, `ec=4+2`); `FromStr` and
//! `Display` round-trip.

use std::fmt;
use std::str::FromStr;

/// Most copies of one page.
pub const MAX_COPIES: usize = 4;

/// Most data pages in one erasure-coded stripe.
pub const MAX_DATA: usize = 8;

/// Most parity pages in one erasure-coded stripe.
pub const MAX_PARITY: usize = 4;

/// Most servers one piece of a batch is stored on (copies, or data plus
/// parity pages of its stripes).
pub const MAX_SHARDS: usize = MAX_DATA + MAX_PARITY;

/// How many copies of each page the servers hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Redundancy {
    /// One copy.
    #[default]
    None,
    /// This many copies, on as many distinct servers.
    Replicas(u8),
    /// Stripes of `data` pages and `parity` pages, each page of a stripe on
    /// a distinct server.
    Erasure { data: u8, parity: u8 },
}

impl Redundancy {
    /// Distinct servers each page's redundancy spans: its copies, or the
    /// data and parity pages of its stripe.
    pub fn copies(self) -> usize {
        match self {
            Redundancy::None => 1,
            Redundancy::Replicas(n) => usize::from(n),
            Redundancy::Erasure { data, parity } => usize::from(data + parity),
        }
    }

    /// Data pages per stripe (1 when pages are copied whole).
    pub fn data(self) -> usize {
        match self {
            Redundancy::Erasure { data, .. } => usize::from(data),
            _ => 1,
        }
    }

    /// Whether pages are erasure-coded.
    pub fn is_erasure(self) -> bool {
        matches!(self, Redundancy::Erasure { .. })
    }

    /// Servers that may be lost without losing a page.
    pub fn tolerates(self) -> usize {
        self.copies() - self.data()
    }

    /// Remote pages held per page stored, with every stripe full.
    pub fn overhead(self) -> f64 {
        self.copies() as f64 / self.data() as f64
    }
}

impl fmt::Display for Redundancy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Redundancy::None => f.write_str("none"),
            Redundancy::Replicas(n) => write!(f, "replicas={n}"),
            Redundancy::Erasure { data, parity } => write!(f, "ec={data}+{parity}"),
        }
    }
}

/// Why a policy does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{given}` is not a redundancy policy: {why} (write `none`, `replicas=N` with N from 2 to {MAX_COPIES}, or `ec=K+M` with K from 2 to {MAX_DATA} and M from 1 to {MAX_PARITY})"
)]
pub struct ParseRedundancyError {
    given: String,
    why: &'static str,
}

impl FromStr for Redundancy {
    type Err = ParseRedundancyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| ParseRedundancyError {
            given: s.to_string(),
            why,
        };
        let t = s.trim();
        if t.eq_ignore_ascii_case("none") {
            return Ok(Redundancy::None);
        }
        if let Some(km) = t.strip_prefix("ec=") {
            let (k, m) = km.split_once('+').ok_or_else(|| err("K+M has no `+`"))?;
            let k: u8 = k.trim().parse().map_err(|_| err("K is not a number"))?;
            let m: u8 = m.trim().parse().map_err(|_| err("M is not a number"))?;
            if !(2..=MAX_DATA).contains(&usize::from(k)) {
                return Err(err("K is out of range"));
            }
            if !(1..=MAX_PARITY).contains(&usize::from(m)) {
                return Err(err("M is out of range"));
            }
            return Ok(Redundancy::Erasure { data: k, parity: m });
        }
        let Some(n) = t.strip_prefix("replicas=") else {
            return Err(err("unknown policy"));
        };
        let n: u8 = n.parse().map_err(|_| err("N is not a number"))?;
        match usize::from(n) {
            1 => Ok(Redundancy::None),
            2..=MAX_COPIES => Ok(Redundancy::Replicas(n)),
            _ => Err(err("N is out of range")),
        }
    }
}

impl serde::Serialize for Redundancy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Redundancy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print_back() {
        for (text, want) in [
            ("none", Redundancy::None),
            ("replicas=1", Redundancy::None),
            ("replicas=2", Redundancy::Replicas(2)),
            (" replicas=4 ", Redundancy::Replicas(4)),
            ("ec=4+2", Redundancy::Erasure { data: 4, parity: 2 }),
            ("ec=8+2", Redundancy::Erasure { data: 8, parity: 2 }),
        ] {
            let got: Redundancy = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string().parse::<Redundancy>().unwrap(), got);
        }
        assert_eq!(Redundancy::Replicas(3).copies(), 3);
        assert_eq!(Redundancy::None.tolerates(), 0);
        let ec: Redundancy = "ec=4+2".parse().unwrap();
        assert_eq!((ec.copies(), ec.data(), ec.tolerates()), (6, 4, 2));
        assert_eq!(ec.overhead(), 1.5);
    }

    #[test]
    fn bad_policies_say_what_to_write() {
        for bad in [
            "",
            "replicas=0",
            "replicas=5",
            "replicas=x",
            "mirror",
            "ec=4",
            "ec=1+1",
            "ec=9+1",
            "ec=4+0",
            "ec=4+5",
            "ec=a+b",
        ] {
            let e = bad.parse::<Redundancy>().unwrap_err().to_string();
            assert!(
                e.contains("replicas=N") && e.contains("ec=K+M"),
                "{bad}: {e}"
            );
        }
    }
}
