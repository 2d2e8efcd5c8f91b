//! The demo's certificate steps: every agent's certificate replaced while
//! traffic flows, then one node's certificate revoked.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use gossamer_transport::pki;
use gossamer_transport::revocation::{self, Revoked};
use http::Method;

use super::run::{DemoError, Http, Node, apply_document, fail, served_by, wait_for};
use crate::client;

/// Requests sent through one proxy, in the background, until stopped.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    /// Cycles through `keys` via `proxy` as fast as answers come.
    pub fn start(http: &Http, proxy: SocketAddr, keys: &[String]) -> Self {
        let (stop, sent, failed) = (Arc::default(), Arc::default(), Arc::default());
        let (http, keys) = (http.clone(), keys.to_vec());
        let task = tokio::spawn({
            let (stop, sent, failed): (Arc<AtomicBool>, Arc<AtomicUsize>, Arc<AtomicUsize>) =
                (Arc::clone(&stop), Arc::clone(&sent), Arc::clone(&failed));
            async move {
                for k in keys.iter().cycle() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    if served_by(&http, proxy, k).await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Self {
            stop,
            sent,
            failed,
            task,
        }
    }

    /// Stops it: (sent, failed).
    pub async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

async fn json(admin: SocketAddr, path: &str) -> Result<serde_json::Value, String> {
    let body = client::call(admin, None, Method::GET, path, None)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

async fn serial(admin: SocketAddr) -> Result<String, String> {
    json(admin, "/v1/agent").await.and_then(|v| {
        v["certificate"]["serial"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| "no serial".into())
    })
}

fn write_over(path: &Path, text: &str) -> Result<(), DemoError> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .or_else(|e| fail(format!("{}: {e}", path.display())))
}

/// Issues each node a new certificate and puts it in place of its files;
/// waits until every agent uses its new one. Traffic flows throughout
/// (the caller counts it). Returns how long the agents took to notice, and
/// the serials replaced (still valid: connections made with them stay up).
pub async fn rotate(
    dir: &Path,
    ca: &pki::PemPair,
    nodes: &[Node],
) -> Result<(Duration, Vec<String>), DemoError> {
    let mut before = Vec::new();
    for n in nodes {
        before.push(serial(n.admin).await.or_else(fail)?);
        let web = pki::Hosts::Only(vec!["web".into()]);
        let pair = pki::issue_node_cert_hosting(ca, &n.name, pki::DEFAULT_TRUST_DOMAIN, &web)
            .or_else(|e| fail(e.to_string()))?;
        write_over(&dir.join(format!("certs/{}.key", n.name)), &pair.key)?;
        write_over(&dir.join(format!("certs/{}.pem", n.name)), &pair.cert)?;
    }
    let replaced = Instant::now();
    for (n, old) in nodes.iter().zip(&before) {
        wait_for(
            &format!("{} to use its new certificate", n.name),
            Duration::from_secs(20),
            async || match serial(n.admin).await? {
                s if s != *old => Ok(()),
                s => Err(format!("still serial {s}")),
            },
        )
        .await?;
    }
    Ok((replaced.elapsed(), before))
}

/// What revoking a node did.
pub struct Revocation {
    /// From applying the CRL at the first node until every other node
    /// listed the revoked one as `revoked`.
    pub cut_off: Duration,
    /// Where the CRL was written.
    pub crl: std::path::PathBuf,
}

/// Revokes the certificates of `nodes[target]` (the one in use and
/// `earlier`, as `cert revoke --name` would): writes a CRL signed by the CA,
/// signs it as a document with the demo operator (`operator`: cert and
/// key PEM) and applies it at the first node; waits until the others show
/// the node `revoked`.
pub async fn revoke(
    dir: &Path,
    ca: &pki::PemPair,
    operator: (&str, &str),
    nodes: &[Node],
    target: usize,
    earlier: &str,
) -> Result<Revocation, DemoError> {
    let err = |e: &dyn std::fmt::Display| DemoError(e.to_string());
    let (others, target): (Vec<&Node>, &Node) = (
        nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != target)
            .map(|(_, n)| n)
            .collect(),
        &nodes[target],
    );
    let current = serial(target.admin).await.or_else(fail)?;
    let revoked: Vec<Revoked> = [current.as_str(), earlier]
        .iter()
        .filter_map(|s| revocation::parse_serial(s))
        .map(|serial| Revoked {
            serial,
            at: SystemTime::now(),
        })
        .collect();
    let number = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs());
    let pem = revocation::write_crl(ca, &revoked, number).map_err(|e| err(&e))?;
    let crl = dir.join("crl.pem");
    std::fs::write(&crl, &pem).map_err(|e| err(&e))?;
    let signer = gossamer_transport::sign::OperatorSigner::from_pem(operator.0, operator.1)
        .map_err(|e| err(&e))?;
    let body = serde_json::json!({ "pem": pem });
    let (_, applied) = apply_document(
        nodes[0].admin,
        &signer,
        "crl",
        crate::documents::envelope::CRL_NAME,
        &body,
    )
    .await?;
    for n in others {
        wait_for(
            &format!("{} to list {} revoked", n.name, target.name),
            Duration::from_secs(20),
            async || {
                let members = json(n.admin, "/v1/members").await?;
                let state = members
                    .as_array()
                    .and_then(|m| m.iter().find(|m| m["name"] == target.name.as_str()))
                    .map(|m| m["state"].clone());
                match state {
                    Some(s) if s == "revoked" => Ok(()),
                    other => Err(format!("state {other:?}")),
                }
            },
        )
        .await?;
    }
    Ok(Revocation {
        cut_off: applied.elapsed(),
        crl,
    })
}
