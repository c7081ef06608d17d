//! `rmemctl pki`: the command line of [`rmem_common::pki`] (a lab CA and
//! member certificates).

use std::path::PathBuf;

use rmem_common::identity::Role;
pub use rmem_common::pki::{Issued, PkiError, init, issue, lab};

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
