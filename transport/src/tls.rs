//! rustls configuration for mutual TLS inside the mesh (TLS 1.3, ring).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::client::Resumption;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ProducesTickets, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::pki::MeshIdentity;
use crate::revocation::Revocations;

/// ALPN protocol of node-to-node connections.
pub const ALPN: &[u8] = b"gossamer/1";

/// The server name used when dialing a seed whose node name we do not know
/// yet: the chain is still checked against the CA, and the name is read from
/// the certificate afterwards.
pub const SEED_SERVER_NAME: &str = "seed.gossamer.invalid";

/// ring's provider with AES-128-GCM first among the TLS 1.3 suites. Both
/// ends of a mesh connection are agents, and this is the suite that
/// protects every QUIC packet between them: AES-128 runs 10 rounds a block
/// where AES-256 runs 14, and its SHA-256 transcript and key schedule use
/// the CPU's SHA instructions where SHA-384 has none on common x86 parts.
/// The other suites stay on offer, so agents that prefer them still
/// connect.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// The server side: requires a client certificate issued by the mesh CA.
///
/// Sessions resume from stateless tickets (encrypted with a key that only
/// this process holds and rotates), so a peer that reconnects skips the
/// certificate signatures and checks, the expensive half of a handshake,
/// and the server keeps nothing per client. The client's certificate
/// travels inside the ticket, so a resumed connection names its peer like
/// a full one. `resumed` counts the tickets accepted. A client whose
/// certificate is in `revoked` is refused (a resumed session skips this
/// check; the transport repeats it on every new connection).
pub fn server_config(
    id: &MeshIdentity,
    resumed: Arc<AtomicU64>,
    revoked: Arc<Revocations>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let inner = WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(MeshClientVerifier { inner, revoked }))
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.ticketer = Arc::new(CountingTicketer {
        inner: rustls::crypto::ring::Ticketer::new()?,
        resumed,
    });
    Ok(config)
}

/// The client side: presents our certificate and checks the server's, and
/// keeps up to `sessions` peers' session tickets for resumption. A server
/// whose certificate is in `revoked` is refused.
pub fn client_config(
    id: &MeshIdentity,
    sessions: usize,
    revoked: Arc<Revocations>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = provider();
    let inner = WebPkiServerVerifier::builder_with_provider(id.roots.clone(), provider.clone())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let algorithms = provider.signature_verification_algorithms;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier {
            inner,
            roots: id.roots.clone(),
            algorithms,
            revoked,
        }))
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = Resumption::in_memory_sessions(sessions);
    Ok(config)
}

/// rustls's ticketer, counting the tickets it accepts back.
#[derive(Debug)]
struct CountingTicketer {
    inner: Arc<dyn ProducesTickets>,
    resumed: Arc<AtomicU64>,
}

impl ProducesTickets for CountingTicketer {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }

    fn lifetime(&self) -> u32 {
        self.inner.lifetime()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.inner.encrypt(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let plain = self.inner.decrypt(cipher);
        if plain.is_some() {
            self.resumed.fetch_add(1, Ordering::Relaxed);
        }
        plain
    }
}

/// Checks the chain against the mesh CA always, and the node name whenever we
/// know whom we are dialing (everything but a seed).
#[derive(Debug)]
struct MeshServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    roots: Arc<rustls::RootCertStore>,
    /// For a seed's chain: taken once from the provider, not per handshake.
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
    revoked: Arc<Revocations>,
}

fn refuse_revoked(revoked: &Revocations, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    match revoked.check(cert) {
        Some(_) => Err(rustls::Error::InvalidCertificate(CertificateError::Revoked)),
        None => Ok(()),
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        refuse_revoked(&self.revoked, end_entity)?;
        let is_seed =
            matches!(server_name, ServerName::DnsName(d) if d.as_ref() == SEED_SERVER_NAME);
        if !is_seed {
            return self.inner.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            );
        }
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// rustls's client verifier, refusing revoked certificates first.
#[derive(Debug)]
struct MeshClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Arc<Revocations>,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        refuse_revoked(&self.revoked, end_entity)?;
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
