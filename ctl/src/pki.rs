//! `rmemctl pki`: the command line of [`rmem_common::pki`] (a lab CA and
//! member certificates).

use std::path::PathBuf;

use rmem_common::identity::Role;
pub use rmem_common::pki::{Issued, PkiError, Revocation, init, issue, lab, revoke};

#[derive(Debug, clap::Subcommand)]
pub enum Pki {
    /// Make a cluster CA: DIR/ca.pem (every member is given it) and
    /// DIR/ca.key (keep it secret: whoever holds it can make members).
    ///
    /// Example: rmemctl pki init --dir /etc/rmem/pki
    #[command(verbatim_doc_comment)]
    Init {
        /// Where the CA's files go (created if missing).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// How long the CA is valid, in days.
        #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
        /// Replace a CA already in DIR (every certificate it signed stops
        /// being trusted once members are given the new one).
        #[arg(long, conflicts_with = "keep")]
        force: bool,
        /// Keep a CA (and member certificates) already in DIR instead of
        /// failing: running the same command again changes nothing.
        #[arg(long)]
        keep: bool,
        /// Also issue a certificate for this member, valid for a year:
        /// ROLE:NAME, with the host names and addresses peers dial it by
        /// after an @ (repeat for each member). Example:
        /// --member coordinator:c1@c1.example,10.0.0.5 --member agent:node-3
        #[arg(long = "member", value_name = "ROLE:NAME[@HOST,...]")]
        members: Vec<rmem_common::pki::Member>,
    },
    /// Issue a member certificate signed by DIR's CA: DIR/ROLE-NAME.pem and
    /// DIR/ROLE-NAME.key, usable for TLS as server and client, carrying the
    /// identity spiffe://rmem/ROLE/NAME.
    ///
    /// Examples:
    ///   rmemctl pki issue --role coordinator --name coord-1 --host coord-1.example,10.0.0.5
    ///   rmemctl pki issue --role server --name mem-0 --host 10.0.0.7
    ///   rmemctl pki issue --role agent --name node-3
    ///   rmemctl pki issue --role admin --name alice
    #[command(verbatim_doc_comment)]
    Issue {
        /// Where the CA is and the certificate goes.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// What the member may do.
        #[arg(long, value_enum)]
        role: Role,
        /// The member's name (the one it registers under).
        #[arg(long)]
        name: String,
        /// Host names and IP addresses peers dial the member by
        /// (comma-separated or repeated); needed for a member that listens.
        #[arg(long = "host", value_delimiter = ',', value_name = "HOST")]
        hosts: Vec<String>,
        /// How long the certificate is valid, in days.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
        /// Replace a certificate already there.
        #[arg(long)]
        force: bool,
    },
    /// Revoke a member certificate DIR's CA signed: it is added to the
    /// CA's CRL, DIR/crl.pem (a new edition, renamed over the old). Give
    /// that file to every member as --tls-crl (RMEM_TLS_CRL, `crl_file` in
    /// [tls]): they reload it within seconds, refuse the certificate at
    /// handshakes and close the connections it holds.
    ///
    /// Examples:
    ///   rmemctl pki revoke --dir /etc/rmem/pki --role agent --name node-3
    ///   rmemctl pki revoke --dir /etc/rmem/pki --cert stolen.pem
    #[command(verbatim_doc_comment)]
    Revoke {
        /// Where the CA and its CRL are.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The member's role (its certificate is DIR/ROLE-NAME.pem).
        #[arg(long, value_enum, requires = "name", conflicts_with = "cert")]
        role: Option<Role>,
        /// The member's name.
        #[arg(long, requires = "role")]
        name: Option<String>,
        /// Or the certificate itself (PEM), wherever it is.
        #[arg(long, required_unless_present = "role")]
        cert: Option<PathBuf>,
        /// Until when the CRL says it is current, in days (members keep
        /// using an older one regardless; make a new edition before then to
        /// be safe with stricter verifiers).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
    },
    /// Publish a new edition of DIR's CRL, listing what it listed (do so
    /// before its next update is due; `pki init` publishes the first,
    /// empty).
    ///
    /// Example: rmemctl pki crl --dir /etc/rmem/pki --days 30
    #[command(verbatim_doc_comment)]
    Crl {
        /// Where the CA and its CRL are.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Until when the CRL says it is current, in days.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
    },
}

/// The certificate `rmemctl pki revoke` names.
pub fn revoked_cert(
    dir: &std::path::Path,
    role: Option<Role>,
    name: Option<&str>,
    cert: Option<PathBuf>,
) -> PathBuf {
    match (cert, role, name) {
        (Some(c), _, _) => c,
        (None, Some(role), Some(name)) => rmem_common::pki::member_files(dir, role, name).0,
        _ => unreachable!("clap requires --cert or --role and --name"),
    }
}

/// One line, for `--output table`.
pub fn revocation_line(r: &Revocation) -> String {
    let what = match (&r.identity, &r.serial) {
        (Some(id), Some(serial)) => format!(
            "{id} (serial {serial}) {}: ",
            if r.already {
                "was revoked already"
            } else {
                "is revoked"
            }
        ),
        _ => String::new(),
    };
    format!(
        "{what}{} lists {} certificate(s), edition {}, current until {}\n",
        r.crl.display(),
        r.revoked,
        r.crl_number,
        r.next_update
    )
}

/// One line per certificate, for `--output table`.
pub fn lines(issued: &[Issued]) -> String {
    issued
        .iter()
        .map(|i| {
            format!(
                "{}: {} (key {}), valid until {}{}\n",
                i.identity,
                i.certificate.display(),
                i.key.display(),
                i.not_after,
                if i.kept { " (kept)" } else { "" }
            )
        })
        .collect()
}
