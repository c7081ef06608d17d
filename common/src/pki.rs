//! A lab PKI: a cluster CA and member certificates, for `rmemctl pki`,
//! `deploy/local-cluster.sh`, tests and benchmarks. Production clusters use
//! their own PKI (cert-manager, an organisation's CA): any certificate
//! signed by the CA members trust and carrying the member's identity as a
//! URI name (`spiffe://rmem/ROLE/NAME`, see [`crate::identity`]) does.
//!
//! Keys are ECDSA P-256, written mode 0600; nothing is overwritten without
//! `force`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::identity::{Identity, IdentityError, Role};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0} exists; pass --force to replace it")]
    Exists(PathBuf),
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Ca {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot make the certificate")]
    Make(#[from] rcgen::Error),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("`{0}` is neither a host name nor an IP address")]
    Host(String),
    #[error("{path} is not {what}")]
    Unreadable { path: PathBuf, what: &'static str },
    #[error("{0} was not signed by this CA")]
    NotThisCa(PathBuf),
}

/// What was written.
#[derive(Debug, Serialize)]
pub struct Issued {
    /// `ca`, or the member's identity URI.
    pub identity: String,
    pub certificate: PathBuf,
    pub key: PathBuf,
    /// RFC 3339.
    pub not_after: String,
    /// The files were there already and were kept ([`lab`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub kept: bool,
}

/// A member to issue a certificate for: `ROLE:NAME[@HOST,...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub role: Role,
    pub name: String,
    pub hosts: Vec<String>,
}

impl std::str::FromStr for Member {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not ROLE:NAME[@HOST,...] (e.g. server:mem-0@10.0.0.7)");
        let (role, rest) = s.split_once(':').ok_or_else(bad)?;
        let (name, hosts) = rest.split_once('@').unwrap_or((rest, ""));
        let role: Role = role.parse().map_err(|e: IdentityError| e.to_string())?;
        crate::identity::check_name(name).map_err(|e| e.to_string())?;
        Ok(Self {
            role,
            name: name.to_string(),
            hosts: hosts
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(str::to_string)
                .collect(),
        })
    }
}

/// A lab in one step, safe to run again: the CA in `dir` (made unless
/// there), and a certificate for each of `members` (made unless there).
/// Files already there are kept, whatever they say (`rmemctl pki issue
/// --force` replaces one).
pub fn lab(
    dir: &Path,
    ca_days: u32,
    member_days: u32,
    members: &[Member],
) -> Result<Vec<Issued>, PkiError> {
    let mut out = Vec::with_capacity(members.len() + 1);
    let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    out.push(if ca.exists() && ca_key.exists() {
        if !crl_file(dir).exists() {
            revoke(dir, None, CRL_DAYS)?;
        }
        kept("ca".into(), ca, ca_key)?
    } else {
        init(dir, ca_days, false)?
    });
    for m in members {
        let (cert, key) = member_files(dir, m.role, &m.name);
        out.push(if cert.exists() && key.exists() {
            let id = Identity::new(m.role, m.name.clone())?.uri();
            kept(id, cert, key)?
        } else {
            issue(dir, m.role, &m.name, &m.hosts, member_days, false)?
        });
    }
    Ok(out)
}

/// Where a member's certificate and key go in `dir`.
pub fn member_files(dir: &Path, role: Role, name: &str) -> (PathBuf, PathBuf) {
    let file = format!("{role}-{}", name.replace('/', "_"));
    (
        dir.join(format!("{file}.pem")),
        dir.join(format!("{file}.key")),
    )
}

/// An existing certificate, described.
fn kept(identity: String, certificate: PathBuf, key: PathBuf) -> Result<Issued, PkiError> {
    let pem = std::fs::read(&certificate).map_err(|source| PkiError::Io {
        what: "read",
        path: certificate.clone(),
        source,
    })?;
    let not_after = x509_parser::pem::parse_x509_pem(&pem)
        .ok()
        .and_then(|(_, p)| {
            p.parse_x509()
                .ok()
                .map(|c| rfc3339(c.validity().not_after.to_datetime()))
        })
        .unwrap_or_default();
    Ok(Issued {
        identity,
        certificate,
        key,
        not_after,
        kept: true,
    })
}

fn validity(days: u32) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    // A little before now: clocks of members differ.
    (
        now - time::Duration::minutes(5),
        now + time::Duration::days(i64::from(days)),
    )
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// Writes `text` to a new file at `path` (mode `mode`), or over one with
/// `force`.
fn write(path: &Path, text: &str, mode: u32, force: bool) -> Result<(), PkiError> {
    let io = |what, source| PkiError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    if force {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("replace", e)),
            _ => {}
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists(path.to_path_buf())
            } else {
                io("create", e)
            }
        })?;
    f.write_all(text.as_bytes()).map_err(|e| io("write", e))
}

fn refuse_existing(paths: &[&Path], force: bool) -> Result<(), PkiError> {
    if !force && let Some(p) = paths.iter().find(|p| p.exists()) {
        return Err(PkiError::Exists(p.to_path_buf()));
    }
    Ok(())
}

fn make_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        what: "create",
        path: dir.to_path_buf(),
        source,
    })
}

/// `rmemctl pki init`.
pub fn init(dir: &Path, days: u32, force: bool) -> Result<Issued, PkiError> {
    make_dir(dir)?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    refuse_existing(&[&cert_path, &key_path], force)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "rmem cluster CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    (params.not_before, params.not_after) = validity(days);
    let cert = params.self_signed(&key)?;
    write(&key_path, &key.serialize_pem(), 0o600, force)?;
    write(&cert_path, &cert.pem(), 0o644, force)?;
    // Its CRL, empty: members can be given it from the start, and take
    // revocations as they come.
    match std::fs::remove_file(crl_file(dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(PkiError::Io {
                what: "replace",
                path: crl_file(dir),
                source: e,
            });
        }
        _ => {}
    }
    revoke(dir, None, CRL_DAYS)?;
    Ok(Issued {
        identity: "ca".into(),
        certificate: cert_path,
        key: key_path,
        not_after: rfc3339(params.not_after),
        kept: false,
    })
}

/// The CA in `dir`, to sign with.
fn ca_issuer(dir: &Path) -> Result<rcgen::Issuer<'static, rcgen::KeyPair>, PkiError> {
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let signing =
        rcgen::KeyPair::from_pem(&read_text(&ca_key)?).map_err(|source| PkiError::Ca {
            path: ca_key.clone(),
            source,
        })?;
    rcgen::Issuer::from_ca_cert_pem(&read_text(&ca_cert)?, signing).map_err(|source| PkiError::Ca {
        path: ca_cert.clone(),
        source,
    })
}

fn read_text(p: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(p).map_err(|source| PkiError::Io {
        what: "read",
        path: p.to_path_buf(),
        source,
    })
}

/// What [`revoke`] wrote.
#[derive(Debug, Serialize)]
pub struct Revocation {
    /// The certificate revoked, if one was: its identity URI, and its
    /// serial (hex).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The CRL, to give members as `--tls-crl` (they reload it).
    pub crl: PathBuf,
    /// How many certificates it lists.
    pub revoked: usize,
    pub crl_number: u64,
    /// RFC 3339: when the CRL says its next edition is due.
    pub next_update: String,
    /// The certificate was listed already.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub already: bool,
}

/// How long a CRL edition `init` and `lab` publish says it is current.
const CRL_DAYS: u32 = 365;

/// Where [`revoke`] keeps the CA's CRL.
pub fn crl_file(dir: &Path) -> PathBuf {
    dir.join("crl.pem")
}

/// `rmemctl pki revoke`: adds `cert` (a certificate this CA signed) to the
/// CA's CRL, `DIR/crl.pem`, keeping what it listed; with no `cert`, makes
/// a new edition of the same list (`rmemctl pki crl`). The new edition is
/// written beside the old and renamed over it, so a member reading it
/// sees one edition or the other. Revoking twice changes only the edition.
pub fn revoke(dir: &Path, cert: Option<&Path>, days: u32) -> Result<Revocation, PkiError> {
    let issuer = ca_issuer(dir)?;
    let (identity, serial) = cert.map(|c| revoked_serial(dir, c)).transpose()?.unzip();
    let path = crl_file(dir);

    // What the CRL listed so far.
    let mut revoked = Vec::new();
    let mut number = 0u64;
    if path.exists() {
        let old = std::fs::read(&path).map_err(|source| PkiError::Io {
            what: "read",
            path: path.clone(),
            source,
        })?;
        let bad = || PkiError::Unreadable {
            path: path.clone(),
            what: "a PEM CRL",
        };
        let (_, p) = x509_parser::pem::parse_x509_pem(&old).map_err(|_| bad())?;
        let (_, crl) = x509_parser::parse_x509_crl(&p.contents).map_err(|_| bad())?;
        number = crl.crl_number().map_or(0, |n| {
            n.to_bytes_be()
                .iter()
                .fold(0u64, |a, b| a.wrapping_shl(8) | u64::from(*b))
        });
        for r in crl.iter_revoked_certificates() {
            revoked.push(rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(r.raw_serial()),
                revocation_time: r.revocation_date.to_datetime(),
                reason_code: None,
                invalidity_date: None,
            });
        }
    }
    let trim = |b: &[u8]| {
        b.iter()
            .skip_while(|x| **x == 0)
            .copied()
            .collect::<Vec<_>>()
    };
    let already = serial.as_ref().is_some_and(|serial| {
        revoked
            .iter()
            .any(|r| trim(r.serial_number.as_ref()) == trim(serial))
    });
    let (this_update, next_update) = validity(days);
    if let Some(serial) = serial.as_ref().filter(|_| !already) {
        revoked.push(rcgen::RevokedCertParams {
            serial_number: rcgen::SerialNumber::from_slice(serial),
            revocation_time: this_update,
            reason_code: Some(rcgen::RevocationReason::Unspecified),
            invalidity_date: None,
        });
    }
    let params = rcgen::CertificateRevocationListParams {
        this_update,
        next_update,
        crl_number: rcgen::SerialNumber::from(number + 1),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let count = params.revoked_certs.len();
    let crl = params.signed_by(&issuer)?;
    let tmp = dir.join("crl.pem.new");
    write(&tmp, &crl.pem()?, 0o644, true)?;
    std::fs::rename(&tmp, &path).map_err(|source| PkiError::Io {
        what: "replace",
        path: path.clone(),
        source,
    })?;
    Ok(Revocation {
        identity,
        serial: serial.map(|s| s.iter().map(|b| format!("{b:02x}")).collect()),
        crl: path,
        revoked: count,
        crl_number: number + 1,
        next_update: rfc3339(next_update),
        already,
    })
}

/// The identity and serial of `cert`, which this CA must have signed.
fn revoked_serial(dir: &Path, cert: &Path) -> Result<(String, Vec<u8>), PkiError> {
    let pem = std::fs::read(cert).map_err(|source| PkiError::Io {
        what: "read",
        path: cert.to_path_buf(),
        source,
    })?;
    let unreadable = |path: &Path| PkiError::Unreadable {
        path: path.to_path_buf(),
        what: "a PEM certificate",
    };
    let (_, parsed) = x509_parser::pem::parse_x509_pem(&pem).map_err(|_| unreadable(cert))?;
    let member = parsed.parse_x509().map_err(|_| unreadable(cert))?;
    let ca_path = dir.join("ca.pem");
    let ca_pem = std::fs::read(&ca_path).map_err(|source| PkiError::Io {
        what: "read",
        path: ca_path.clone(),
        source,
    })?;
    let (_, ca) = x509_parser::pem::parse_x509_pem(&ca_pem).map_err(|_| unreadable(&ca_path))?;
    let ca = ca.parse_x509().map_err(|_| unreadable(&ca_path))?;
    if member.issuer().as_raw() != ca.subject().as_raw()
        || member.verify_signature(Some(ca.public_key())).is_err()
    {
        return Err(PkiError::NotThisCa(cert.to_path_buf()));
    }
    let identity = Identity::from_pem(&pem)
        .map(|i| i.uri())
        .unwrap_or_else(|_| member.subject().to_string());
    Ok((identity, member.raw_serial().to_vec()))
}

/// `rmemctl pki issue`.
pub fn issue(
    dir: &Path,
    role: Role,
    name: &str,
    hosts: &[String],
    days: u32,
    force: bool,
) -> Result<Issued, PkiError> {
    let identity = Identity::new(role, name)?;
    let issuer = ca_issuer(dir)?;
    let (cert_path, key_path) = member_files(dir, role, name);
    refuse_existing(&[&cert_path, &key_path], force)?;
    let mut sans = vec![rcgen::SanType::URI(
        identity
            .uri()
            .try_into()
            .map_err(|_| IdentityError::Name(name.to_string()))?,
    )];
    for h in hosts.iter().map(|h| h.trim()).filter(|h| !h.is_empty()) {
        sans.push(match h.parse::<std::net::IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => {
                let valid = h.len() <= 253
                    && h.split('.').all(|l| {
                        !l.is_empty()
                            && l.len() <= 63
                            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    });
                if !valid {
                    return Err(PkiError::Host(h.to_string()));
                }
                rcgen::SanType::DnsName(h.try_into().map_err(|_| PkiError::Host(h.to_string()))?)
            }
        });
    }
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = sans;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationalUnitName, role.as_str());
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    (params.not_before, params.not_after) = validity(days);
    let cert = params.signed_by(&key, &issuer)?;
    write(&key_path, &key.serialize_pem(), 0o600, force)?;
    write(&cert_path, &cert.pem(), 0o644, force)?;
    Ok(Issued {
        identity: identity.uri(),
        certificate: cert_path,
        key: key_path,
        not_after: rfc3339(params.not_after),
        kept: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_issues_member_certificates_that_carry_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = init(d, 10, false).unwrap();
        assert!(matches!(init(d, 10, false), Err(PkiError::Exists(_))));
        let issued = issue(
            d,
            Role::Server,
            "mem-0",
            &["10.0.0.7".into(), "mem-0.example".into()],
            5,
            false,
        )
        .unwrap();
        let pem = std::fs::read(&issued.certificate).unwrap();
        assert_eq!(
            Identity::from_pem(&pem).unwrap(),
            Identity::new(Role::Server, "mem-0").unwrap()
        );
        use std::os::unix::fs::PermissionsExt;
        for key in [&ca.key, &issued.key] {
            let mode = std::fs::metadata(key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
        // Names with a slash (a kernel agent's `host/kmod`) make a file name.
        let kmod = issue(d, Role::Agent, "node-1/kmod", &[], 5, false).unwrap();
        assert!(kmod.certificate.ends_with("agent-node-1_kmod.pem"));
        assert!(matches!(
            issue(d, Role::Server, "mem-0", &[], 5, false),
            Err(PkiError::Exists(_))
        ));
        issue(d, Role::Server, "mem-0", &[], 5, true).unwrap();
        assert!(matches!(
            issue(d, Role::Admin, "bad name", &[], 5, false),
            Err(PkiError::Identity(_))
        ));
        assert!(matches!(
            issue(d, Role::Server, "mem-1", &["not a host".into()], 5, false),
            Err(PkiError::Host(_))
        ));
        let other = tempfile::tempdir().unwrap();
        assert!(matches!(
            issue(other.path(), Role::Admin, "alice", &[], 5, false),
            Err(PkiError::Io { .. })
        ));
    }

    #[test]
    fn a_revoked_certificate_is_listed_by_the_cas_crl_and_refused() {
        use crate::tls::revocation::{PeerRefused, Revoked};
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init(d, 10, false).unwrap();
        // With the CA comes its CRL, empty.
        let ca = std::fs::read(d.join("ca.pem")).unwrap();
        let empty = Revoked::from_pem(&std::fs::read(crl_file(d)).unwrap(), &ca).unwrap();
        assert!(empty.is_empty());
        let bad = issue(d, Role::Agent, "node-1", &[], 5, false).unwrap();
        let good = issue(d, Role::Agent, "node-2", &[], 5, false).unwrap();
        let r = revoke(d, Some(&bad.certificate), 7).unwrap();
        assert_eq!((r.revoked, r.crl_number, r.already), (1, 2, false));
        assert_eq!(r.identity.as_deref(), Some("spiffe://rmem/agent/node-1"));
        let der = |p: &Path| CertificateDer::from_pem_file(p).unwrap();
        let now = std::time::SystemTime::now();
        let list = Revoked::from_pem(&std::fs::read(&r.crl).unwrap(), &ca).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(
            list.check(&der(&bad.certificate), now),
            Err(PeerRefused::Revoked)
        );
        list.check(&der(&good.certificate), now).unwrap();
        // Expiry is checked too.
        let later = now + std::time::Duration::from_secs(6 * 86400);
        assert_eq!(
            list.check(&der(&good.certificate), later),
            Err(PeerRefused::Expired)
        );
        // Again: the same list, a new edition. Then a second one.
        let again = revoke(d, Some(&bad.certificate), 7).unwrap();
        assert_eq!(
            (again.revoked, again.crl_number, again.already),
            (1, 3, true)
        );
        let both = revoke(d, Some(&good.certificate), 7).unwrap();
        assert_eq!((both.revoked, both.crl_number), (2, 4));
        let list = Revoked::from_pem(&std::fs::read(&both.crl).unwrap(), &ca).unwrap();
        assert!(list.check(&der(&bad.certificate), now).is_err());
        assert!(list.check(&der(&good.certificate), now).is_err());
        // A CRL must come from a CA the member trusts; a certificate of
        // another CA cannot be revoked here.
        let other = tempfile::tempdir().unwrap();
        init(other.path(), 10, false).unwrap();
        let stranger = issue(other.path(), Role::Agent, "x", &[], 5, false).unwrap();
        assert!(matches!(
            revoke(d, Some(&stranger.certificate), 7),
            Err(PkiError::NotThisCa(_))
        ));
        let other_ca = std::fs::read(other.path().join("ca.pem")).unwrap();
        let e = Revoked::from_pem(&std::fs::read(&both.crl).unwrap(), &other_ca).unwrap_err();
        assert!(e.to_string().contains("not signed by any CA"), "{e}");
        assert!(Revoked::from_pem(b"junk", &ca).is_err());
    }
}
