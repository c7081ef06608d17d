//! Throwaway certificate authorities for tests: [`Pki`], made with the
//! `openssl` command (a CA and leaf certificates, ECDSA P-256, with the
//! names and uses a test asks for; for etcd), and [`Lab`], an rmem
//! cluster's CA and member certificates made by `rmemctl pki`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A CA's files in `dir`.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

/// A leaf certificate and its key (PEM files).
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    /// A new CA (`ca.pem`, `ca.key`) in `dir`.
    pub fn new(dir: &Path) -> Self {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=rmem test CA",
            ],
        );
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// The CA's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate for `name` signed by the CA, valid for `sans` (e.g.
    /// `IP:127.0.0.1`, `DNS:etcd`) and usable as a TLS server and client.
    pub fn issue(&self, name: &str, sans: &[&str]) -> Leaf {
        let ext = self.dir.join(format!("{name}.ext"));
        let mut text = String::from("extendedKeyUsage=serverAuth,clientAuth\n");
        if !sans.is_empty() {
            text.push_str(&format!("subjectAltName={}\n", sans.join(",")));
        }
        std::fs::write(&ext, text).expect("write the extensions");
        let (key, csr, cert) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                ext.to_str().expect("utf-8 path"),
            ],
        );
        Leaf {
            cert: self.dir.join(cert),
            key: self.dir.join(key),
        }
    }
}

/// A cluster's lab CA made by `rmemctl pki` in a temporary directory,
/// with member certificates (`ROLE-NAME.pem`, `.key`) for 127.0.0.1.
#[derive(Debug)]
pub struct Lab {
    dir: tempfile::TempDir,
}

impl Lab {
    pub fn new(members: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        crate::rmemctl_ok(&["pki", "init", "--dir", d]);
        for (role, name) in members {
            crate::rmemctl_ok(&[
                "pki",
                "issue",
                "--dir",
                d,
                "--role",
                role,
                "--name",
                name,
                "--host",
                "127.0.0.1",
            ]);
        }
        Self { dir }
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.path().join(file).to_str().unwrap().to_string()
    }

    /// `--tls-ca`, `--tls-cert`, `--tls-key` for member `who` (e.g.
    /// `agent-node-1`), trusting this lab's CA.
    pub fn flags(&self, who: &str) -> Vec<String> {
        vec![
            "--tls-ca".into(),
            self.path("ca.pem"),
            "--tls-cert".into(),
            self.path(&format!("{who}.pem")),
            "--tls-key".into(),
            self.path(&format!("{who}.key")),
        ]
    }

    /// A certificate of this lab's CA for `ROLE-NAME` (127.0.0.1), valid
    /// from `not_before` to `not_after`, which `rmemctl pki` would not make
    /// (already expired, or expiring within seconds): written as
    /// `ROLE-NAME.pem` and `.key`.
    pub fn issue_valid(
        &self,
        role: &str,
        name: &str,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) {
        let read = |f: &str| std::fs::read_to_string(self.path(f)).unwrap();
        let ca_key = rcgen::KeyPair::from_pem(&read("ca.key")).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&read("ca.pem"), ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![
            rcgen::SanType::URI(format!("spiffe://rmem/{role}/{name}").try_into().unwrap()),
            rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()),
        ];
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        (p.not_before, p.not_after) = (not_before, not_after);
        let cert = p.signed_by(&key, &issuer).unwrap();
        std::fs::write(self.path(&format!("{role}-{name}.pem")), cert.pem()).unwrap();
        std::fs::write(
            self.path(&format!("{role}-{name}.key")),
            key.serialize_pem(),
        )
        .unwrap();
    }

    /// `who`'s files, trusting `ca`'s CA.
    pub fn pem(&self, ca: &Lab, who: &str) -> rmem_common::tls::TlsPem {
        rmem_common::tls::TlsFiles {
            ca_file: ca.path("ca.pem").into(),
            cert_file: self.path(&format!("{who}.pem")).into(),
            key_file: self.path(&format!("{who}.key")).into(),
            crl_file: None,
        }
        .read()
        .unwrap()
    }
}
