//! A signed configuration document: what operators write, what agents
//! check, store and pass on.
//!
//! The signature covers the *canonical bytes*: a fixed prefix, then kind,
//! name, version, the tombstone flag and the body as canonical JSON (object
//! keys sorted, no whitespace), each length-prefixed. Every node computes
//! them the same way, so any node can check a copy it got from any other,
//! and the digest of those bytes decides between two documents that carry
//! the same version.

use gossamer_membership::codec::{self, CodecError};
use gossamer_membership::docs::DocStamp;
use gossamer_transport::sign::{self, OperatorSigner, SignError};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::route::RouteSpec;

/// Largest document body (canonical JSON).
pub const MAX_BODY: usize = 64 * 1024;
/// Largest encoded envelope: the body, the certificate and the signature.
pub const MAX_ENVELOPE: usize = MAX_BODY + 16 * 1024;
/// Longest document name.
pub const MAX_NAME: usize = 63;
/// The kinds this agent knows.
pub const KINDS: &[&str] = &["route", "authz", "crl", "ingress", "external"];

const SIGNED_PREFIX: &[u8] = b"gossamer-document-v1\0";

/// Why a document was refused. The message names the document, the field
/// and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocError {
    /// The kind is not one this agent knows.
    #[error("kind {0:?} is not known (known: {known})", known = KINDS.join(", "))]
    UnknownKind(String),
    /// The name breaks the naming rules.
    #[error(
        "{kind} {name:?}: name must be 1-{MAX_NAME} characters of a-z, 0-9, '-', '_' and '.', starting with a letter or digit"
    )]
    BadName {
        /// The kind.
        kind: String,
        /// The name.
        name: String,
    },
    /// Over a size cap.
    #[error("{what} is {len} bytes, over the {max}-byte limit")]
    TooLarge {
        /// What.
        what: String,
        /// Its size.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The signature, the signer or its certificate is not acceptable.
    #[error("{kind} {name}: {source}")]
    Signature {
        /// The kind.
        kind: String,
        /// The name.
        name: String,
        /// Why.
        source: SignError,
    },
    /// The document carries no signature.
    #[error(
        "{kind} {name}: unsigned (sign it with `gossamer config apply --operator-cert --operator-key`)"
    )]
    Unsigned {
        /// The kind.
        kind: String,
        /// The name.
        name: String,
    },
    /// The body fails its kind's checks.
    #[error("{kind} {name}: {problem}")]
    Invalid {
        /// The kind.
        kind: String,
        /// The name.
        name: String,
        /// Field and problem.
        problem: String,
    },
    /// An older or equal version than the one in force.
    #[error("{kind} {name}: version {version} is not newer than version {live} in force")]
    Stale {
        /// The kind.
        kind: String,
        /// The name.
        name: String,
        /// The version offered.
        version: u64,
        /// The version in force.
        live: u64,
    },
    /// The store is full.
    #[error("{0}")]
    Full(String),
    /// The bytes are not an envelope.
    #[error("malformed document: {0}")]
    Malformed(String),
}

impl DocError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownKind(_) => "unknown_kind",
            Self::BadName { .. } => "bad_name",
            Self::TooLarge { .. } => "too_large",
            Self::Signature {
                source: SignError::NodeSigner(_),
                ..
            } => "node_signer",
            Self::Signature {
                source: SignError::ForeignDomain { .. },
                ..
            }
            | Self::Signature {
                source: SignError::Untrusted { .. },
                ..
            } => "untrusted_signer",
            Self::Signature { .. } => "bad_signature",
            Self::Unsigned { .. } => "unsigned",
            Self::Invalid { .. } => "invalid",
            Self::Stale { .. } => "stale",
            Self::Full(_) => "full",
            Self::Malformed(_) => "malformed",
        }
    }
}

/// A signed document, as it travels and as it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The kind (`route`, ...).
    pub kind: String,
    /// The name (for a route: the destination service).
    pub name: String,
    /// Higher wins.
    pub version: u64,
    /// A tombstone: the document is deleted (the body is `null`).
    pub deleted: bool,
    /// The body, canonical JSON.
    pub body: String,
    /// TLS signature scheme code of the signature.
    pub scheme: u16,
    /// The operator certificate, DER.
    pub signer_cert: Vec<u8>,
    /// The signature over [`Envelope::signed_bytes`].
    pub signature: Vec<u8>,
}

/// The envelope as JSON (the admin API): the body as a JSON value, the
/// certificate as PEM, the signature in hex.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeJson {
    /// See [`Envelope::kind`].
    pub kind: String,
    /// See [`Envelope::name`].
    pub name: String,
    /// See [`Envelope::version`].
    pub version: u64,
    /// See [`Envelope::deleted`].
    #[serde(default)]
    pub deleted: bool,
    /// The body.
    pub body: Value,
    /// See [`Envelope::scheme`].
    #[serde(default)]
    pub scheme: u16,
    /// The operator certificate, PEM.
    #[serde(default)]
    pub signer_cert: String,
    /// The signature, hex.
    #[serde(default)]
    pub signature: String,
}

/// What a check of an envelope found.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The operator who signed it.
    pub signer: String,
    /// Version and digest.
    pub stamp: DocStamp,
}

/// JSON with object keys sorted and no whitespace.
pub fn canonical_json(v: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    write(&map[k], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

/// Checks a kind and a name.
pub fn check_key(kind: &str, name: &str) -> Result<(), DocError> {
    if !KINDS.contains(&kind) {
        return Err(DocError::UnknownKind(kind.to_owned()));
    }
    let mesh_wide = kind == "authz" && name == super::authz::MESH_DEFAULT;
    let ok = mesh_wide
        || !name.is_empty()
            && name.len() <= MAX_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
            && name.as_bytes()[0].is_ascii_alphanumeric();
    if !ok {
        return Err(DocError::BadName {
            kind: kind.to_owned(),
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Checks a body against its kind's schema.
pub fn check_body(kind: &str, name: &str, body: &Value) -> Result<(), DocError> {
    let invalid = |problem: String| DocError::Invalid {
        kind: kind.to_owned(),
        name: name.to_owned(),
        problem,
    };
    match kind {
        "route" => {
            gossamer_membership::catalog::validate_service_name(name)
                .map_err(|e| invalid(format!("name: {e}")))?;
            let spec: RouteSpec =
                serde_json::from_value(body.clone()).map_err(|e| invalid(e.to_string()))?;
            spec.validate().map_err(invalid)
        }
        "authz" => {
            if name != super::authz::MESH_DEFAULT {
                gossamer_membership::catalog::validate_service_name(name).map_err(|e| {
                    invalid(format!("name: {e} (or \"*\" for the mesh-wide default)"))
                })?;
            }
            let spec: super::authz::AuthzSpec =
                serde_json::from_value(body.clone()).map_err(|e| invalid(e.to_string()))?;
            spec.validate(name).map_err(invalid)
        }
        "crl" => crl_pem(body).map(drop).map_err(invalid),
        "ingress" => {
            let spec: super::ingress::IngressSpec =
                serde_json::from_value(body.clone()).map_err(|e| invalid(e.to_string()))?;
            spec.validate().map_err(invalid)
        }
        "external" => {
            gossamer_membership::catalog::validate_service_name(name)
                .map_err(|e| invalid(format!("name: {e}")))?;
            let spec: super::external::ExternalSpec =
                serde_json::from_value(body.clone()).map_err(|e| invalid(e.to_string()))?;
            spec.validate().map_err(invalid)
        }
        other => Err(DocError::UnknownKind(other.to_owned())),
    }
}

/// A `crl` body: `{"pem": "-----BEGIN X509 CRL-----..."}`, written by
/// `gossamer cert revoke`. Returns the PEM text; whether the mesh CA
/// signed it is checked with the CA at hand ([`Envelope::check`]).
pub fn crl_pem(body: &Value) -> Result<&str, String> {
    let Value::Object(fields) = body else {
        return Err("expected a table with `pem`".into());
    };
    if let Some(other) = fields.keys().find(|k| *k != "pem") {
        return Err(format!("unknown field `{other}`, expected `pem`"));
    }
    let pem = fields
        .get("pem")
        .and_then(Value::as_str)
        .ok_or("pem: required (the CRL file from `gossamer cert revoke`)")?;
    if !pem.contains("-----BEGIN X509 CRL-----") {
        return Err("pem: not a PEM X509 CRL".into());
    }
    Ok(pem)
}

impl Envelope {
    /// A document ready to sign: `body` is checked and made canonical.
    pub fn new(
        kind: &str,
        name: &str,
        version: u64,
        body: Option<&Value>,
    ) -> Result<Self, DocError> {
        check_key(kind, name)?;
        let body = match body {
            Some(b) => {
                check_body(kind, name, b)?;
                canonical_json(b)
            }
            None => "null".to_owned(),
        };
        if body.len() > MAX_BODY {
            return Err(DocError::TooLarge {
                what: format!("{kind} {name}"),
                len: body.len(),
                max: MAX_BODY,
            });
        }
        Ok(Self {
            kind: kind.to_owned(),
            name: name.to_owned(),
            version,
            deleted: body == "null",
            body,
            scheme: 0,
            signer_cert: Vec::new(),
            signature: Vec::new(),
        })
    }

    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SIGNED_PREFIX.len() + self.body.len() + 96);
        out.extend_from_slice(SIGNED_PREFIX);
        for part in [self.kind.as_bytes(), self.name.as_bytes()] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part);
        }
        out.extend_from_slice(&self.version.to_be_bytes());
        out.push(u8::from(self.deleted));
        out.extend_from_slice(&(self.body.len() as u32).to_be_bytes());
        out.extend_from_slice(self.body.as_bytes());
        out
    }

    /// Version and the SHA-256 of the signed bytes.
    pub fn stamp(&self) -> DocStamp {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.signed_bytes());
        let mut digest = [0u8; 32];
        digest.copy_from_slice(d.as_ref());
        DocStamp {
            version: self.version,
            digest,
        }
    }

    /// Signs it as `signer`.
    pub fn sign(&mut self, signer: &OperatorSigner) -> Result<(), SignError> {
        let (scheme, signature) = signer.sign(&self.signed_bytes())?;
        self.scheme = scheme;
        self.signature = signature;
        self.signer_cert = signer.cert_der().to_vec();
        Ok(())
    }

    /// Everything a receiver checks: key, sizes, the signature by an
    /// operator of this mesh, and the body against its kind.
    pub fn check(&self, ca: &CertificateDer<'_>, trust_domain: &str) -> Result<Checked, DocError> {
        check_key(&self.kind, &self.name)?;
        if self.body.len() > MAX_BODY {
            return Err(DocError::TooLarge {
                what: format!("{} {}", self.kind, self.name),
                len: self.body.len(),
                max: MAX_BODY,
            });
        }
        if self.signature.is_empty() || self.signer_cert.is_empty() {
            return Err(DocError::Unsigned {
                kind: self.kind.clone(),
                name: self.name.clone(),
            });
        }
        let signer = sign::verify(
            ca,
            trust_domain,
            &self.signer_cert,
            self.scheme,
            &self.signed_bytes(),
            &self.signature,
        )
        .map_err(|source| DocError::Signature {
            kind: self.kind.clone(),
            name: self.name.clone(),
            source,
        })?;
        let body: Value = serde_json::from_str(&self.body)
            .map_err(|e| DocError::Malformed(format!("{} {}: body: {e}", self.kind, self.name)))?;
        if canonical_json(&body) != self.body {
            return Err(DocError::Malformed(format!(
                "{} {}: body is not canonical JSON",
                self.kind, self.name
            )));
        }
        if self.deleted != body.is_null() {
            return Err(DocError::Malformed(format!(
                "{} {}: a tombstone has a null body, and only a tombstone",
                self.kind, self.name
            )));
        }
        if !self.deleted {
            check_body(&self.kind, &self.name, &body)?;
            if self.kind == "crl" {
                // Only the mesh CA may revoke: its signature on the CRL is
                // checked as well as the operator's on the envelope.
                let pem = crl_pem(&body).map_err(|p| DocError::Invalid {
                    kind: self.kind.clone(),
                    name: self.name.clone(),
                    problem: p,
                })?;
                gossamer_transport::revocation::read_crl(pem.as_bytes(), ca).map_err(|p| {
                    DocError::Invalid {
                        kind: self.kind.clone(),
                        name: self.name.clone(),
                        problem: p,
                    }
                })?;
            }
        }
        Ok(Checked {
            signer,
            stamp: self.stamp(),
        })
    }

    /// The wire and disk encoding.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode_large(self, MAX_ENVELOPE)
    }

    /// Decodes untrusted bytes (size-capped).
    pub fn decode(bytes: &[u8]) -> Result<Self, DocError> {
        codec::decode_large(bytes, MAX_ENVELOPE).map_err(|e| DocError::Malformed(e.to_string()))
    }

    /// The JSON form.
    pub fn to_json(&self) -> EnvelopeJson {
        EnvelopeJson {
            kind: self.kind.clone(),
            name: self.name.clone(),
            version: self.version,
            deleted: self.deleted,
            body: serde_json::from_str(&self.body).unwrap_or(Value::Null),
            scheme: self.scheme,
            signer_cert: if self.signer_cert.is_empty() {
                String::new()
            } else {
                pem_cert(&self.signer_cert)
            },
            signature: hex(&self.signature),
        }
    }

    /// From the JSON form; the signature is checked later by
    /// [`Envelope::check`].
    pub fn from_json(j: &EnvelopeJson) -> Result<Self, DocError> {
        let signer_cert = if j.signer_cert.trim().is_empty() {
            Vec::new()
        } else {
            use rustls_pki_types::pem::PemObject;
            CertificateDer::from_pem_slice(j.signer_cert.as_bytes())
                .map_err(|e| {
                    DocError::Malformed(format!("signer_cert: not a PEM certificate ({e})"))
                })?
                .to_vec()
        };
        let signature =
            unhex(&j.signature).ok_or_else(|| DocError::Malformed("signature: not hex".into()))?;
        Ok(Self {
            kind: j.kind.clone(),
            name: j.name.clone(),
            version: j.version,
            deleted: j.deleted,
            body: canonical_json(&j.body),
            scheme: j.scheme,
            signer_cert,
            signature,
        })
    }
}

/// Bytes in lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn pem_cert(der: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= n {
                b64.push(TABLE[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The name a CRL file is applied under: one revocation list per mesh.
pub const CRL_NAME: &str = "mesh";

/// Reads an operator's file: TOML (or JSON) whose top-level keys are kinds,
/// each an array of tables with a `name` and the body's fields. Returns
/// (kind, name, body) in file order.
pub fn parse_file(path: &str, text: &str) -> Result<Vec<(String, String, Value)>, String> {
    if text.trim_start().starts_with("-----BEGIN X509 CRL-----") {
        // A CRL file from `gossamer cert revoke`, as it is.
        return Ok(vec![(
            "crl".into(),
            CRL_NAME.into(),
            serde_json::json!({ "pem": text }),
        )]);
    }
    let value: Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| format!("{path}: not valid JSON: {e}"))?
    } else {
        let t: toml::Table = toml::from_str(text).map_err(|e| format!("{path}: {e}"))?;
        serde_json::to_value(t).map_err(|e| format!("{path}: {e}"))?
    };
    let Value::Object(top) = value else {
        return Err(format!("{path}: expected a table of document kinds"));
    };
    let mut out = Vec::new();
    for (kind, docs) in top {
        if !KINDS.contains(&kind.as_str()) {
            return Err(format!(
                "{path}: {kind:?} is not a document kind (known: {})",
                KINDS.join(", ")
            ));
        }
        let Value::Array(docs) = docs else {
            return Err(format!(
                "{path}: {kind}: expected an array of tables ([[{kind}]])"
            ));
        };
        for (i, doc) in docs.into_iter().enumerate() {
            let Value::Object(mut body) = doc else {
                return Err(format!("{path}: {kind}[{i}]: expected a table"));
            };
            let name = match body.remove("name") {
                Some(Value::String(n)) => n,
                _ => return Err(format!("{path}: {kind}[{i}]: name: required (a string)")),
            };
            out.push((kind.clone(), name, Value::Object(body)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gossamer_transport::pki;
    use rustls_pki_types::pem::PemObject;

    fn setup() -> (CertificateDer<'static>, OperatorSigner, pki::PemPair) {
        let ca = pki::generate_ca("t.mesh").unwrap();
        let op = pki::issue_operator_cert(&ca, "alice", "t.mesh").unwrap();
        let signer = OperatorSigner::from_pem(&op.cert, &op.key).unwrap();
        (
            CertificateDer::from_pem_slice(ca.cert.as_bytes()).unwrap(),
            signer,
            ca,
        )
    }

    #[test]
    fn signed_documents_check_out_and_tampering_does_not() {
        let (ca, signer, _) = setup();
        let body = serde_json::json!({"backends": [{"weight": 1}], "sticky": "path"});
        let mut env = Envelope::new("route", "web", 3, Some(&body)).unwrap();
        assert_eq!(env.body, r#"{"backends":[{"weight":1}],"sticky":"path"}"#);
        env.sign(&signer).unwrap();
        let checked = env.check(&ca, "t.mesh").unwrap();
        assert_eq!(checked.signer, "alice");
        assert_eq!(checked.stamp, env.stamp());

        // Through JSON and the wire codec, unchanged.
        let back = Envelope::from_json(&env.to_json()).unwrap();
        assert_eq!(back, env);
        assert_eq!(Envelope::decode(&env.encode().unwrap()).unwrap(), env);

        let mut bumped = env.clone();
        bumped.version = 4;
        let e = bumped.check(&ca, "t.mesh").unwrap_err();
        assert_eq!(e.reason(), "bad_signature", "{e}");
        let mut unsigned = env.clone();
        unsigned.signature.clear();
        assert_eq!(
            unsigned.check(&ca, "t.mesh").unwrap_err().reason(),
            "unsigned"
        );
        assert_eq!(
            env.check(&ca, "u.mesh").unwrap_err().reason(),
            "untrusted_signer"
        );
    }

    #[test]
    fn bad_bodies_and_names_are_refused_before_signing() {
        let e =
            Envelope::new("route", "web", 1, Some(&serde_json::json!({"weigth": 1}))).unwrap_err();
        assert!(
            e.to_string().contains("route web: unknown field `weigth`"),
            "{e}"
        );
        let e = Envelope::new("routes", "web", 1, None).unwrap_err();
        assert_eq!(e.reason(), "unknown_kind");
        let e = Envelope::new("route", "Web/1", 1, None).unwrap_err();
        assert_eq!(e.reason(), "bad_name");
        let big = serde_json::json!({"sticky": "x".repeat(MAX_BODY)});
        assert!(Envelope::new("route", "web", 1, Some(&big)).is_err());
    }

    #[test]
    fn files_hold_several_documents() {
        let docs = parse_file(
            "f.toml",
            "[[route]]\nname = \"web\"\nsticky = \"path\"\n[[route]]\nname = \"api\"\n",
        )
        .unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].1, "api");
        let e = parse_file("f.toml", "[[router]]\nname = \"web\"\n").unwrap_err();
        assert!(e.contains("\"router\" is not a document kind"), "{e}");
        let e = parse_file("f.json", "{\"route\": [{\"sticky\": \"path\"}]}").unwrap_err();
        assert!(e.contains("route[0]: name: required"), "{e}");
    }

    #[test]
    fn pem_round_trips() {
        let (_, signer, _) = setup();
        let pem = pem_cert(signer.cert_der());
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(der.as_ref(), signer.cert_der());
        assert_eq!(unhex(&hex(&[0, 1, 254, 255])), Some(vec![0, 1, 254, 255]));
    }
}
