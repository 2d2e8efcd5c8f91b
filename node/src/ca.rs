//! The CA's side of the PKI, for `gossamer ca init`, `gossamer cert issue`
//! and `gossamer cert revoke`.
//!
//! Besides `ca.pem` and `ca.key`, the CA directory keeps two logs:
//! `issued.log` (every certificate issued: serial, kind, name, end of
//! validity) so a node can be revoked by name, and `revoked.log` (every
//! revocation) from which each new CRL is written whole.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use gossamer_transport::pki;
use gossamer_transport::revocation::{self, Revoked, parse_serial, serial_hex};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::identity;

/// Every certificate issued from this CA directory.
pub const ISSUED_LOG: &str = "issued.log";
/// Every certificate revoked.
pub const REVOKED_LOG: &str = "revoked.log";
/// Where `cert revoke` writes the CRL unless told otherwise.
pub const CRL_FILE: &str = "crl.pem";

/// `gossamer ca init`.
pub fn init(dir: &Path, trust_domain: &str) -> anyhow::Result<()> {
    if dir.join("ca.pem").exists() || dir.join("ca.key").exists() {
        bail!(
            "{} already holds a CA (ca.pem/ca.key); refusing to overwrite it",
            dir.display()
        );
    }
    identity::ensure_ca(dir, trust_domain)?;
    println!(
        "wrote {0}/ca.pem and {0}/ca.key (trust domain {trust_domain}); keep ca.key secret",
        dir.display()
    );
    Ok(())
}

/// `gossamer cert issue`.
pub fn issue(
    ca_dir: &Path,
    node: Option<&str>,
    operator: Option<&str>,
    services: &[String],
    ttl: Duration,
    out: &Path,
    trust_domain: &str,
) -> anyhow::Result<()> {
    if ttl.is_zero() {
        bail!("--ttl: must be more than 0");
    }
    let name = node.or(operator).context("give --name or --operator")?;
    gossamer_membership::identity::validate_name(name)?;
    let hosts = if services.iter().any(|s| s == "*") {
        pki::Hosts::Any
    } else {
        for s in services {
            gossamer_membership::catalog::validate_service_name(s)
                .with_context(|| format!("--service {s:?}"))?;
        }
        let mut list = services.to_vec();
        list.sort();
        list.dedup();
        pki::Hosts::Only(list)
    };
    let ca = pki::read_pair(&ca_dir.join("ca.pem"), &ca_dir.join("ca.key"))?;
    let pair = if operator.is_some() {
        pki::issue_operator_cert(&ca, name, trust_domain)?
    } else {
        pki::issue_node_cert_for(&ca, name, trust_domain, &hosts, ttl)?
    };
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let cert = out.join(format!("{name}.pem"));
    let key = out.join(format!("{name}.key"));
    if cert.exists() || key.exists() {
        bail!(
            "{} or {} already exists; refusing to overwrite",
            cert.display(),
            key.display()
        );
    }
    pki::write_new(&key, &pair.key, true)?;
    pki::write_new(&cert, &pair.cert, false)?;
    let der = CertificateDer::from_pem_slice(pair.cert.as_bytes())?;
    let serial = revocation::serial_of(&der).context("the new certificate has no serial")?;
    let end = pki::not_after(&der).unwrap_or(UNIX_EPOCH);
    let kind = if operator.is_some() {
        "operator"
    } else {
        "node"
    };
    append(
        &ca_dir.join(ISSUED_LOG),
        &format!("{}\t{kind}\t{name}\t{}\n", serial_hex(&serial), unix(end)),
    )?;
    println!("wrote {} and {}", cert.display(), key.display());
    if operator.is_none() {
        println!(
            "{name} may host {hosts}; valid until {}; serial {}",
            pki::humane_utc(end),
            serial_hex(&serial)
        );
    }
    Ok(())
}

/// One line of `issued.log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// Serial number.
    pub serial: Vec<u8>,
    /// `node` or `operator`.
    pub kind: String,
    /// Node or operator name.
    pub name: String,
    /// End of validity.
    pub not_after: SystemTime,
}

/// Reads `issued.log` (absent: nothing issued yet). A line that does not
/// parse is an error naming it: the log is the CA's record.
pub fn issued(ca_dir: &Path) -> anyhow::Result<Vec<Issued>> {
    read_log(&ca_dir.join(ISSUED_LOG), |fields| match fields {
        [serial, kind, name, end] => Some(Issued {
            serial: parse_serial(serial)?,
            kind: (*kind).to_owned(),
            name: (*name).to_owned(),
            not_after: UNIX_EPOCH + Duration::from_secs(end.parse().ok()?),
        }),
        _ => None,
    })
}

/// Reads `revoked.log`.
pub fn revoked(ca_dir: &Path) -> anyhow::Result<Vec<Revoked>> {
    read_log(&ca_dir.join(REVOKED_LOG), |fields| match fields {
        [serial, at, ..] => Some(Revoked {
            serial: parse_serial(serial)?,
            at: UNIX_EPOCH + Duration::from_secs(at.parse().ok()?),
        }),
        _ => None,
    })
}

fn read_log<T>(path: &Path, parse: impl Fn(&[&str]) -> Option<T>) -> anyhow::Result<Vec<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let fields: Vec<&str> = line.split('\t').collect();
            parse(&fields)
                .with_context(|| format!("{}:{}: cannot parse {line:?}", path.display(), i + 1))
        })
        .collect()
}

fn append(path: &Path, line: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    file.write_all(line.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `gossamer cert revoke`: adds the certificates named (every unexpired
/// node certificate issued to each `--name`, each `--serial`, the serial
/// of each `--cert` file) to `revoked.log`, and writes the whole CRL to
/// `out` (default `CA_DIR/crl.pem`) with a CRL number above the last one.
pub fn revoke(
    ca_dir: &Path,
    names: &[String],
    serials: &[String],
    certs: &[PathBuf],
    out: Option<&Path>,
) -> anyhow::Result<()> {
    let ca = pki::read_pair(&ca_dir.join("ca.pem"), &ca_dir.join("ca.key"))?;
    let ca_der = CertificateDer::from_pem_slice(ca.cert.as_bytes())
        .with_context(|| format!("{}/ca.pem", ca_dir.display()))?;
    let mut targets: Vec<(Vec<u8>, String)> = Vec::new();
    for text in serials {
        let serial = parse_serial(text)
            .with_context(|| format!("--serial {text:?}: expected hex digits (up to 20 bytes)"))?;
        targets.push((serial, format!("serial {text}")));
    }
    for path in certs {
        let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let der = CertificateDer::from_pem_slice(&pem)
            .with_context(|| format!("{}: not a PEM certificate", path.display()))?;
        let serial = revocation::serial_of(&der)
            .with_context(|| format!("{}: not an X.509 certificate", path.display()))?;
        let who = pki::node_identity(&der).map_or_else(|| path.display().to_string(), |(_, n)| n);
        targets.push((serial, who));
    }
    if !names.is_empty() {
        let issued = issued(ca_dir)?;
        let now = SystemTime::now();
        for name in names {
            let found: Vec<&Issued> = issued
                .iter()
                .filter(|i| i.kind == "node" && i.name == *name && i.not_after > now)
                .collect();
            if found.is_empty() {
                bail!(
                    "--name {name}: {} records no unexpired node certificate issued to {name}; revoke it with --cert FILE or --serial HEX",
                    ca_dir.join(ISSUED_LOG).display()
                );
            }
            targets.extend(found.into_iter().map(|i| (i.serial.clone(), name.clone())));
        }
    }
    if targets.is_empty() {
        bail!("name what to revoke: --name NODE, --serial HEX or --cert FILE");
    }

    let mut list = revoked(ca_dir)?;
    let now = SystemTime::now();
    let mut added = Vec::new();
    for (serial, who) in targets {
        if list.iter().any(|r| r.serial == serial) || added.iter().any(|(s, _)| *s == serial) {
            println!("{who}: serial {} is already revoked", serial_hex(&serial));
            continue;
        }
        added.push((serial, who));
    }
    let out = out.map_or_else(|| ca_dir.join(CRL_FILE), Path::to_path_buf);
    let previous = std::fs::read(&out)
        .ok()
        .and_then(|b| revocation::read_crl(&b, &ca_der).ok())
        .map_or(0, |l| l.number);
    let number = (previous + 1).max(unix(now));
    list.extend(added.iter().map(|(serial, _)| Revoked {
        serial: serial.clone(),
        at: now,
    }));
    let pem = revocation::write_crl(&ca, &list, number)?;
    // The CRL first: if writing it fails, the log does not claim more
    // than any CRL says.
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &pem)
        .and_then(|()| std::fs::rename(&tmp, &out))
        .with_context(|| format!("cannot write {}", out.display()))?;
    for (serial, who) in &added {
        append(
            &ca_dir.join(REVOKED_LOG),
            &format!("{}\t{}\t{who}\n", serial_hex(serial), unix(now)),
        )?;
        println!("revoked {who}: serial {}", serial_hex(serial));
    }
    println!(
        "wrote {} (CRL number {number}, {} certificate(s) revoked); spread it with\n  gossamer config apply {} --operator-cert OP.pem --operator-key OP.key",
        out.display(),
        list.len(),
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoke_by_name_serial_and_file_writes_one_growing_crl() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        init(&ca_dir, "t.mesh").unwrap();
        let out = dir.path().join("certs");
        let ttl = Duration::from_secs(3600);
        issue(&ca_dir, Some("n1"), None, &[], ttl, &out, "t.mesh").unwrap();
        issue(&ca_dir, Some("n2"), None, &[], ttl, &out, "t.mesh").unwrap();
        issue(&ca_dir, None, Some("ops"), &[], ttl, &out, "t.mesh").unwrap();
        let log = issued(&ca_dir).unwrap();
        assert_eq!(log.len(), 3);
        assert_eq!(
            log.iter()
                .map(|i| (i.kind.as_str(), i.name.as_str()))
                .collect::<Vec<_>>(),
            [("node", "n1"), ("node", "n2"), ("operator", "ops")]
        );

        let ca = pki::read_pair(&ca_dir.join("ca.pem"), &ca_dir.join("ca.key")).unwrap();
        let ca_der = CertificateDer::from_pem_slice(ca.cert.as_bytes()).unwrap();
        let crl =
            |path: &Path| revocation::read_crl(&std::fs::read(path).unwrap(), &ca_der).unwrap();

        revoke(&ca_dir, &["n1".into()], &[], &[], None).unwrap();
        let first = crl(&ca_dir.join(CRL_FILE));
        assert_eq!(first.serials, vec![log[0].serial.clone()]);

        // By certificate file; revoking n1 again adds nothing.
        revoke(&ca_dir, &["n1".into()], &[], &[out.join("n2.pem")], None).unwrap();
        let second = crl(&ca_dir.join(CRL_FILE));
        assert!(second.number > first.number);
        assert_eq!(
            second.serials,
            vec![log[0].serial.clone(), log[1].serial.clone()]
        );

        // By serial, to another file.
        let other = dir.path().join("other.pem");
        revoke(
            &ca_dir,
            &[],
            &[serial_hex(&log[2].serial)],
            &[],
            Some(&other),
        )
        .unwrap();
        assert_eq!(crl(&other).serials.len(), 3);

        // Bad input changes nothing.
        let before = std::fs::read(ca_dir.join(REVOKED_LOG)).unwrap();
        assert!(revoke(&ca_dir, &["nobody".into()], &[], &[], None).is_err());
        assert!(revoke(&ca_dir, &[], &["zz".into()], &[], None).is_err());
        assert!(revoke(&ca_dir, &[], &[], &[], None).is_err());
        assert_eq!(std::fs::read(ca_dir.join(REVOKED_LOG)).unwrap(), before);
    }
}
