//! A member's TLS material: the cluster CA it trusts, and its own
//! certificate and key (see [`crate::identity`] for what the certificate
//! says). Every daemon and `rmemctl` take the same three files, as flags
//! (`--tls-ca`, `--tls-cert`, `--tls-key`), environment variables
//! (`RMEM_TLS_CA`, `RMEM_TLS_CERT`, `RMEM_TLS_KEY`) or a `[tls]` section,
//! and optionally a fourth, the certificates the CA revoked (`--tls-crl`,
//! see [`revocation`]).

pub mod data;
pub mod reload;
pub mod revocation;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, invalid};
use crate::identity::Identity;

/// Secure by default: a daemon listening beyond loopback (`listens`: each
/// setting's name and address) needs TLS, unless its operator said
/// `insecure` (a lab on a trusted network; [`warn_if_insecure`] says so
/// loudly at start).
pub fn check_exposure(
    listens: &[(&str, std::net::SocketAddr)],
    tls: bool,
    insecure: bool,
) -> Result<(), ConfigError> {
    if tls || insecure {
        return Ok(());
    }
    match listens.iter().find(|(_, a)| !a.ip().is_loopback()) {
        Some((field, addr)) => Err(invalid(
            *field,
            format!(
                "{addr} is reachable beyond this host and TLS is off; give the cluster CA, \
                 this member's certificate and its key (--tls-ca, --tls-cert, --tls-key, or \
                 [tls] in the file; `rmemctl pki` makes them for a lab), listen on loopback, \
                 or pass --insecure (insecure = true) to run without authentication on a \
                 network you trust"
            ),
        )),
        None => Ok(()),
    }
}

/// Logs, at start, that a daemon listens beyond loopback with no TLS.
pub fn warn_if_insecure(listens: &[(&str, std::net::SocketAddr)], tls: bool) {
    if tls {
        return;
    }
    for (field, addr) in listens.iter().filter(|(_, a)| !a.ip().is_loopback()) {
        tracing::warn!(
            %addr, setting = field,
            "INSECURE: listening beyond loopback with no TLS (--insecure): anyone who reaches this address can act as a member and read or write what it serves"
        );
    }
}

/// The three flags, the same on every binary.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Mutual TLS: the cluster CA (PEM) peers' certificates must be signed
    /// by. With --tls-cert and --tls-key (make all three with `rmemctl pki`).
    #[arg(long, global = true, env = "RMEM_TLS_CA", value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,
    /// This member's certificate (PEM), naming its role and name.
    #[arg(long, global = true, env = "RMEM_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, global = true, env = "RMEM_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// Certificates the cluster CA revoked (PEM CRLs, e.g. from `rmemctl
    /// pki revoke`): peers holding one are refused, and cut off within
    /// seconds of the file changing.
    #[arg(long, global = true, env = "RMEM_TLS_CRL", value_name = "PATH")]
    pub tls_crl: Option<PathBuf>,
}

impl TlsArgs {
    /// The files, if given (all three or none).
    pub fn files(&self) -> Result<Option<TlsFiles>, ConfigError> {
        let files = TlsFiles::from_parts(
            "tls",
            self.tls_ca.clone(),
            self.tls_cert.clone(),
            self.tls_key.clone(),
        )?;
        match (files, &self.tls_crl) {
            (Some(f), crl) => Ok(Some(TlsFiles {
                crl_file: crl.clone(),
                ..f
            })),
            (None, Some(_)) => Err(invalid(
                "tls",
                "--tls-crl needs the CA, the certificate and its key too (--tls-ca, --tls-cert, --tls-key)",
            )),
            (None, None) => Ok(None),
        }
    }
}

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
    /// Certificates the CA revoked (PEM CRLs); optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl_file: Option<PathBuf>,
}

/// The files' contents, read once.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsPem {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    /// The CRLs (empty without a CRL file).
    pub crl: Vec<u8>,
    /// Whom the certificate names.
    pub identity: Identity,
    /// The files they were read from (to read them again).
    pub files: TlsFiles,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsPem")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl TlsPem {
    /// The certificates its CRL file revokes (checked: each CRL signed by
    /// a CA of the CA file).
    pub fn revoked(&self) -> Result<revocation::Revoked, ConfigError> {
        revocation::Revoked::from_pem(&self.crl, &self.ca)
    }

    /// The name a member registers with: its certificate's, which must be
    /// for `role`; a name also configured (`field`) must be the same.
    pub fn member_name(
        &self,
        role: crate::identity::Role,
        field: &str,
        configured: Option<&str>,
    ) -> Result<String, ConfigError> {
        let id = &self.identity;
        if id.role != role {
            return Err(invalid(
                "tls.cert_file",
                format!(
                    "the certificate names {id}; a {role} needs a {role} certificate (rmemctl pki issue {role} NAME)"
                ),
            ));
        }
        match configured {
            Some(name) if name != id.name => Err(invalid(
                field,
                format!(
                    "`{name}` is not the name the certificate gives (`{}`); leave it unset or make them the same",
                    id.name
                ),
            )),
            _ => Ok(id.name.clone()),
        }
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
                crl_file: None,
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
        let crl = match &self.crl_file {
            Some(p) => read("the TLS CRL", p)?,
            None => Vec::new(),
        };
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
            crl,
            identity,
            files: self.clone(),
        })
    }
}
