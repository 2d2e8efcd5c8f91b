//! Keeping the connection cache small: once a second, the connections
//! [`LinkPolicy`] picks (idle ones, and the least recently used above the
//! cap) are closed. The policy lives in `gossamer-membership` so that the
//! simulator charges handshakes by the same rules. Connections carrying a
//! quiet stream get their keep-alives here too.

use std::time::Duration;

use gossamer_membership::{Link, LinkPolicy};
use gossamer_transport::{LinkInfo, Transport};

/// How often the cache is looked over.
const EVERY: Duration = Duration::from_secs(1);

/// Runs until the agent stops (spawn it on the agent's tasks).
pub async fn tend(transport: Transport, policy: LinkPolicy) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut links: Vec<Link<usize>> = Vec::new();
    let mut close: Vec<usize> = Vec::new();
    loop {
        tick.tick().await;
        transport.keep_streams_alive();
        let infos = transport.links();
        links.clear();
        links.extend(infos.iter().enumerate().map(|(i, l)| Link {
            key: i,
            last_active: l.last_active,
            streams: l.streams,
            primary: l.primary,
        }));
        close.clear();
        policy.to_close(transport.clock(), &mut links, &mut close);
        if !close.is_empty() {
            let chosen: Vec<LinkInfo> = close.iter().map(|&i| infos[i].clone()).collect();
            transport.close_idle(&chosen);
        }
    }
}
