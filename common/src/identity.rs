//! Who a peer is: a member's role and name, carried in its TLS certificate
//! as one URI subject alternative name, `spiffe://rmem/<role>/<name>`
//! (SPIFFE's form, so certificates from a SPIFFE or cert-manager PKI can
//! carry it too). The coordinator and the servers read it from the peer's
//! verified certificate and decide what the peer may do by its role; the
//! name is the member name it may register under.

use std::fmt;
use std::str::FromStr;

/// The trust domain of every rmem identity.
pub const TRUST_DOMAIN: &str = "rmem";

/// What a peer may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Role {
    /// A coordinator replica.
    Coordinator,
    /// A memory server: registers as a server, serves pages.
    Server,
    /// A node agent: registers as an agent, stores and fetches its own pages.
    Agent,
    /// An operator (`rmemctl`): drains, undrains, invalidates any interval.
    Admin,
    /// A scraper (Prometheus): reads the daemons' `/metrics`, nothing else.
    Monitor,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Coordinator,
        Role::Server,
        Role::Agent,
        Role::Admin,
        Role::Monitor,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Server => "server",
            Role::Agent => "agent",
            Role::Admin => "admin",
            Role::Monitor => "monitor",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| IdentityError::Role(s.to_string()))
    }
}

/// A member's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

/// Why a certificate or URI names no identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("`{0}` is not a role (coordinator, server, agent, admin or monitor)")]
    Role(String),
    #[error(
        "`{0}` is not a member name: 1 to 128 characters of letters, digits and . _ - ~ /, no empty path segment"
    )]
    Name(String),
    #[error("`{0}` is not an rmem identity (spiffe://{TRUST_DOMAIN}/ROLE/NAME)")]
    Uri(String),
    #[error("the certificate cannot be read: {0}")]
    Certificate(String),
    #[error(
        "the certificate carries no rmem identity (a URI name spiffe://{TRUST_DOMAIN}/ROLE/NAME)"
    )]
    Missing,
    #[error("the certificate carries more than one rmem identity")]
    Several,
}

/// Checks a member name as an identity carries it.
pub fn check_name(name: &str) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-~/".contains(&b))
        && name.split('/').all(|seg| !seg.is_empty());
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Name(name.to_string()))
    }
}

impl Identity {
    pub fn new(role: Role, name: impl Into<String>) -> Result<Self, IdentityError> {
        let name = name.into();
        check_name(&name)?;
        Ok(Self { role, name })
    }

    /// The URI a certificate carries for this identity.
    pub fn uri(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/{}/{}", self.role, self.name)
    }

    /// The identity a URI names.
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::Uri(uri.to_string());
        let rest = uri
            .strip_prefix("spiffe://")
            .and_then(|r| r.strip_prefix(TRUST_DOMAIN))
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(bad)?;
        let (role, name) = rest.split_once('/').ok_or_else(bad)?;
        Identity::new(role.parse()?, name)
    }

    /// The identity in a certificate (DER): its one `spiffe://rmem/` URI
    /// name. The certificate must have been verified against the cluster's
    /// CA already (the TLS handshake does it).
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::Certificate(e.to_string()))?;
        let sans = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::Certificate(e.to_string()))?;
        let prefix = format!("spiffe://{TRUST_DOMAIN}/");
        let mut found = None;
        for name in sans.iter().flat_map(|s| s.value.general_names.iter()) {
            if let GeneralName::URI(uri) = name
                && uri.starts_with(&prefix)
            {
                if found.is_some() {
                    return Err(IdentityError::Several);
                }
                found = Some(Identity::from_uri(uri)?);
            }
        }
        found.ok_or(IdentityError::Missing)
    }

    /// As [`Self::from_certificate`], for the first certificate of a PEM
    /// file (a member's own, to say whom it runs as).
    pub fn from_pem(pem: &[u8]) -> Result<Self, IdentityError> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem)
            .map_err(|e| IdentityError::Certificate(e.to_string()))?;
        Self::from_certificate(&pem.contents)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_uri() {
        for role in Role::ALL {
            let id = Identity::new(role, "node-1/kmod").unwrap();
            assert_eq!(Identity::from_uri(&id.uri()).unwrap(), id);
        }
        assert_eq!(
            Identity::new(Role::Server, "mem-0").unwrap().uri(),
            "spiffe://rmem/server/mem-0"
        );
        for bad in [
            "spiffe://rmem/server",
            "spiffe://rmem/server/",
            "spiffe://other/server/a",
            "spiffe://rmem/root/a",
            "https://rmem/server/a",
            "spiffe://rmem/agent/a//b",
            "spiffe://rmem/agent/a b",
        ] {
            assert!(Identity::from_uri(bad).is_err(), "{bad}");
        }
        assert!(check_name(&"a".repeat(129)).is_err());
    }

    fn cert(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> rcgen::SanType {
        rcgen::SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn a_certificate_carries_exactly_one_identity() {
        let der = cert(vec![
            rcgen::SanType::DnsName("mem-0.example".try_into().unwrap()),
            uri("spiffe://rmem/server/mem-0"),
            uri("https://example.com/other"),
        ]);
        assert_eq!(
            Identity::from_certificate(&der).unwrap(),
            Identity::new(Role::Server, "mem-0").unwrap()
        );
        assert_eq!(
            Identity::from_certificate(&cert(vec![uri("spiffe://other/server/x")])),
            Err(IdentityError::Missing)
        );
        assert_eq!(
            Identity::from_certificate(&cert(vec![
                uri("spiffe://rmem/server/a"),
                uri("spiffe://rmem/admin/b"),
            ])),
            Err(IdentityError::Several)
        );
        assert!(matches!(
            Identity::from_certificate(&cert(vec![uri("spiffe://rmem/root/a")])),
            Err(IdentityError::Role(_))
        ));
        assert!(matches!(
            Identity::from_certificate(b"not a certificate"),
            Err(IdentityError::Certificate(_))
        ));
    }
}
