//! Certificate revocation: X.509 CRLs signed by the mesh CA, and the set of
//! revoked serial numbers the TLS verifiers consult.
//!
//! `gossamer cert revoke` writes a standard CRL; it spreads as a
//! configuration document, and every agent checks the CA's signature on it
//! before handing its serials to [`Revocations`]. The verifiers refuse a
//! revoked certificate at the handshake, and the transport closes the
//! connections already open with one.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, RevokedCertParams};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::pki::{PemPair, PkiError};

/// Largest CRL accepted (DER): about 1,500 entries.
pub const MAX_CRL: usize = 48 * 1024;

/// A certificate's serial number as unsigned big-endian bytes, without
/// leading zeros (how both sides of a comparison are normalised).
pub fn serial_of(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.tbs_certificate.serial.to_bytes_be())
}

/// Lower-case hex, as `cert revoke --serial` takes it.
pub fn serial_hex(serial: &[u8]) -> String {
    serial.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses `cert revoke --serial` (hex, optional `:` separators).
pub fn parse_serial(text: &str) -> Option<Vec<u8>> {
    let digits: String = text.chars().filter(|c| *c != ':').collect();
    if digits.is_empty() || digits.len() > 40 || !digits.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).ok())
        .collect();
    let bytes = bytes?;
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let trimmed = bytes[first..].to_vec();
    (!trimmed.is_empty()).then_some(trimmed)
}

/// One revoked certificate in a CRL being written.
#[derive(Debug, Clone)]
pub struct Revoked {
    /// Its serial number.
    pub serial: Vec<u8>,
    /// When it was revoked.
    pub at: SystemTime,
}

/// A CRL that checked out against the mesh CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationList {
    /// The CRL number (grows with every CRL the CA writes).
    pub number: u64,
    /// When the CA wrote it.
    pub this_update: SystemTime,
    /// The serial numbers it revokes.
    pub serials: Vec<Vec<u8>>,
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Writes a CRL (PEM) signed by the CA, listing `revoked`, numbered
/// `number`. Agents keep a CRL in force until a newer one replaces it;
/// `nextUpdate` is set a year ahead only because X.509 wants one.
pub fn write_crl(ca: &PemPair, revoked: &[Revoked], number: u64) -> Result<String, PkiError> {
    let key = KeyPair::from_pem(&ca.key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, key)?;
    let now = time::OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(365),
        crl_number: number.into(),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|r| RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(&r.serial),
                revocation_time: offset(r.at),
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(&issuer)?.pem()?)
}

/// Reads a CRL (PEM or DER) and checks that the mesh CA `ca` signed it.
/// The error says what is wrong, for the operator.
pub fn read_crl(bytes: &[u8], ca: &CertificateDer<'_>) -> Result<RevocationList, String> {
    let der = if bytes.trim_ascii_start().starts_with(b"-----") {
        rustls_pki_types::CertificateRevocationListDer::from_pem_slice(bytes)
            .map_err(|e| format!("not a PEM X509 CRL ({e})"))?
            .as_ref()
            .to_vec()
    } else {
        bytes.to_vec()
    };
    if der.len() > MAX_CRL {
        return Err(format!(
            "the CRL is {} bytes; at most {MAX_CRL} are accepted",
            der.len()
        ));
    }
    let (rest, crl) =
        x509_parser::parse_x509_crl(&der).map_err(|e| format!("not an X.509 CRL: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the CRL".into());
    }
    let (_, ca) = x509_parser::parse_x509_certificate(ca.as_ref())
        .map_err(|e| format!("the mesh CA certificate does not parse: {e}"))?;
    if crl.issuer() != ca.subject() {
        return Err(format!(
            "issued by {}, not by the mesh CA ({})",
            crl.issuer(),
            ca.subject()
        ));
    }
    crl.verify_signature(ca.public_key())
        .map_err(|e| format!("not signed by the mesh CA ({e})"))?;
    let number = crl
        .crl_number()
        .and_then(|n| u64::try_from(n.clone()).ok())
        .ok_or("the CRL has no CRL number (write it with `gossamer cert revoke`)")?;
    let this_update =
        UNIX_EPOCH + Duration::from_secs(u64::try_from(crl.last_update().timestamp()).unwrap_or(0));
    let serials = crl
        .iter_revoked_certificates()
        .map(|r| r.serial().to_bytes_be())
        .collect();
    Ok(RevocationList {
        number,
        this_update,
        serials,
    })
}

/// The revoked serial numbers in force, and the peers refused for one.
/// Shared by the TLS verifiers and the transport.
#[derive(Debug, Default)]
pub struct Revocations {
    serials: RwLock<Arc<HashSet<Vec<u8>>>>,
    /// Node name → the revoked serial it presented last.
    peers: Mutex<BTreeMap<String, String>>,
    /// Grows whenever `peers` changes.
    generation: AtomicU64,
}

impl Revocations {
    /// Replaces the revoked serials. Returns whether they changed.
    pub fn set(&self, serials: HashSet<Vec<u8>>) -> bool {
        let mut current = self.serials.write().unwrap_or_else(|e| e.into_inner());
        if **current == serials {
            return false;
        }
        *current = Arc::new(serials);
        drop(current);
        // A peer refused under the old list may be fine under the new one.
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let serials = self.serials();
        peers.retain(|_, hex| serials.iter().any(|s| serial_hex(s) == *hex));
        drop(peers);
        self.generation.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The revoked serials.
    pub fn serials(&self) -> Arc<HashSet<Vec<u8>>> {
        self.serials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many serials are revoked.
    pub fn len(&self) -> usize {
        self.serials.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `serial` is revoked.
    pub fn contains(&self, serial: &[u8]) -> bool {
        self.serials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(serial)
    }

    /// The serial of `cert` if it is revoked, and notes the node it names.
    pub fn check(&self, cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
        if self.is_empty() {
            return None;
        }
        let serial = serial_of(cert)?;
        if !self.contains(&serial) {
            return None;
        }
        if let Some((_, name)) = crate::pki::node_identity(cert) {
            self.note(&name, &serial);
        }
        Some(serial)
    }

    /// Records that `name` presented the revoked `serial`.
    pub fn note(&self, name: &str, serial: &[u8]) {
        let hex = serial_hex(serial);
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.get(name) != Some(&hex) {
            peers.insert(name.to_owned(), hex);
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `name` connected with a certificate that is not revoked.
    pub fn clear(&self, name: &str) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.remove(name).is_some() {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Peers refused for a revoked certificate: name → serial (hex).
    pub fn peers(&self) -> BTreeMap<String, String> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Grows whenever [`Self::peers`] changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;

    #[test]
    fn crls_round_trip_and_check_their_signer() {
        let ca = pki::generate_ca("t.mesh").unwrap();
        let ca_der = CertificateDer::from_pem_slice(ca.cert.as_bytes()).unwrap();
        let n1 = pki::issue_node_cert(&ca, "n1", "t.mesh").unwrap();
        let n1_der = CertificateDer::from_pem_slice(n1.cert.as_bytes()).unwrap();
        let serial = serial_of(&n1_der).unwrap();
        assert_eq!(parse_serial(&serial_hex(&serial)), Some(serial.clone()));
        assert_eq!(parse_serial("00:0a"), Some(vec![10]));
        assert_eq!(parse_serial("xyz"), None);
        assert_eq!(parse_serial("abc"), None);

        let at = SystemTime::now();
        let pem = write_crl(
            &ca,
            &[Revoked {
                serial: serial.clone(),
                at,
            }],
            7,
        )
        .unwrap();
        let list = read_crl(pem.as_bytes(), &ca_der).unwrap();
        assert_eq!(list.number, 7);
        assert_eq!(list.serials, vec![serial.clone()]);
        let der =
            rustls_pki_types::CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(read_crl(der.as_ref(), &ca_der).unwrap(), list);

        // Another CA's CRL, a tampered one, and junk are refused.
        let other = pki::generate_ca("t.mesh").unwrap();
        let forged = write_crl(&other, &[], 8).unwrap();
        let err = read_crl(forged.as_bytes(), &ca_der).unwrap_err();
        assert!(err.contains("not signed by the mesh CA"), "{err}");
        let mut bad = der.as_ref().to_vec();
        let n = bad.len();
        bad[n - 3] ^= 1;
        assert!(read_crl(&bad, &ca_der).is_err());
        assert!(read_crl(b"hello", &ca_der).is_err());

        // The shared set notes who presented a revoked certificate.
        let revocations = Revocations::default();
        assert_eq!(revocations.check(&n1_der), None);
        assert!(revocations.set(list.serials.into_iter().collect()));
        assert_eq!(revocations.check(&n1_der), Some(serial.clone()));
        assert_eq!(revocations.peers().get("n1"), Some(&serial_hex(&serial)));
        let g = revocations.generation();
        assert!(revocations.set(HashSet::new()));
        assert!(revocations.peers().is_empty() && revocations.generation() > g);
    }
}
