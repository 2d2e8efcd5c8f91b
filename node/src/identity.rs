//! Loading the node's mesh identity, and `--dev` mode's generated one.

use std::path::Path;

use gossamer_transport::pki::{self, MeshIdentity, PemPair, PkiError};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::config::TlsSource;

/// Sub-directory of the data dir holding `--dev` mode's CA and certificate.
pub const DEV_PKI: &str = "dev-pki";

/// Loads (or in dev mode creates) the node identity.
pub fn load(
    source: &TlsSource,
    name: Option<&str>,
    data_dir: &Path,
) -> Result<MeshIdentity, PkiError> {
    match source {
        TlsSource::Files { ca, cert, key } => MeshIdentity::load(ca, cert, key, name),
        TlsSource::Dev => {
            let name = name.map(str::to_owned).unwrap_or_else(host_name);
            let dir = data_dir.join(DEV_PKI);
            let ca = ensure_ca(&dir, pki::DEFAULT_TRUST_DOMAIN)?;
            let cert = dir.join(format!("{name}.pem"));
            let key = dir.join(format!("{name}.key"));
            // A development node may host anything; a certificate from
            // before service identities is issued again.
            let stale = std::fs::read(&cert).ok().is_some_and(|pem| {
                CertificateDer::pem_slice_iter(&pem)
                    .next()
                    .and_then(Result::ok)
                    .is_none_or(|der| pki::node_hosts(&der) != pki::Hosts::Any)
            });
            if stale || !cert.exists() || !key.exists() {
                let pair = pki::issue_node_cert_hosting(
                    &ca,
                    &name,
                    pki::DEFAULT_TRUST_DOMAIN,
                    &pki::Hosts::Any,
                )?;
                let _ = std::fs::remove_file(&cert);
                let _ = std::fs::remove_file(&key);
                pki::write_new(&key, &pair.key, true)?;
                pki::write_new(&cert, &pair.cert, false)?;
            }
            MeshIdentity::load(&dir.join("ca.pem"), &cert, &key, Some(&name))
        }
    }
}

/// Reads `dir/ca.pem` and `dir/ca.key`, creating them if absent.
pub fn ensure_ca(dir: &Path, trust_domain: &str) -> Result<PemPair, PkiError> {
    let cert = dir.join("ca.pem");
    let key = dir.join("ca.key");
    if !cert.exists() {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let ca = pki::generate_ca(trust_domain)?;
        pki::write_new(&key, &ca.key, true)?;
        pki::write_new(&cert, &ca.cert, false)?;
    }
    pki::read_pair(&cert, &key)
}

/// This machine's host name made into a valid node name.
pub fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    sanitize(raw.trim())
}

fn sanitize(raw: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(gossamer_membership::identity::MAX_NAME_LEN);
    let name = name.trim_matches('-').to_owned();
    if name.is_empty() {
        "gossamer".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitizes_host_names() {
        assert_eq!(sanitize("My_Host.local"), "my-host-local");
        assert_eq!(sanitize("---"), "gossamer");
        assert!(gossamer_membership::identity::validate_name(&host_name()).is_ok());
    }

    #[test]
    fn dev_identity_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = load(&TlsSource::Dev, Some("n1"), dir.path()).unwrap();
        let b = load(&TlsSource::Dev, Some("n1"), dir.path()).unwrap();
        assert_eq!(a.name, "n1");
        assert_eq!(a.chain, b.chain, "reuses the generated certificate");
    }
}
