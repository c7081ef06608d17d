//! The data plane's TLS: rustls configurations built from a member's
//! [`TlsPem`], and the identity checks that make them mutual.
//!
//! - A memory server asks every client for a certificate signed by the
//!   cluster CA ([`TlsPem::data_server`]); which identities may then use the
//!   data plane is the server's decision, made on the identity it reads from
//!   the certificate ([`peer_identity`]).
//! - A client accepts only a certificate signed by the cluster CA that names
//!   a memory server ([`TlsPem::data_client`]). Servers are addressed by
//!   what the coordinator says they are (an address and a name), not by host
//!   names, so the host name is not checked; the identity is: a connection
//!   made for a named server must find that name in the certificate (the
//!   client checks it after the handshake, [`expect_server`]).
//!
//! The provider is ring's, as for the coordinator's gRPC (tonic's rustls).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::TlsPem;
use super::revocation::CrlPolicy as _;
use crate::config::{ConfigError, invalid};
use crate::identity::{Identity, IdentityError, Role};

/// The crypto provider every rmem TLS endpoint uses: ring, as tonic's
/// `tls-ring` and etcd-client use (rustls 0.23.48 deprecates it for lacking
/// post-quantum key exchange, which only its aws-lc provider has; moving
/// every endpoint to aws-lc together is the way to get it).
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(super) fn roots(pem: &TlsPem) -> Result<Arc<RootCertStore>, ConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem.ca) {
        let cert = cert.map_err(|e| invalid("tls.ca_file", format!("not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| invalid("tls.ca_file", format!("not a CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(invalid("tls.ca_file", "holds no certificate"));
    }
    Ok(Arc::new(roots))
}

pub(super) fn chain(pem: &TlsPem) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let chain = CertificateDer::pem_slice_iter(&pem.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("tls.cert_file", format!("not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(invalid("tls.cert_file", "holds no certificate"));
    }
    Ok(chain)
}

pub(super) fn key(pem: &TlsPem) -> Result<PrivateKeyDer<'static>, ConfigError> {
    PrivateKeyDer::from_pem_slice(&pem.key)
        .map_err(|e| invalid("tls.key_file", format!("no private key: {e}")))
}

pub(super) fn tls_error(field: &str, e: rustls::Error) -> ConfigError {
    invalid(field, format!("unusable: {e}"))
}

impl TlsPem {
    /// A memory server's data-plane TLS: its certificate, and a
    /// certificate from the cluster CA required of every client.
    pub fn data_server(&self) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
        let provider = provider();
        let revoked = self.revoked()?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots(self)?,
            provider.clone(),
        )
        .with_policy(&revoked)
        .build()
        .map_err(|e| invalid("tls.ca_file", e.to_string()))?;
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error("tls", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain(self)?, key(self)?)
            .map_err(|e| tls_error("tls.key_file", e))?;
        Ok(Arc::new(config))
    }

    /// A data-plane client's TLS: its certificate, and servers' checked
    /// against the cluster CA and for the server role.
    pub fn data_client(&self) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
        let provider = provider();
        let verifier = Arc::new(ServerRoleVerifier {
            roots: roots(self)?,
            algorithms: provider.signature_verification_algorithms,
            revoked: self.revoked()?,
        });
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error("tls", e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain(self)?, key(self)?)
            .map_err(|e| tls_error("tls.key_file", e))?;
        Ok(Arc::new(config))
    }
}

/// The identity in a verified peer's certificate chain (its first).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<Identity, IdentityError> {
    let first = certs
        .and_then(|c| c.first())
        .ok_or(IdentityError::Missing)?;
    Identity::from_certificate(first)
}

/// Checks, after the handshake, that the server is the one the client
/// meant (`name`, as the coordinator names it).
pub fn expect_server(certs: Option<&[CertificateDer<'_>]>, name: &str) -> Result<(), String> {
    match peer_identity(certs) {
        Ok(id) if id.role == Role::Server && id.name == name => Ok(()),
        Ok(id) => Err(format!(
            "the server's certificate names {id}, not server {name}"
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// A server certificate is good if it chains to the cluster CA (for
/// server authentication, valid now), is not revoked and names a memory
/// server.
#[derive(Debug)]
struct ServerRoleVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    revoked: super::revocation::Revoked,
}

impl ServerCertVerifier for ServerRoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        if self
            .revoked
            .check(end_entity, std::time::SystemTime::now())
            .is_err_and(|e| e == super::revocation::PeerRefused::Revoked)
        {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        match Identity::from_certificate(end_entity) {
            Ok(id) if id.role == Role::Server => Ok(ServerCertVerified::assertion()),
            Ok(id) => Err(rustls::Error::General(format!(
                "the peer's certificate names {id}, not a memory server"
            ))),
            Err(e) => Err(rustls::Error::General(e.to_string())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The server name a client hands rustls for `addr` (`host:port`): the
/// host, as an IP address or a DNS name. Only the identity is checked, but
/// rustls needs one (and sends a DNS name as SNI).
pub fn server_name(addr: &str) -> ServerName<'static> {
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::try_from("rmem-server").expect("a valid DNS name"))
}
