//! Revoked certificates.
//!
//! A member may be given a CRL file beside its CA (`--tls-crl`,
//! `RMEM_TLS_CRL`, `crl_file` in `[tls]`; `rmemctl pki revoke` makes one for
//! a lab CA). Each CRL in it must be signed by a CA of the CA file. With it:
//! - handshakes refuse a peer whose certificate it lists (rustls checks the
//!   end entity against the CRLs; a certificate of a CA that has no CRL in
//!   the file passes, so a CA rotation does not need both CRLs at once);
//! - connections already made are checked again whenever the files reload
//!   ([`super::reload::Reloading`]), and calls on them are checked one by
//!   one, so a revoked member is cut off within one reload period, not at
//!   its next handshake;
//! - a certificate that expires while its connection is open is refused
//!   from then on, as it would be at a handshake.

use std::collections::HashSet;
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};

use crate::config::{ConfigError, invalid};

/// Why a peer's certificate no longer opens a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefused {
    #[error("the peer's certificate is revoked")]
    Revoked,
    #[error("the peer's certificate expired")]
    Expired,
    #[error("the peer's certificate cannot be read: {0}")]
    Unreadable(String),
}

/// The certificates a member's CRL file revokes.
#[derive(Debug, Default)]
pub struct Revoked {
    /// Issuer (DER name) and serial (big-endian, no leading zeros) of each.
    serials: HashSet<(Vec<u8>, Vec<u8>)>,
    crls: Vec<CertificateRevocationListDer<'static>>,
}

fn serial_key(raw: &[u8]) -> Vec<u8> {
    let first = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    raw[first..].to_vec()
}

impl Revoked {
    /// Reads the CRLs in `crl_pem` (none when empty), each of which must be
    /// signed by a CA certificate in `ca_pem`.
    pub fn from_pem(crl_pem: &[u8], ca_pem: &[u8]) -> Result<Self, ConfigError> {
        let mut out = Self::default();
        if crl_pem.is_empty() {
            return Ok(out);
        }
        let cas = CertificateDer::pem_slice_iter(ca_pem)
            .filter_map(Result::ok)
            .collect::<Vec<_>>();
        let cas = cas
            .iter()
            .filter_map(|c| x509_parser::parse_x509_certificate(c).ok().map(|(_, c)| c))
            .collect::<Vec<_>>();
        for der in CertificateRevocationListDer::pem_slice_iter(crl_pem) {
            let der = der.map_err(|e| invalid("tls.crl_file", format!("not PEM: {e}")))?;
            let (_, crl) = x509_parser::parse_x509_crl(&der)
                .map_err(|e| invalid("tls.crl_file", format!("not a CRL: {e}")))?;
            let signed = cas.iter().any(|ca| {
                ca.subject().as_raw() == crl.issuer().as_raw()
                    && crl.verify_signature(ca.public_key()).is_ok()
            });
            if !signed {
                return Err(invalid(
                    "tls.crl_file",
                    format!(
                        "a CRL issued by `{}` is not signed by any CA of tls.ca_file",
                        crl.issuer()
                    ),
                ));
            }
            for r in crl.iter_revoked_certificates() {
                out.serials
                    .insert((crl.issuer().as_raw().to_vec(), serial_key(r.raw_serial())));
            }
            out.crls.push(der.clone());
        }
        if out.crls.is_empty() {
            return Err(invalid("tls.crl_file", "holds no CRL"));
        }
        Ok(out)
    }

    /// The CRLs, for rustls' verifiers.
    pub fn crls(&self) -> &[CertificateRevocationListDer<'static>] {
        &self.crls
    }

    /// How many certificates are revoked.
    pub fn len(&self) -> usize {
        self.serials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }

    /// Whether `cert` (a peer's, whose chain was verified at the handshake)
    /// still opens a connection at `now`: not revoked, not expired.
    pub fn check(&self, cert: &CertificateDer<'_>, now: SystemTime) -> Result<(), PeerRefused> {
        let (_, c) = x509_parser::parse_x509_certificate(cert)
            .map_err(|e| PeerRefused::Unreadable(e.to_string()))?;
        let key = (c.issuer().as_raw().to_vec(), serial_key(c.raw_serial()));
        if self.serials.contains(&key) {
            return Err(PeerRefused::Revoked);
        }
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if c.validity().not_after.timestamp() < i64::try_from(secs).unwrap_or(i64::MAX) {
            return Err(PeerRefused::Expired);
        }
        Ok(())
    }
}

/// rmem's CRL policy on a rustls verifier builder, both directions: the
/// end entity is what a lab CA revokes, and a certificate of a CA with no
/// CRL in the file passes (a CA rotation needs no CRL of the new CA).
pub(crate) trait CrlPolicy: Sized {
    fn with_policy(self, revoked: &Revoked) -> Self;
}

macro_rules! crl_policy {
    ($($builder:ty),*) => {$(
        impl CrlPolicy for $builder {
            fn with_policy(self, revoked: &Revoked) -> Self {
                if revoked.crls().is_empty() {
                    return self;
                }
                self.with_crls(revoked.crls().iter().cloned())
                    .only_check_end_entity_revocation()
                    .allow_unknown_revocation_status()
            }
        }
    )*};
}

crl_policy!(
    rustls::server::ClientCertVerifierBuilder,
    rustls::client::ServerCertVerifierBuilder
);

/// When `cert` expires (`None` if it cannot be read).
pub fn not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, c) = x509_parser::parse_x509_certificate(cert).ok()?;
    let secs = u64::try_from(c.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}
