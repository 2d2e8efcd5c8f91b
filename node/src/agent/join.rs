//! Joining: dial the seeds (learning their names from their certificates)
//! and the members remembered from the last run, and announce to them, until
//! some member answers. Runs again whenever the node finds itself alone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gossamer_membership::NodeId;
use gossamer_transport::{Transport, TransportError};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::swim::{Command, Snapshot};

const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(10);
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Keeps the node joined. Ends when the command channel closes or the node
/// has left.
pub async fn join_loop(
    seeds: Vec<String>,
    self_seed: Arc<AtomicBool>,
    saved: Vec<NodeId>,
    transport: Transport,
    commands: mpsc::Sender<Command>,
    mut snapshot: watch::Receiver<Arc<Snapshot>>,
) {
    if seeds.is_empty() && saved.is_empty() {
        info!("no seeds configured: starting a new mesh; others join through this node");
        return;
    }
    let mut delay = FIRST_RETRY;
    let mut attempts = 0u32;
    loop {
        // Wait while we have company.
        loop {
            let s = snapshot.borrow_and_update().clone();
            if s.left {
                return;
            }
            if s.active == 0 {
                break;
            }
            delay = FIRST_RETRY;
            attempts = 0;
            if snapshot.changed().await.is_err() {
                return;
            }
        }
        attempts += 1;
        // Members saved from the last run first: announcing is cheap and does
        // not wait for their answer.
        for member in &saved {
            // The transport dials it and checks its certificate names it.
            if commands
                .send(Command::Announce(member.clone()))
                .await
                .is_err()
            {
                return;
            }
        }
        // Seeds in parallel, so one dead seed does not hold up the others.
        let mut dials = tokio::task::JoinSet::new();
        for seed in &seeds {
            for addr in resolve(seed).await {
                let transport = transport.clone();
                let seed = seed.clone();
                dials.spawn(async move { (seed, addr, transport.connect_seed(addr).await) });
            }
        }
        let mut reached = 0usize;
        while let Some(Ok((seed, addr, result))) = dials.join_next().await {
            match result {
                Ok(name) => {
                    reached += 1;
                    let Ok(id) = NodeId::new(name, addr, 0) else {
                        continue;
                    };
                    if commands.send(Command::Announce(id)).await.is_err() {
                        return;
                    }
                }
                Err(TransportError::SelfConnection(_)) => {
                    // We are one of the seeds: alone, we are the mesh.
                    self_seed.store(true, Ordering::Relaxed);
                    reached += 1;
                }
                Err(e) if attempts % 5 == 1 => warn!(%seed, error = %e, "seed unreachable"),
                Err(e) => debug!(%seed, error = %e, "seed unreachable"),
            }
        }
        if reached == 0 && attempts == 1 && !saved.is_empty() {
            info!(
                count = saved.len(),
                "seeds unreachable; rejoining through members saved from the last run"
            );
        }
        // Give the answers a moment, wake early if someone answers.
        let _ = tokio::time::timeout(delay, snapshot.changed()).await;
        delay = (delay * 2).min(MAX_RETRY);
    }
}

async fn resolve(seed: &str) -> Vec<SocketAddr> {
    if let Ok(addr) = seed.parse::<SocketAddr>() {
        return vec![addr];
    }
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(seed)).await {
        Ok(Ok(addrs)) => addrs.collect(),
        Ok(Err(e)) => {
            debug!(%seed, error = %e, "cannot resolve seed");
            Vec::new()
        }
        Err(_) => {
            debug!(%seed, "seed resolution timed out");
            Vec::new()
        }
    }
}
