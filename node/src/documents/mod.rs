//! Mesh-wide configuration: signed documents, held by every agent.
//!
//! An operator signs a document ([`envelope`]) and hands it to any agent
//! (`POST /v1/config`). The agent checks it, stores it in its data dir and
//! announces it; the membership driver (`gossamer_membership::docs`) decides
//! what to fetch from whom, and [`sync`] carries the bodies. Every receiver
//! checks the signature again, so a document is only ever applied if an
//! operator of this mesh signed it, whichever node passed it on.
//!
//! # Layout
//! - [`cli`]: `gossamer config ...`.
//! - [`envelope`]: the signed envelope, canonical bytes, operator files.
//! - [`route`]: the `route` kind's body.
//! - [`authz`], [`ingress`], [`external`]: those kinds' bodies.
//! - [`sync`]: fetching and comparing documents on QUIC streams.

pub mod authz;
pub mod cli;
pub mod envelope;
pub mod external;
pub mod ingress;
pub mod route;
pub mod sync;

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use gossamer_membership::docs::{DocKey, DocRef, DocStamp, MAX_DOCS, summary_of};
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::store::{Store, StoreError, unix_millis};
use envelope::{DocError, Envelope};

/// Refusals remembered for `GET /v1/config`.
const REFUSALS_KEPT: usize = 32;
/// Sub-directory of the data dir holding one file per document.
const DIR: &str = "documents";

/// Where a document came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `POST /v1/config` on this agent.
    Api,
    /// Fetched from this peer.
    Peer(String),
    /// The data dir, at start.
    Disk,
}

/// A document in force.
#[derive(Debug, Clone)]
pub struct Held {
    /// The envelope as signed.
    pub envelope: Arc<Envelope>,
    /// Version and digest.
    pub stamp: DocStamp,
    /// The operator who signed it.
    pub signer: String,
    /// When this agent applied it (Unix ms).
    pub applied_at_ms: u64,
    /// Where it came from.
    pub source: Source,
}

/// A document that was refused.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    /// When (Unix ms).
    pub at_ms: u64,
    /// Kind, as claimed.
    pub kind: String,
    /// Name, as claimed.
    pub name: String,
    /// Version, as claimed.
    pub version: u64,
    /// Where it came from.
    pub source: Source,
    /// Why.
    pub error: String,
}

/// What applying a document did.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// It is now in force; it replaced `previous`, if any.
    Applied {
        /// The new stamp.
        stamp: DocStamp,
        /// What it replaced.
        previous: Option<Held>,
    },
    /// What is held already wins (peers only).
    Kept(DocStamp),
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct DocCounters {
    /// Documents applied (from any source but the disk).
    pub applied: AtomicU64,
    /// Two documents with the same version and different bodies met here.
    pub conflicts: AtomicU64,
    /// Refusals by reason.
    refused: Mutex<BTreeMap<&'static str, u64>>,
}

impl DocCounters {
    /// Refusals by reason.
    pub fn refused(&self) -> BTreeMap<&'static str, u64> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[derive(Debug, Default)]
struct Inner {
    docs: BTreeMap<DocKey, Held>,
    refusals: VecDeque<Refusal>,
}

/// The documents this agent holds.
#[derive(Debug)]
pub struct Documents {
    inner: Mutex<Inner>,
    ca: CertificateDer<'static>,
    trust_domain: String,
    store: Store,
    changed: watch::Sender<u64>,
    refused: watch::Sender<u64>,
    /// Counters for metrics.
    pub counters: DocCounters,
}

fn file_name(key: &DocKey) -> String {
    // Kinds have no '.', so the first one separates kind from name.
    format!("{}.{}.doc", key.0, key.1)
}

impl Documents {
    /// Opens the store under `data_dir`, loading (and checking again) every
    /// document saved there. A file that no longer checks out is set aside
    /// as `.refused`, with a warning.
    pub fn open(
        data_dir: &Path,
        ca: CertificateDer<'static>,
        trust_domain: String,
    ) -> Result<Self, StoreError> {
        let store = Store::open(&data_dir.join(DIR))?;
        let mut inner = Inner::default();
        if let Ok(entries) = std::fs::read_dir(store.dir()) {
            let mut paths: Vec<_> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "doc"))
                .collect();
            paths.sort();
            for path in paths {
                let loaded = std::fs::read(&path)
                    .map_err(|e| DocError::Malformed(e.to_string()))
                    .and_then(|b| Envelope::decode(&b))
                    .and_then(|env| env.check(&ca, &trust_domain).map(|c| (env, c)));
                match loaded {
                    Ok((env, checked)) => {
                        let key = (env.kind.clone(), env.name.clone());
                        inner.docs.insert(
                            key,
                            Held {
                                stamp: checked.stamp,
                                signer: checked.signer,
                                applied_at_ms: unix_millis(),
                                source: Source::Disk,
                                envelope: Arc::new(env),
                            },
                        );
                    }
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "stored document set aside: it no longer checks out");
                        let _ = std::fs::rename(&path, path.with_extension("refused"));
                    }
                }
            }
        }
        if !inner.docs.is_empty() {
            info!(
                documents = inner.docs.len(),
                "configuration documents loaded"
            );
        }
        Ok(Self {
            inner: Mutex::new(inner),
            ca,
            trust_domain,
            store,
            changed: watch::Sender::new(0),
            refused: watch::Sender::new(0),
            counters: DocCounters::default(),
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Plain maps, valid after any panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The mesh CA every document is checked against.
    pub fn ca(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// Notified (the value counts changes) whenever a document changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Notified (the value counts refusals) whenever a document is refused.
    pub fn subscribe_refusals(&self) -> watch::Receiver<u64> {
        self.refused.subscribe()
    }

    /// Checks `env` and, if it beats what is held, stores and applies it.
    /// From the API a version must be newer than the one in force; from a
    /// peer a lower stamp is simply kept out.
    pub fn apply(&self, env: Envelope, source: Source) -> Result<Outcome, DocError> {
        let result = self.apply_checked(env.clone(), &source);
        if let Err(e) = &result {
            self.refuse(&env, source, e);
        }
        result
    }

    fn apply_checked(&self, env: Envelope, source: &Source) -> Result<Outcome, DocError> {
        let checked = env.check(&self.ca, &self.trust_domain)?;
        let key = (env.kind.clone(), env.name.clone());
        let mut inner = self.inner();
        if let Some(problem) = revoked_signer(&env, &checked.signer, &inner.docs, &self.ca) {
            return Err(DocError::Invalid {
                kind: key.0,
                name: key.1,
                problem,
            });
        }
        let previous = inner.docs.get(&key).cloned();
        if let Some(held) = &previous {
            let stale = match source {
                Source::Api => checked.stamp.version <= held.stamp.version,
                _ => checked.stamp <= held.stamp,
            };
            if stale {
                if matches!(source, Source::Api) {
                    return Err(DocError::Stale {
                        kind: key.0,
                        name: key.1,
                        version: checked.stamp.version,
                        live: held.stamp.version,
                    });
                }
                return Ok(Outcome::Kept(held.stamp));
            }
            if held.stamp.version == checked.stamp.version {
                self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
                warn!(
                    kind = %key.0, name = %key.1, version = held.stamp.version,
                    winner = %checked.signer, winner_digest = %checked.stamp.digest_hex(),
                    loser = %held.signer, loser_digest = %held.stamp.digest_hex(),
                    "two documents with the same version: the higher digest wins on every node"
                );
            }
            if let Some(problem) = older_crl(&env, &held.envelope, &self.ca) {
                return Err(DocError::Invalid {
                    kind: key.0,
                    name: key.1,
                    problem,
                });
            }
        } else if inner.docs.len() >= MAX_DOCS {
            return Err(DocError::Full(format!(
                "{} {}: the mesh already holds {MAX_DOCS} documents",
                key.0, key.1
            )));
        }
        let bytes = env
            .encode()
            .map_err(|e| DocError::Malformed(e.to_string()))?;
        self.store
            .write_atomic(&file_name(&key), &bytes)
            .map_err(|e| DocError::Full(format!("cannot store {} {}: {e}", key.0, key.1)))?;
        info!(
            kind = %key.0, name = %key.1, version = checked.stamp.version,
            signer = %checked.signer, deleted = env.deleted, source = ?source,
            "configuration document applied"
        );
        inner.docs.insert(
            key,
            Held {
                stamp: checked.stamp,
                signer: checked.signer,
                applied_at_ms: unix_millis(),
                source: source.clone(),
                envelope: Arc::new(env),
            },
        );
        drop(inner);
        self.counters.applied.fetch_add(1, Ordering::Relaxed);
        self.changed.send_modify(|n| *n += 1);
        Ok(Outcome::Applied {
            stamp: checked.stamp,
            previous,
        })
    }

    /// Records a refusal (counted, logged, kept for the API).
    pub fn refuse(&self, env: &Envelope, source: Source, error: &DocError) {
        *self
            .counters
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(error.reason())
            .or_insert(0) += 1;
        warn!(kind = %env.kind, name = %env.name, version = env.version, source = ?source, %error, "configuration document refused");
        let mut inner = self.inner();
        if inner.refusals.len() >= REFUSALS_KEPT {
            inner.refusals.pop_front();
        }
        inner.refusals.push_back(Refusal {
            at_ms: unix_millis(),
            kind: env.kind.clone(),
            name: env.name.clone(),
            version: env.version,
            source,
            error: error.to_string(),
        });
        drop(inner);
        self.refused.send_modify(|n| *n += 1);
    }

    /// One document.
    pub fn get(&self, kind: &str, name: &str) -> Option<Held> {
        self.inner()
            .docs
            .get(&(kind.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every document, in key order.
    pub fn all(&self) -> Vec<Held> {
        self.inner().docs.values().cloned().collect()
    }

    /// Recent refusals, oldest first.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.inner().refusals.iter().cloned().collect()
    }

    /// (kind, name) and stamp of every document.
    pub fn stamps(&self) -> Vec<(DocKey, DocStamp)> {
        self.inner()
            .docs
            .iter()
            .map(|(k, h)| (k.clone(), h.stamp))
            .collect()
    }

    /// What a peer compares with: the summary and the list.
    pub fn summary(&self) -> u128 {
        let inner = self.inner();
        summary_of(inner.docs.iter().map(|(k, h)| (k, &h.stamp)))
    }

    /// The list a peer compares with.
    pub fn list(&self) -> Vec<DocRef> {
        self.inner()
            .docs
            .iter()
            .map(|((kind, name), h)| DocRef {
                kind: kind.clone(),
                name: name.clone(),
                stamp: h.stamp,
            })
            .collect()
    }

    /// The encoded envelope of `key`, for a peer that fetches it.
    pub fn encoded(&self, key: &DocKey) -> Option<Vec<u8>> {
        let env = self.inner().docs.get(key)?.envelope.clone();
        env.encode().ok()
    }
}

/// Why `env` may not be applied because the operator certificate that
/// signed it is on a CRL in force (`None`: it is not).
fn revoked_signer(
    env: &Envelope,
    signer: &str,
    docs: &BTreeMap<DocKey, Held>,
    ca: &CertificateDer<'_>,
) -> Option<String> {
    let crls: Vec<&Held> = docs
        .values()
        .filter(|h| h.envelope.kind == "crl" && !h.envelope.deleted)
        .collect();
    if crls.is_empty() {
        return None;
    }
    let serial = gossamer_transport::revocation::serial_of(&CertificateDer::from(
        env.signer_cert.as_slice(),
    ))?;
    let revoked = crls.iter().any(|h| {
        serde_json::from_str::<serde_json::Value>(&h.envelope.body)
            .ok()
            .and_then(|body| {
                let pem = envelope::crl_pem(&body).ok()?;
                gossamer_transport::revocation::read_crl(pem.as_bytes(), ca).ok()
            })
            .is_some_and(|list| list.serials.contains(&serial))
    });
    revoked.then(|| {
        format!(
            "signed by operator {signer}, whose certificate (serial {}) is revoked",
            gossamer_transport::revocation::serial_hex(&serial)
        )
    })
}

/// Why `new` may not replace the CRL `held`: its CRL number is lower, so
/// it would bring back certificates revoked since (a stale file applied
/// again, say).
fn older_crl(new: &Envelope, held: &Envelope, ca: &CertificateDer<'_>) -> Option<String> {
    if new.kind != "crl" || new.deleted || held.deleted {
        return None;
    }
    let number = |env: &Envelope| {
        let body: serde_json::Value = serde_json::from_str(&env.body).ok()?;
        let pem = envelope::crl_pem(&body).ok()?;
        gossamer_transport::revocation::read_crl(pem.as_bytes(), ca)
            .ok()
            .map(|l| l.number)
    };
    let (new_n, held_n) = (number(new)?, number(held)?);
    (new_n < held_n).then(|| {
        format!("CRL number {new_n} is older than CRL number {held_n} in force; write a new one with `gossamer cert revoke`")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gossamer_transport::pki;
    use gossamer_transport::sign::OperatorSigner;
    use rustls_pki_types::pem::PemObject;

    fn signed(signer: &OperatorSigner, version: u64, sticky: &str) -> Envelope {
        let body = serde_json::json!({ "sticky": sticky });
        let mut env = Envelope::new("route", "web", version, Some(&body)).unwrap();
        env.sign(signer).unwrap();
        env
    }

    #[test]
    fn apply_persists_refuses_and_resolves_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let ca = pki::generate_ca("t.mesh").unwrap();
        let ca_der = CertificateDer::from_pem_slice(ca.cert.as_bytes()).unwrap();
        let op = pki::issue_operator_cert(&ca, "alice", "t.mesh").unwrap();
        let signer = OperatorSigner::from_pem(&op.cert, &op.key).unwrap();
        let docs = Documents::open(dir.path(), ca_der.clone(), "t.mesh".into()).unwrap();

        let v1 = signed(&signer, 1, "path");
        assert!(matches!(
            docs.apply(v1.clone(), Source::Api),
            Ok(Outcome::Applied { .. })
        ));
        // The API refuses the same version again; a peer's copy is kept out.
        assert_eq!(
            docs.apply(v1.clone(), Source::Api).unwrap_err().reason(),
            "stale"
        );
        assert!(matches!(
            docs.apply(v1, Source::Peer("b".into())),
            Ok(Outcome::Kept(_))
        ));

        // Same version, another body: the higher digest wins either way round.
        let a = signed(&signer, 2, "header:x-a");
        let b = signed(&signer, 2, "header:x-b");
        let (lo, hi) = if a.stamp() < b.stamp() {
            (a, b)
        } else {
            (b, a)
        };
        docs.apply(hi.clone(), Source::Peer("p".into())).unwrap();
        assert!(matches!(
            docs.apply(lo.clone(), Source::Peer("q".into())),
            Ok(Outcome::Kept(_))
        ));
        assert_eq!(docs.get("route", "web").unwrap().stamp, hi.stamp());

        // A tampered copy changes nothing and is recorded.
        let mut bad = signed(&signer, 9, "path");
        bad.body = r#"{"sticky":"source-ip"}"#.into();
        assert_eq!(
            docs.apply(bad, Source::Peer("evil".into()))
                .unwrap_err()
                .reason(),
            "bad_signature"
        );
        assert_eq!(docs.get("route", "web").unwrap().stamp, hi.stamp());
        assert_eq!(docs.refusals().len(), 2);
        assert_eq!(docs.counters.refused().get("bad_signature"), Some(&1));

        // Everything survives a restart.
        drop(docs);
        let again = Documents::open(dir.path(), ca_der, "t.mesh".into()).unwrap();
        assert_eq!(again.get("route", "web").unwrap().stamp, hi.stamp());
        assert_eq!(
            again.summary(),
            summary_of(again.stamps().iter().map(|(k, s)| (k, s)))
        );
    }

    #[test]
    fn crls_check_their_ca_never_go_back_and_revoke_operators() {
        use gossamer_transport::revocation::{self, Revoked};
        let dir = tempfile::tempdir().unwrap();
        let ca = pki::generate_ca("t.mesh").unwrap();
        let ca_der = CertificateDer::from_pem_slice(ca.cert.as_bytes()).unwrap();
        let alice = pki::issue_operator_cert(&ca, "alice", "t.mesh").unwrap();
        let bob = pki::issue_operator_cert(&ca, "bob", "t.mesh").unwrap();
        let alice = OperatorSigner::from_pem(&alice.cert, &alice.key).unwrap();
        let bob_signer = OperatorSigner::from_pem(&bob.cert, &bob.key).unwrap();
        let bob_serial =
            revocation::serial_of(&CertificateDer::from_pem_slice(bob.cert.as_bytes()).unwrap())
                .unwrap();
        let docs = Documents::open(dir.path(), ca_der, "t.mesh".into()).unwrap();
        let crl = |number: u64, version: u64, revoked: &[Vec<u8>]| {
            let list: Vec<Revoked> = revoked
                .iter()
                .map(|s| Revoked {
                    serial: s.clone(),
                    at: std::time::SystemTime::now(),
                })
                .collect();
            let pem = revocation::write_crl(&ca, &list, number).unwrap();
            let mut env = Envelope::new(
                "crl",
                "mesh",
                version,
                Some(&serde_json::json!({ "pem": pem })),
            )
            .unwrap();
            env.sign(&alice).unwrap();
            env
        };

        // bob signs freely until his certificate is revoked.
        docs.apply(signed(&bob_signer, 1, "path"), Source::Api)
            .unwrap();
        docs.apply(crl(10, 1, std::slice::from_ref(&bob_serial)), Source::Api)
            .unwrap();
        let err = docs
            .apply(signed(&bob_signer, 2, "path"), Source::Api)
            .unwrap_err();
        assert!(err.to_string().contains("is revoked"), "{err}");
        assert_eq!(docs.get("route", "web").unwrap().stamp.version, 1);
        // alice's documents still go in.
        docs.apply(signed(&alice, 2, "path"), Source::Api).unwrap();

        // An older CRL cannot replace a newer one, even as a newer version.
        let err = docs.apply(crl(9, 2, &[]), Source::Api).unwrap_err();
        assert!(
            err.to_string().contains("older than CRL number 10"),
            "{err}"
        );
        docs.apply(crl(11, 2, &[]), Source::Api).unwrap();

        // A CRL from another CA is refused.
        let other = pki::generate_ca("t.mesh").unwrap();
        let forged = revocation::write_crl(&other, &[], 12).unwrap();
        let mut env = Envelope::new(
            "crl",
            "mesh",
            3,
            Some(&serde_json::json!({ "pem": forged })),
        )
        .unwrap();
        env.sign(&alice).unwrap();
        let err = docs.apply(env, Source::Api).unwrap_err();
        assert!(
            err.to_string().contains("not signed by the mesh CA"),
            "{err}"
        );
    }
}
