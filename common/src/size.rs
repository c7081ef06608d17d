//! Byte sizes as operators write them: `4GiB`, `512 MiB`, `4096`, `1.5G`.
//!
//! Binary (`KiB`, `MiB`, `GiB`, `TiB`, and the short `K`, `M`, `G`, `T`) and
//! decimal (`kB`, `MB`, `GB`, `TB`) suffixes are accepted; a bare number is
//! bytes. Printing uses the largest binary unit that divides the value.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// `n` KiB.
    pub const fn kib(n: u64) -> Self {
        Self(n << 10)
    }
    /// `n` MiB.
    pub const fn mib(n: u64) -> Self {
        Self(n << 20)
    }
    /// `n` GiB.
    pub const fn gib(n: u64) -> Self {
        Self(n << 30)
    }
    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

/// Why a size did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseSizeError {
    #[error("empty size")]
    Empty,
    #[error("invalid number {0:?} in size")]
    Number(String),
    #[error("unknown unit {0:?} (use B, KiB, MiB, GiB, TiB, kB, MB, GB or TB)")]
    Unit(String),
    #[error("size does not fit in 64 bits")]
    Overflow,
}

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ParseSizeError::Empty);
        }
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let number = number.replace('_', "");
        let multiplier: u64 = match unit.trim() {
            "" | "B" | "b" => 1,
            "K" | "k" | "KiB" | "Ki" | "kiB" => 1 << 10,
            "M" | "m" | "MiB" | "Mi" => 1 << 20,
            "G" | "g" | "GiB" | "Gi" => 1 << 30,
            "T" | "t" | "TiB" | "Ti" => 1 << 40,
            "kB" | "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            other => return Err(ParseSizeError::Unit(other.to_string())),
        };
        if let Ok(whole) = number.parse::<u64>() {
            return whole
                .checked_mul(multiplier)
                .map(ByteSize)
                .ok_or(ParseSizeError::Overflow);
        }
        let fractional: f64 = number
            .parse()
            .map_err(|_| ParseSizeError::Number(number.clone()))?;
        let bytes = fractional * multiplier as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
            return Err(ParseSizeError::Overflow);
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
        for (name, shift) in UNITS {
            let unit = 1u64 << shift;
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{}{}", self.0 >> shift, name);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte size such as 4096, \"512MiB\" or \"4GiB\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_operator_spellings() {
        assert_eq!("4096".parse(), Ok(ByteSize(4096)));
        assert_eq!("4GiB".parse(), Ok(ByteSize::gib(4)));
        assert_eq!("512 MiB".parse(), Ok(ByteSize::mib(512)));
        assert_eq!("1.5G".parse(), Ok(ByteSize(3 << 29)));
        assert_eq!("2MB".parse(), Ok(ByteSize(2_000_000)));
        assert_eq!("64k".parse(), Ok(ByteSize::kib(64)));
        assert_eq!("1_024".parse(), Ok(ByteSize(1024)));
    }

    #[test]
    fn rejects_nonsense() {
        assert_eq!("".parse::<ByteSize>(), Err(ParseSizeError::Empty));
        assert!(matches!(
            "4 parsecs".parse::<ByteSize>(),
            Err(ParseSizeError::Unit(_))
        ));
        assert!(matches!(
            "..G".parse::<ByteSize>(),
            Err(ParseSizeError::Number(_))
        ));
        assert_eq!(
            "99999999999T".parse::<ByteSize>(),
            Err(ParseSizeError::Overflow)
        );
    }

    #[test]
    fn serde_accepts_numbers_and_strings() {
        let v: ByteSize = serde_json::from_str("\"1GiB\"").unwrap();
        assert_eq!(v, ByteSize::gib(1));
        let v: ByteSize = serde_json::from_str("8192").unwrap();
        assert_eq!(v, ByteSize(8192));
        assert!(serde_json::from_str::<ByteSize>("-1").is_err());
    }

    proptest! {
        #[test]
        fn display_round_trips(n in any::<u64>()) {
            let s = ByteSize(n).to_string();
            prop_assert_eq!(s.parse::<ByteSize>(), Ok(ByteSize(n)));
        }
    }
}
