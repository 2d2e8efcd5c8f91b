//! The gateway's public certificates: several pairs of PEM files, one
//! chosen per handshake by SNI, reloaded when the files change. New
//! handshakes get the new certificate; connections already open keep
//! theirs, so a swap drops nothing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};

use super::config::CertPair;

/// How often the files are looked at.
pub const POLL: Duration = Duration::from_secs(1);

/// The certificates in use, by the names they cover.
#[derive(Debug, Default)]
struct Set {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `example.com` for a `*.example.com` certificate.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// For clients that send no SNI or a name no certificate covers.
    default: Option<Arc<CertifiedKey>>,
}

/// Picks a certificate by SNI; shared by the listener's rustls config and
/// the reload task.
#[derive(Debug)]
pub struct Store {
    pairs: Vec<CertPair>,
    set: RwLock<Arc<Set>>,
    /// Size and modification time of every file when last loaded.
    stamps: RwLock<Vec<Option<(u64, SystemTime)>>>,
}

fn stamp(path: &PathBuf) -> Option<(u64, SystemTime)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

impl Store {
    /// Loads every pair; an error names the file and the problem.
    pub fn load(pairs: Vec<CertPair>) -> Result<Arc<Self>, String> {
        let stamps = Self::stamps_of(&pairs);
        let set = build(&pairs)?;
        Ok(Arc::new(Self {
            pairs,
            set: RwLock::new(Arc::new(set)),
            stamps: RwLock::new(stamps),
        }))
    }

    fn stamps_of(pairs: &[CertPair]) -> Vec<Option<(u64, SystemTime)>> {
        pairs
            .iter()
            .flat_map(|p| [stamp(&p.cert), stamp(&p.key)])
            .collect()
    }

    /// Reloads if any file changed. `Ok(true)`: new certificates are in
    /// use; `Ok(false)`: nothing changed; `Err`: the new files do not load
    /// (the old certificates stay, and it is tried again next time).
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let now = Self::stamps_of(&self.pairs);
        if *self.stamps.read().unwrap_or_else(|e| e.into_inner()) == now {
            return Ok(false);
        }
        let set = build(&self.pairs)?;
        *self.set.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        *self.stamps.write().unwrap_or_else(|e| e.into_inner()) = now;
        Ok(true)
    }

    /// Watches the files until `tasks` drain, counting reloads.
    pub async fn keep_fresh(
        self: Arc<Self>,
        reloads: prometheus_client::metrics::family::Family<
            crate::gateway::serve::OutcomeLabel,
            prometheus_client::metrics::counter::Counter,
        >,
        tasks: crate::tasks::Tasks,
    ) {
        let mut last_warning: Option<Instant> = None;
        loop {
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = tasks.draining() => return,
            }
            let outcome = match self.reload_if_changed() {
                Ok(false) => continue,
                Ok(true) => {
                    info!(pairs = self.pairs.len(), "gateway certificates reloaded");
                    "reloaded"
                }
                Err(e) => {
                    // Files are often written one after the other: the
                    // next look usually finds the pair whole again.
                    if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        warn!(error = %e, "gateway certificates not reloaded; the ones in use stay");
                        last_warning = Some(Instant::now());
                    }
                    "failed"
                }
            };
            reloads
                .get_or_create(&crate::gateway::serve::OutcomeLabel { outcome })
                .inc();
        }
    }
}

impl ResolvesServerCert for Store {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.set.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(name) = hello.server_name() {
            let name = name.to_ascii_lowercase();
            if let Some(k) = set.exact.get(&name) {
                return Some(k.clone());
            }
            if let Some((_, parent)) = name.split_once('.')
                && let Some(k) = set.wildcard.get(parent)
            {
                return Some(k.clone());
            }
        }
        set.default.clone()
    }
}

fn build(pairs: &[CertPair]) -> Result<Set, String> {
    let provider = rustls::crypto::ring::default_provider();
    let mut set = Set::default();
    for pair in pairs {
        let what = |e: String| format!("{}: {e}", pair.cert.display());
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pair.cert)
            .map_err(|e| what(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| what(e.to_string()))?;
        let Some(leaf) = certs.first() else {
            return Err(what("no certificate in the file".into()));
        };
        let names = names_of(leaf).map_err(what)?;
        let key = PrivateKeyDer::from_pem_file(&pair.key)
            .map_err(|e| format!("{}: {e}", pair.key.display()))?;
        let key = CertifiedKey::from_der(certs, key, &provider)
            .map_err(|e| format!("{} and {}: {e}", pair.cert.display(), pair.key.display()))?;
        let key = Arc::new(key);
        for name in names {
            match name.strip_prefix("*.") {
                Some(parent) => set.wildcard.entry(parent.to_owned()),
                None => set.exact.entry(name),
            }
            .or_insert_with(|| key.clone());
        }
        set.default.get_or_insert(key);
    }
    Ok(set)
}

/// The DNS names a certificate covers (its SANs, else its CN), lower case.
fn names_of(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("not a certificate: {e}"))?;
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        names.extend(
            parsed
                .subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    Ok(names)
}

/// The listener's rustls configuration: TLS 1.2 and 1.3 with rustls's
/// safe defaults, ALPN h2 then http/1.1, certificates from `store`.
pub fn server_config(store: Arc<Store>) -> Result<rustls::ServerConfig, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
