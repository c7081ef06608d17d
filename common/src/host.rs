//! This host's name, and the address others reach a bound socket at.

use std::net::SocketAddr;

/// This host's name (`fallback` if the kernel has none).
pub fn hostname(fallback: &str) -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| fallback.into())
}

/// The address others reach `bound` at: `advertise` if given, else
/// `bound` unless it is a wildcard, else this host's name and the port.
pub fn reachable(advertise: Option<&str>, bound: SocketAddr) -> String {
    match advertise {
        Some(a) => a.to_string(),
        None if bound.ip().is_unspecified() => {
            format!("{}:{}", hostname("localhost"), bound.port())
        }
        None => bound.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_is_reached_by_host_name() {
        let any: SocketAddr = "0.0.0.0:7470".parse().unwrap();
        assert!(reachable(None, any).ends_with(":7470"));
        assert!(!reachable(None, any).starts_with("0.0.0.0"));
        assert_eq!(reachable(None, "10.0.0.1:1".parse().unwrap()), "10.0.0.1:1");
        assert_eq!(reachable(Some("c:2"), any), "c:2");
    }
}
