//! Signatures by operator certificates, for configuration documents.
//!
//! An operator certificate ([`crate::pki::issue_operator_cert`]) chains to
//! the mesh CA, names `spiffe://<trust-domain>/operator/<name>` and allows
//! code signing only. Anyone holding the CA certificate can check a
//! signature made with it, so a document is trustworthy whoever passes it
//! on, and agents need no key pinned beyond the CA they already have.

use std::sync::Arc;

use rustls::SignatureScheme;
use rustls::sign::SigningKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::pki;

/// The code-signing extended key usage, 1.3.6.1.5.5.7.3.3 (DER body).
const EKU_CODE_SIGNING: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x03];

/// Schemes a signature may use, in order of preference.
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
];

/// Why a signature was not made or not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// The certificate or key could not be read.
    #[error("{0}")]
    BadInput(String),
    /// The signer's certificate is a node's, not an operator's.
    #[error("signed by node certificate {0:?}: only operator certificates may sign documents")]
    NodeSigner(String),
    /// The signer's certificate names no operator.
    #[error(
        "the signer's certificate is not an operator certificate (no spiffe://…/operator/<name> URI)"
    )]
    NotOperator,
    /// The operator belongs to another trust domain.
    #[error("signer {name:?} belongs to trust domain {domain:?}, not {ours:?}")]
    ForeignDomain {
        /// The operator's name.
        name: String,
        /// Its trust domain.
        domain: String,
        /// Ours.
        ours: String,
    },
    /// The certificate does not chain to the mesh CA, has expired, or may
    /// not sign code.
    #[error("signer {name:?}: certificate not valid for signing under the mesh CA ({reason})")]
    Untrusted {
        /// The operator's name.
        name: String,
        /// webpki's reason.
        reason: String,
    },
    /// The signature does not match the document.
    #[error("signer {0:?}: bad signature")]
    BadSignature(String),
    /// The signature scheme is not one Gossamer accepts.
    #[error("unsupported signature scheme {0:#06x}")]
    Scheme(u16),
}

/// An operator's key and certificate, ready to sign.
pub struct OperatorSigner {
    key: Arc<dyn SigningKey>,
    cert: CertificateDer<'static>,
    name: String,
}

impl std::fmt::Debug for OperatorSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorSigner")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl OperatorSigner {
    /// Loads an operator certificate and its key (PEM text).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, SignError> {
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| SignError::BadInput(format!("operator certificate: not PEM ({e})")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
            SignError::BadInput(format!("operator key: not a PEM private key ({e})"))
        })?;
        if let Some((_, node)) = pki::node_identity(&cert) {
            return Err(SignError::NodeSigner(node));
        }
        let (_, name) = pki::operator_identity(&cert).ok_or(SignError::NotOperator)?;
        let key = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| SignError::BadInput(format!("operator key: {e}")))?;
        let signer = Self { key, cert, name };
        // Catch a key that does not belong to the certificate now.
        let probe = signer.sign(b"gossamer key check")?;
        verify_signature(&signer.cert, probe.0, b"gossamer key check", &probe.1).map_err(|_| {
            SignError::BadInput("operator key does not match the certificate".into())
        })?;
        Ok(signer)
    }

    /// The operator's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        self.cert.as_ref()
    }

    /// Signs `msg`: the scheme used and the signature.
    pub fn sign(&self, msg: &[u8]) -> Result<(u16, Vec<u8>), SignError> {
        let signer = self
            .key
            .choose_scheme(SCHEMES)
            .ok_or_else(|| SignError::BadInput("operator key: unsupported key type".into()))?;
        let sig = signer
            .sign(msg)
            .map_err(|e| SignError::BadInput(format!("signing failed: {e}")))?;
        Ok((u16::from(signer.scheme()), sig))
    }
}

/// Checks that `signature` over `msg` was made by the operator certificate
/// `cert_der`, which must chain to `ca` and belong to `trust_domain`.
/// Returns the operator's name.
pub fn verify(
    ca: &CertificateDer<'_>,
    trust_domain: &str,
    cert_der: &[u8],
    scheme: u16,
    msg: &[u8],
    signature: &[u8],
) -> Result<String, SignError> {
    let cert = CertificateDer::from(cert_der);
    if let Some((_, node)) = pki::node_identity(&cert) {
        return Err(SignError::NodeSigner(node));
    }
    let (domain, name) = pki::operator_identity(&cert).ok_or(SignError::NotOperator)?;
    if domain != trust_domain {
        return Err(SignError::ForeignDomain {
            name,
            domain,
            ours: trust_domain.to_owned(),
        });
    }
    let untrusted = |e: webpki::Error| SignError::Untrusted {
        name: name.clone(),
        reason: format!("{e:?}"),
    };
    let anchor = webpki::anchor_from_trusted_cert(ca).map_err(untrusted)?;
    let ee = webpki::EndEntityCert::try_from(&cert).map_err(untrusted)?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        UnixTime::now(),
        webpki::KeyUsage::required(EKU_CODE_SIGNING),
        None,
        None,
    )
    .map_err(untrusted)?;
    verify_signature(&cert, scheme, msg, signature).map_err(|e| match e {
        SignError::Scheme(s) => SignError::Scheme(s),
        _ => SignError::BadSignature(name.clone()),
    })?;
    Ok(name)
}

fn verify_signature(
    cert: &CertificateDer<'_>,
    scheme: u16,
    msg: &[u8],
    signature: &[u8],
) -> Result<(), SignError> {
    let alg = match SignatureScheme::from(scheme) {
        SignatureScheme::ECDSA_NISTP256_SHA256 => webpki::ring::ECDSA_P256_SHA256,
        SignatureScheme::ECDSA_NISTP384_SHA384 => webpki::ring::ECDSA_P384_SHA384,
        SignatureScheme::ED25519 => webpki::ring::ED25519,
        _ => return Err(SignError::Scheme(scheme)),
    };
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| SignError::BadInput(format!("operator certificate: {e:?}")))?;
    ee.verify_signature(alg, msg, signature)
        .map_err(|_| SignError::BadSignature(String::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn operator_signs_and_everything_else_is_refused() {
        let ca = pki::generate_ca("t.mesh").unwrap();
        let ca_der = der(&ca.cert);
        let op = pki::issue_operator_cert(&ca, "alice", "t.mesh").unwrap();
        let signer = OperatorSigner::from_pem(&op.cert, &op.key).unwrap();
        assert_eq!(signer.name(), "alice");
        let (scheme, sig) = signer.sign(b"doc").unwrap();
        let ok = verify(&ca_der, "t.mesh", signer.cert_der(), scheme, b"doc", &sig);
        assert_eq!(ok.as_deref(), Ok("alice"));

        // Changed bytes, another trust domain, another CA.
        let bad = verify(&ca_der, "t.mesh", signer.cert_der(), scheme, b"dog", &sig);
        assert_eq!(bad, Err(SignError::BadSignature("alice".into())));
        let e = verify(&ca_der, "u.mesh", signer.cert_der(), scheme, b"doc", &sig).unwrap_err();
        assert!(matches!(e, SignError::ForeignDomain { .. }), "{e}");
        let other = pki::generate_ca("t.mesh").unwrap();
        let e = verify(
            &der(&other.cert),
            "t.mesh",
            signer.cert_der(),
            scheme,
            b"doc",
            &sig,
        )
        .unwrap_err();
        assert!(matches!(e, SignError::Untrusted { .. }), "{e}");

        // A node certificate cannot sign, even with its own key.
        let node = pki::issue_node_cert(&ca, "n1", "t.mesh").unwrap();
        let e = OperatorSigner::from_pem(&node.cert, &node.key).unwrap_err();
        assert_eq!(e, SignError::NodeSigner("n1".into()));
        let e = verify(
            &ca_der,
            "t.mesh",
            der(&node.cert).as_ref(),
            scheme,
            b"doc",
            &sig,
        )
        .unwrap_err();
        assert_eq!(e, SignError::NodeSigner("n1".into()));

        // A key that is not the certificate's.
        let other_op = pki::issue_operator_cert(&ca, "bob", "t.mesh").unwrap();
        let e = OperatorSigner::from_pem(&op.cert, &other_op.key).unwrap_err();
        assert!(matches!(e, SignError::BadInput(_)), "{e}");
    }
}
