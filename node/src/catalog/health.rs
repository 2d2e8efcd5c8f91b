//! Active health checks of this node's own services.
//!
//! One task per checked service. A service starts `critical`; its first
//! passing check makes it `passing` at once (so a fresh instance takes
//! traffic quickly), after which `rise` consecutive passes or `fall`
//! consecutive failures are needed to change state.

use std::sync::Arc;

use gossamer_membership::catalog::Health;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::proxy::body::{self, HttpClient};
use crate::tasks::Tasks;
use tracing::{debug, info};

use super::registry::{CheckKind, CheckSpec};
use super::{CatalogCounters, Input};

/// Starts checking `address:port` for instance `id` on `tasks`, until
/// `cancel`.
pub fn spawn(
    (id, address, port): (String, String, u16),
    check: CheckSpec,
    tx: mpsc::Sender<Input>,
    counters: Arc<CatalogCounters>,
    tasks: &Tasks,
    cancel: CancellationToken,
) {
    let checks = async move {
        let client = body::http_client();
        let mut health = Health::Critical;
        let mut first = true;
        let (mut passes, mut fails) = (0u32, 0u32);
        loop {
            let result =
                tokio::time::timeout(check.timeout, probe(&client, &address, port, &check.kind))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {:?}", check.timeout)));
            counters.check(result.is_ok());
            let next = match &result {
                Ok(()) => {
                    passes += 1;
                    fails = 0;
                    if first || passes >= check.rise {
                        Health::Passing
                    } else {
                        health
                    }
                }
                Err(reason) => {
                    fails += 1;
                    passes = 0;
                    debug!(service = %id, %reason, "health check failed");
                    if fails >= check.fall {
                        Health::Critical
                    } else {
                        health
                    }
                }
            };
            if next != health || first {
                if next != health {
                    info!(service = %id, health = next.as_str(), detail = ?result.as_ref().err(), "health changed");
                }
                health = next;
                if tx
                    .send(Input::Health {
                        id: id.clone(),
                        health,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            first = false;
            tokio::time::sleep(check.interval).await;
        }
    };
    tasks.spawn_until(checks, cancel);
}

async fn probe(
    client: &HttpClient,
    address: &str,
    port: u16,
    kind: &CheckKind,
) -> Result<(), String> {
    match kind {
        CheckKind::Tcp => tokio::net::TcpStream::connect((address, port))
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        CheckKind::Http(path) => {
            let host = if address.contains(':') {
                format!("[{address}]")
            } else {
                address.to_owned()
            };
            let uri = format!("http://{host}:{port}{path}");
            let req = http::Request::get(&uri)
                .header(http::header::USER_AGENT, "gossamer-health-check")
                .body(body::empty())
                .map_err(|e| e.to_string())?;
            let response = client.request(req).await.map_err(|e| e.to_string())?;
            let status = response.status();
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("{uri} answered {status}"))
            }
        }
    }
}
