//! Redundancy policies: how many copies of an evicted page the servers
//! hold, so that losing a server loses no page.
//!
//! - `none`: one copy. A lost server loses its pages (the program gets
//!   SIGBUS after the fault timeout).
//! - `replicas=N`: N copies on N distinct servers (N from 2 to
//!   [`MAX_COPIES`]); survives the loss of N-1 servers. A fault reads one
//!   copy, so a degraded read costs what a healthy one does.
//!
//! Written as operators write them (`replicas=2`); `FromStr` and `Display`
//! round-trip.

use std::fmt;
use std::str::FromStr;

/// Most copies of one page.
pub const MAX_COPIES: usize = 4;

/// How many copies of each page the servers hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Redundancy {
    /// One copy.
    #[default]
    None,
    /// This many copies, on as many distinct servers.
    Replicas(u8),
}

impl Redundancy {
    /// Copies of each page.
    pub fn copies(self) -> usize {
        match self {
            Redundancy::None => 1,
            Redundancy::Replicas(n) => usize::from(n),
        }
    }

    /// Servers that may be lost without losing a page.
    pub fn tolerates(self) -> usize {
        self.copies() - 1
    }
}

impl fmt::Display for Redundancy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Redundancy::None => f.write_str("none"),
            Redundancy::Replicas(n) => write!(f, "replicas={n}"),
        }
    }
}

/// Why a policy does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{given}` is not a redundancy policy: {why} (write `none` or `replicas=N`, N from 2 to {MAX_COPIES})"
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
        ] {
            let got: Redundancy = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string().parse::<Redundancy>().unwrap(), got);
        }
        assert_eq!(Redundancy::Replicas(3).copies(), 3);
        assert_eq!(Redundancy::None.tolerates(), 0);
    }

    #[test]
    fn bad_policies_say_what_to_write() {
        for bad in ["", "replicas=0", "replicas=5", "replicas=x", "mirror"] {
            let e = bad.parse::<Redundancy>().unwrap_err().to_string();
            assert!(e.contains("replicas=N"), "{bad}: {e}");
        }
    }
}
