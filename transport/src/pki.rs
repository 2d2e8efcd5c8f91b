//! The mesh PKI: a CA, node certificates issued by it, and loading them.
//!
//! A node certificate names the node twice: as a DNS name (so rustls can
//! check it when we dial a known member) and as the SPIFFE-style URI
//! `spiffe://<trust-domain>/node/<name>` (the identity we read back from a
//! peer after the handshake).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// Default trust domain of a mesh.
pub const DEFAULT_TRUST_DOMAIN: &str = "gossamer.mesh";

/// What went wrong with certificates or keys. The message names the file.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not the PEM it should be.
    #[error("{path}: {problem}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The node certificate does not chain to the CA.
    #[error("{cert} is not signed by the mesh CA in {ca}: {reason}")]
    NotSignedByCa {
        /// The node certificate file.
        cert: PathBuf,
        /// The CA file.
        ca: PathBuf,
        /// rustls' reason.
        reason: String,
    },
    /// The certificate is for another node.
    #[error(
        "{cert} is issued to {found:?}, not to node {expected:?}: use --name {found} or issue a certificate for {expected}"
    )]
    WrongName {
        /// The node certificate file.
        cert: PathBuf,
        /// The name we run as.
        expected: String,
        /// The name in the certificate.
        found: String,
    },
    /// Generating or signing failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file already exists where we would write.
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    /// The node certificate is past its end.
    #[error("{cert} expired at {at}: issue a new one with `gossamer cert issue`")]
    Expired {
        /// The node certificate file.
        cert: PathBuf,
        /// When it expired.
        at: String,
    },
    /// A lifetime too long to represent.
    #[error("--ttl is too long")]
    Ttl,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A freshly generated CA or node certificate, in PEM.
#[derive(Debug, Clone)]
pub struct PemPair {
    /// Certificate PEM.
    pub cert: String,
    /// Private key PEM (PKCS#8).
    pub key: String,
}

/// Creates a new mesh CA.
pub fn generate_ca(trust_domain: &str) -> Result<PemPair, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Gossamer mesh CA ({trust_domain})"),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    Ok(PemPair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Issues a certificate for node `name`, signed by the CA given in PEM,
/// that lets the node host no service (see [`issue_node_cert_hosting`]).
pub fn issue_node_cert(ca: &PemPair, name: &str, trust_domain: &str) -> Result<PemPair, PkiError> {
    issue_node_cert_hosting(ca, name, trust_domain, &Hosts::Only(Vec::new()))
}

/// How long a node certificate is valid unless `cert issue --ttl` says
/// otherwise.
pub const DEFAULT_NODE_TTL: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Sets a certificate's validity to start a minute ago (clocks differ a
/// little) and last `ttl`.
fn valid_for(params: &mut CertificateParams, ttl: std::time::Duration) -> Result<(), PkiError> {
    let now = time::OffsetDateTime::now_utc();
    let ttl = time::Duration::try_from(ttl).map_err(|_| PkiError::Ttl)?;
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now.checked_add(ttl).ok_or(PkiError::Ttl)?;
    Ok(())
}

/// The services a node certificate lets its node host: each is a URI SAN
/// `spiffe://<td>/svc/<name>`, and `spiffe://<td>/svc/*` allows any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hosts {
    /// Any service (`--service '*'`).
    Any,
    /// Only these (none: the node hosts nothing, e.g. a pure client).
    Only(Vec<String>),
}

impl Hosts {
    /// Whether the node may host `service`.
    pub fn allows(&self, service: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(list) => list.iter().any(|s| s == service),
        }
    }
}

impl std::fmt::Display for Hosts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Any => f.write_str("any service"),
            Self::Only(list) if list.is_empty() => f.write_str("no service"),
            Self::Only(list) => f.write_str(&list.join(", ")),
        }
    }
}

/// Issues a certificate for node `name` that may host `hosts`, valid for
/// [`DEFAULT_NODE_TTL`].
pub fn issue_node_cert_hosting(
    ca: &PemPair,
    name: &str,
    trust_domain: &str,
    hosts: &Hosts,
) -> Result<PemPair, PkiError> {
    issue_node_cert_for(ca, name, trust_domain, hosts, DEFAULT_NODE_TTL)
}

/// Issues a certificate for node `name` that may host `hosts`, valid for
/// `ttl` from now.
pub fn issue_node_cert_for(
    ca: &PemPair,
    name: &str,
    trust_domain: &str,
    hosts: &Hosts,
    ttl: std::time::Duration,
) -> Result<PemPair, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![name.to_owned()])?;
    params
        .subject_alt_names
        .push(SanType::URI(spiffe_id(trust_domain, name).try_into()?));
    let services = match hosts {
        Hosts::Any => vec!["*".to_owned()],
        Hosts::Only(list) => list.clone(),
    };
    for service in services {
        params.subject_alt_names.push(SanType::URI(
            format!("spiffe://{trust_domain}/svc/{service}").try_into()?,
        ));
    }
    valid_for(&mut params, ttl)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &issuer)?;
    Ok(PemPair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Issues an operator certificate for `name`: for signing configuration
/// documents only. Its URI is `spiffe://<trust-domain>/operator/<name>` and
/// its only extended key usage is code signing, so TLS (which wants client
/// or server authentication) refuses it as a node identity, and a node
/// certificate (which lacks code signing) cannot sign documents.
pub fn issue_operator_cert(
    ca: &PemPair,
    name: &str,
    trust_domain: &str,
) -> Result<PemPair, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names.push(SanType::URI(
        format!("spiffe://{trust_domain}/operator/{name}").try_into()?,
    ));
    params
        .distinguished_name
        .push(DnType::CommonName, format!("operator {name}"));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    let cert = params.signed_by(&key, &issuer)?;
    Ok(PemPair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Reads the operator name out of a certificate's
/// `spiffe://…/operator/<name>` URI. Returns the trust domain and the name.
pub fn operator_identity(cert: &CertificateDer<'_>) -> Option<(String, String)> {
    spiffe_path(cert, "operator/")
}

/// `spiffe://<trust-domain>/node/<name>`.
pub fn spiffe_id(trust_domain: &str, name: &str) -> String {
    format!("spiffe://{trust_domain}/node/{name}")
}

/// Reads the node name out of a certificate's `spiffe://…/node/<name>` URI.
/// Returns the trust domain and the name.
pub fn node_identity(cert: &CertificateDer<'_>) -> Option<(String, String)> {
    spiffe_path(cert, "node/")
}

/// When a certificate stops being valid.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<std::time::SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let secs = parsed.validity().not_after.timestamp();
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(secs).ok()?))
}

/// `2026-12-31 23:59:59 UTC`.
pub fn humane_utc(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    time::OffsetDateTime::from_unix_timestamp(secs).map_or_else(
        |_| format!("{secs} (Unix time)"),
        |d| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
                d.year(),
                u8::from(d.month()),
                d.day(),
                d.hour(),
                d.minute(),
                d.second()
            )
        },
    )
}

/// The services a node certificate names (`spiffe://…/svc/<name>` URIs):
/// none listed means the node may host none.
pub fn node_hosts(cert: &CertificateDer<'_>) -> Hosts {
    let names: Vec<String> = spiffe_paths(cert, "svc/")
        .into_iter()
        .map(|(_, name)| name)
        .collect();
    if names.iter().any(|n| n == "*") {
        Hosts::Any
    } else {
        Hosts::Only(names)
    }
}

/// The trust domain and the name of the first `spiffe://<td>/<prefix><name>`
/// URI in the certificate.
fn spiffe_path(cert: &CertificateDer<'_>, prefix: &str) -> Option<(String, String)> {
    spiffe_paths(cert, prefix).into_iter().next()
}

/// Every `spiffe://<td>/<prefix><name>` URI in the certificate, as (trust
/// domain, name).
fn spiffe_paths(cert: &CertificateDer<'_>, prefix: &str) -> Vec<(String, String)> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => {
                let rest = uri.strip_prefix("spiffe://")?;
                let (domain, path) = rest.split_once('/')?;
                let name = path.strip_prefix(prefix)?;
                (!name.is_empty() && !name.contains('/'))
                    .then(|| (domain.to_owned(), name.to_owned()))
            }
            _ => None,
        })
        .collect()
}

/// Writes `contents` to `path`, refusing to overwrite, with mode 0600 for keys.
pub fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    use std::io::Write;
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists(path.to_owned())
        } else {
            io(path)(e)
        }
    })?;
    file.write_all(contents.as_bytes()).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// Reads a PEM pair from two files.
pub fn read_pair(cert: &Path, key: &Path) -> Result<PemPair, PkiError> {
    Ok(PemPair {
        cert: fs::read_to_string(cert).map_err(io(cert))?,
        key: fs::read_to_string(key).map_err(io(key))?,
    })
}

/// Everything a node needs to take part in the mesh's mutual TLS.
#[derive(Clone)]
pub struct MeshIdentity {
    /// This node's name (from its certificate).
    pub name: String,
    /// The mesh trust domain (from its certificate).
    pub trust_domain: String,
    /// This node's certificate chain.
    pub chain: Vec<CertificateDer<'static>>,
    /// This node's private key.
    pub key: Arc<PrivateKeyDer<'static>>,
    /// The mesh CA.
    pub roots: Arc<RootCertStore>,
    /// The mesh CA certificate (the first in the CA file): what operator
    /// signatures must chain to.
    pub ca_cert: CertificateDer<'static>,
    /// The services this node's certificate lets it host.
    pub hosts: Hosts,
    /// When this node's certificate expires.
    pub not_after: std::time::SystemTime,
}

impl std::fmt::Debug for MeshIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshIdentity")
            .field("name", &self.name)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl MeshIdentity {
    /// Loads and checks a node's identity: the certificate must chain to the
    /// CA and name `expected_name` (when given).
    pub fn load(
        ca_path: &Path,
        cert_path: &Path,
        key_path: &Path,
        expected_name: Option<&str>,
    ) -> Result<Self, PkiError> {
        let bad = |path: &Path, problem: String| PkiError::BadPem {
            path: path.to_owned(),
            problem,
        };
        let ca_pem = fs::read(ca_path).map_err(io(ca_path))?;
        let cert_pem = fs::read(cert_path).map_err(io(cert_path))?;
        let key_pem = fs::read(key_path).map_err(io(key_path))?;

        let mut roots = RootCertStore::empty();
        let mut ca_cert = None;
        for ca in CertificateDer::pem_slice_iter(&ca_pem) {
            let ca = ca.map_err(|e| bad(ca_path, format!("not a PEM certificate ({e})")))?;
            ca_cert.get_or_insert_with(|| ca.clone());
            roots
                .add(ca)
                .map_err(|e| bad(ca_path, format!("not a usable CA certificate ({e})")))?;
        }
        let Some(ca_cert) = ca_cert.filter(|_| !roots.is_empty()) else {
            return Err(bad(ca_path, "holds no certificate".into()));
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| bad(cert_path, format!("not a PEM certificate ({e})")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| bad(cert_path, "holds no certificate".into()))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| bad(key_path, format!("not a PEM private key ({e})")))?;
        let (trust_domain, name) = node_identity(leaf).ok_or_else(|| {
            bad(
                cert_path,
                "has no spiffe://<trust-domain>/node/<name> URI; issue it with `gossamer cert issue`"
                    .into(),
            )
        })?;
        let roots = Arc::new(roots);
        let verifier = WebPkiServerVerifier::builder_with_provider(
            roots.clone(),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| bad(ca_path, e.to_string()))?;
        let server_name = ServerName::try_from(name.clone())
            .map_err(|_| bad(cert_path, format!("node name {name:?} is not a DNS name")))?;
        if let Some(end) = not_after(leaf)
            && end < std::time::SystemTime::now()
        {
            return Err(PkiError::Expired {
                cert: cert_path.to_owned(),
                at: humane_utc(end),
            });
        }
        verifier
            .verify_server_cert(leaf, &chain[1..], &server_name, &[], UnixTime::now())
            .map_err(|e| PkiError::NotSignedByCa {
                cert: cert_path.to_owned(),
                ca: ca_path.to_owned(),
                reason: e.to_string(),
            })?;
        if let Some(expected) = expected_name
            && expected != name
        {
            return Err(PkiError::WrongName {
                cert: cert_path.to_owned(),
                expected: expected.to_owned(),
                found: name,
            });
        }
        let hosts = node_hosts(leaf);
        let not_after = not_after(leaf)
            .ok_or_else(|| bad(cert_path, "has no readable validity period".into()))?;
        let identity = Self {
            name,
            trust_domain,
            hosts,
            not_after,
            chain,
            key: Arc::new(key),
            roots,
            ca_cert,
        };
        // Catch a key that does not belong to the certificate now, not at
        // the first handshake.
        crate::tls::server_config(&identity, Default::default(), Default::default())
            .map_err(|e| bad(key_path, e.to_string()))?;
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn issue_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let ca = generate_ca("test.mesh").unwrap();
        let node = issue_node_cert(&ca, "n1", "test.mesh").unwrap();
        let ca_p = write(dir.path(), "ca.pem", &ca.cert);
        let cert_p = write(dir.path(), "n1.pem", &node.cert);
        let key_p = write(dir.path(), "n1.key", &node.key);
        let id = MeshIdentity::load(&ca_p, &cert_p, &key_p, Some("n1")).unwrap();
        assert_eq!(id.name, "n1");
        assert_eq!(id.trust_domain, "test.mesh");

        let err = MeshIdentity::load(&ca_p, &cert_p, &key_p, Some("n2")).unwrap_err();
        assert!(matches!(err, PkiError::WrongName { .. }), "{err}");

        let other_ca = generate_ca("test.mesh").unwrap();
        let other_p = write(dir.path(), "other.pem", &other_ca.cert);
        let err = MeshIdentity::load(&other_p, &cert_p, &key_p, None).unwrap_err();
        assert!(matches!(err, PkiError::NotSignedByCa { .. }), "{err}");

        let other_key = issue_node_cert(&ca, "n1", "test.mesh").unwrap().key;
        let wrong_key_p = write(dir.path(), "wrong.key", &other_key);
        assert!(MeshIdentity::load(&ca_p, &cert_p, &wrong_key_p, None).is_err());

        assert_eq!(id.hosts, Hosts::Only(Vec::new()));
        let web = issue_node_cert_hosting(
            &ca,
            "n1",
            "test.mesh",
            &Hosts::Only(vec!["web".into(), "api".into()]),
        )
        .unwrap();
        let web_p = write(dir.path(), "web.pem", &web.cert);
        let web_key = write(dir.path(), "web.key", &web.key);
        let id = MeshIdentity::load(&ca_p, &web_p, &web_key, Some("n1")).unwrap();
        assert!(id.hosts.allows("web") && id.hosts.allows("api") && !id.hosts.allows("db"));
        let any = issue_node_cert_hosting(&ca, "n1", "test.mesh", &Hosts::Any).unwrap();
        let der = CertificateDer::from_pem_slice(any.cert.as_bytes()).unwrap();
        assert_eq!(node_hosts(&der), Hosts::Any);
        assert_eq!(node_identity(&der).unwrap().1, "n1");

        // A certificate past its end is refused, and the error says when.
        let short = issue_node_cert_for(
            &ca,
            "n1",
            "test.mesh",
            &Hosts::Any,
            std::time::Duration::from_secs(1),
        )
        .unwrap();
        let short_p = write(dir.path(), "short.pem", &short.cert);
        let short_key = write(dir.path(), "short.key", &short.key);
        let id = MeshIdentity::load(&ca_p, &short_p, &short_key, None).unwrap();
        assert!(id.not_after > std::time::SystemTime::now());
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let err = MeshIdentity::load(&ca_p, &short_p, &short_key, None).unwrap_err();
        assert!(
            matches!(err, PkiError::Expired { .. }) && err.to_string().contains("expired at"),
            "{err}"
        );

        let junk = write(dir.path(), "junk.pem", "hello");
        assert!(MeshIdentity::load(&junk, &cert_p, &key_p, None).is_err());
        assert!(MeshIdentity::load(&dir.path().join("missing"), &cert_p, &key_p, None).is_err());
    }

    #[test]
    fn write_new_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_new(&p, "a", true).unwrap();
        assert!(matches!(write_new(&p, "b", true), Err(PkiError::Exists(_))));
        assert_eq!(fs::read_to_string(&p).unwrap(), "a");
    }
}
