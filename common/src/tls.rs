//! A member's TLS material: the cluster CA it trusts, and its own
//! certificate and key (see [`crate::identity`] for what the certificate
//! says). Every daemon and `rmemctl` take the same three files, as flags
//! (`--tls-ca`, `--tls-cert`, `--tls-key`), environment variables
//! (`RMEM_TLS_CA`, `RMEM_TLS_CERT`, `RMEM_TLS_KEY`) or a `[tls]` section.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, invalid};
use crate::identity::Identity;

/// Where a member's TLS files are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA (PEM): peers' certificates must be signed by it.
    pub ca_file: PathBuf,
    /// This member's certificate (PEM), carrying its identity.
    pub cert_file: PathBuf,
    /// Its key (PEM); keep it mode 0600.
    pub key_file: PathBuf,
}

/// The files' contents, read once.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsPem {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    /// Whom the certificate names.
    pub identity: Identity,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsPem")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl TlsFiles {
    /// From three optional settings: all or none (`field` names the
    /// setting in errors, e.g. `tls`).
    pub fn from_parts(
        field: &str,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<Self>, ConfigError> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca_file), Some(cert_file), Some(key_file)) => Ok(Some(Self {
                ca_file,
                cert_file,
                key_file,
            })),
            _ => Err(invalid(
                field,
                "TLS needs all three of the CA, the certificate and its key (--tls-ca, --tls-cert, --tls-key)",
            )),
        }
    }

    /// Reads the files; the certificate must carry an rmem identity.
    pub fn read(&self) -> Result<TlsPem, ConfigError> {
        let read = |what: &str, p: &Path| {
            std::fs::read(p).map_err(|source| ConfigError::File {
                what: what.to_string(),
                path: p.to_path_buf(),
                source,
            })
        };
        let ca = read("the TLS CA", &self.ca_file)?;
        let cert = read("the TLS certificate", &self.cert_file)?;
        let key = read("the TLS key", &self.key_file)?;
        let identity = Identity::from_pem(&cert).map_err(|e| {
            invalid(
                "tls.cert_file",
                format!("{}: {e}", self.cert_file.display()),
            )
        })?;
        Ok(TlsPem {
            ca,
            cert,
            key,
            identity,
        })
    }
}
