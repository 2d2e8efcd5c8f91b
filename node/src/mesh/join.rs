//! Dialing the seeds: resolve each `host:port`, connect in parallel (so one
//! dead seed does not hold up the others), and learn each seed's name from
//! its certificate. When to try, and what to announce to, is the driver's
//! call ([`gossamer_membership::driver`]).

use std::net::SocketAddr;
use std::time::Duration;

use gossamer_transport::{Transport, TransportError};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::Input;

const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Dials every seed once and reports each that answers.
pub async fn dial_seeds(
    seeds: Vec<String>,
    attempt: u32,
    transport: Transport,
    task: mpsc::Sender<Input>,
) {
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
        let input = match result {
            Ok(name) => Input::SeedReached { name, addr },
            Err(TransportError::SelfConnection(_)) => Input::SelfSeed,
            // Loud on the first attempt and every fifth after.
            Err(e) if attempt % 5 == 1 => {
                warn!(%seed, error = %e, "seed unreachable");
                continue;
            }
            Err(e) => {
                debug!(%seed, error = %e, "seed unreachable");
                continue;
            }
        };
        reached += 1;
        if task.send(input).await.is_err() {
            return;
        }
    }
    if reached == 0 && attempt == 1 {
        info!(
            "no seed answered yet; retrying with backoff (members saved from the last run are announced to as well)"
        );
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
