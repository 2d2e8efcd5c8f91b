//! The node certificate's life while the agent runs: rotation (new files
//! put in use without a restart), revocation (the mesh CA's CRL, spread as
//! a configuration document) and the expiry warning.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use gossamer_transport::Transport;
use gossamer_transport::pki::{self, Hosts, MeshIdentity};
use gossamer_transport::revocation::{self, serial_hex};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::TlsSource;
use crate::documents::{Documents, envelope};
use crate::metrics::Counters;
use crate::tasks::Tasks;

/// How often the certificate files are looked at for a change (SIGHUP
/// reloads at once).
pub const POLL_EVERY: Duration = Duration::from_secs(5);

/// The CA, certificate and key files of a node.
#[derive(Debug, Clone)]
pub struct Files {
    /// CA certificate.
    pub ca: PathBuf,
    /// Node certificate.
    pub cert: PathBuf,
    /// Node key.
    pub key: PathBuf,
}

impl Files {
    /// Where `source` keeps the files of node `name`.
    pub fn of(source: &TlsSource, name: &str, data_dir: &Path) -> Self {
        match source {
            TlsSource::Files { ca, cert, key } => Self {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            },
            TlsSource::Dev => {
                let dir = data_dir.join(crate::identity::DEV_PKI);
                Self {
                    ca: dir.join("ca.pem"),
                    cert: dir.join(format!("{name}.pem")),
                    key: dir.join(format!("{name}.key")),
                }
            }
        }
    }

    /// What changes when any of the files is replaced: size and
    /// modification time of each (`None` while one is missing).
    fn stamp(&self) -> Option<[(u64, SystemTime); 3]> {
        let one = |p: &Path| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.len(), m.modified().ok()?))
        };
        Some([one(&self.ca)?, one(&self.cert)?, one(&self.key)?])
    }
}

/// Puts new certificate files in use when they change (checked every
/// [`POLL_EVERY`]) or on SIGHUP. Files that do not load (a key that does
/// not match, a half-written file, another node's name) are refused with a
/// warning and the certificate in use stays; the next change or SIGHUP
/// tries again. `hosts` follows what the certificate lets the node host.
pub async fn keep_identity(
    transport: Transport,
    files: Files,
    hosts: watch::Sender<Hosts>,
    counters: Arc<Counters>,
    tasks: Tasks,
) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "SIGHUP cannot be caught; certificate files are still watched");
            None
        }
    };
    let mut seen = files.stamp();
    let mut last_error = String::new();
    loop {
        let signalled = tokio::select! {
            () = tasks.stopped() => return,
            () = tokio::time::sleep(POLL_EVERY) => false,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        let now = files.stamp();
        if !signalled && now == seen {
            continue;
        }
        seen = now;
        let name = transport.name().to_owned();
        let loaded = MeshIdentity::load(&files.ca, &files.cert, &files.key, Some(&name))
            .map_err(|e| e.to_string())
            .and_then(|id| {
                let summary = Summary::of(&id);
                let new_hosts = id.hosts.clone();
                transport
                    .reload_identity(id)
                    .map(|()| (summary, new_hosts))
                    .map_err(|e| e.to_string())
            });
        match loaded {
            Ok((summary, new_hosts)) => {
                last_error.clear();
                info!(
                    serial = %summary.serial, valid_until = %summary.valid_until, hosts = %new_hosts,
                    trigger = if signalled { "SIGHUP" } else { "file change" },
                    "new certificate in use: new handshakes present it, open connections stay up"
                );
                if let Some(warning) = crate::admin::cert_warning(transport.cert_not_after()) {
                    warn!("{warning}");
                }
                hosts.send_if_modified(|h| {
                    let changed = *h != new_hosts;
                    *h = new_hosts;
                    changed
                });
            }
            Err(error) => {
                counters
                    .cert_reload_failures
                    .fetch_add(1, Ordering::Relaxed);
                if error != last_error {
                    warn!(%error, "new certificate files refused; the certificate in use stays");
                    last_error = error;
                }
            }
        }
    }
}

/// Serial and end of a certificate, for logs and the API.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Serial number (hex).
    pub serial: String,
    /// When it expires.
    pub valid_until: String,
}

impl Summary {
    /// Of the leaf of `id`.
    pub fn of(id: &MeshIdentity) -> Self {
        Self {
            serial: id
                .chain
                .first()
                .and_then(revocation::serial_of)
                .map(|s| serial_hex(&s))
                .unwrap_or_default(),
            valid_until: pki::humane_utc(id.not_after),
        }
    }
}

/// The serial numbers revoked by every `crl` document in force (each was
/// checked against the mesh CA when applied).
pub fn revoked_serials(documents: &Documents) -> HashSet<Vec<u8>> {
    let ca = documents.ca();
    documents
        .all()
        .into_iter()
        .filter(|h| h.envelope.kind == "crl" && !h.envelope.deleted)
        .filter_map(|h| {
            let body: serde_json::Value = serde_json::from_str(&h.envelope.body).ok()?;
            let pem = envelope::crl_pem(&body).ok()?.to_owned();
            revocation::read_crl(pem.as_bytes(), ca).ok()
        })
        .flat_map(|list| list.serials)
        .collect()
}

/// Keeps the transport's revoked serials equal to the `crl` documents in
/// force: connections to a newly revoked peer close at once, and its
/// handshakes are refused from then on.
pub async fn keep_revocations(transport: Transport, documents: Arc<Documents>, tasks: Tasks) {
    let mut changes = documents.subscribe();
    loop {
        let serials = revoked_serials(&documents);
        let count = serials.len();
        let before = transport.revocations().len();
        let own = transport
            .identity()
            .chain
            .first()
            .and_then(revocation::serial_of)
            .filter(|s| serials.contains(s));
        let cut = transport.set_revoked(serials);
        if count != before || !cut.is_empty() {
            info!(revoked = count, cut_off = ?cut, "certificate revocation list in force");
        }
        if let Some(serial) = own {
            warn!(
                serial = %serial_hex(&serial),
                "this node's own certificate is revoked: peers refuse it; issue a new one and reload it"
            );
        }
        tokio::select! {
            () = tasks.stopped() => return,
            r = changes.changed() => if r.is_err() { return },
        }
    }
}

/// Logs a warning every 6 hours once this node's certificate has less
/// than a week left (the same warning `/ready` shows).
pub async fn warn_before_expiry(transport: Transport, tasks: Tasks) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(6 * 3600)) => {}
            () = tasks.stopped() => return,
        }
        if let Some(warning) = crate::admin::cert_warning(transport.cert_not_after()) {
            warn!("{warning}");
        }
    }
}
