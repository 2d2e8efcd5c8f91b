//! What the agent's I/O does for each node's [`Driver`]: datagrams and
//! timers in, and the driver's actions carried out on the simulated
//! network.
//!
//! [`Driver`]: gossamer_membership::driver::Driver

use std::time::Duration;

use bytes::Bytes;
use gossamer_membership::Transmit;
use gossamer_membership::driver::Action as DriverAction;

use super::host::Out;
use super::queue::Ev;
use super::stream::StreamMsg;
use super::{Sim, address, index_of};

impl Sim {
    pub(super) fn on_datagram(&mut self, from: usize, to: usize, data: &[u8]) {
        let now = self.now;
        let Some(driver) = self.nodes[to].driver.as_mut() else {
            return;
        };
        if driver
            .handle_datagram(now, &self.names[from], data)
            .is_err()
        {
            self.counters.refused += 1;
        }
        self.flush(to);
    }

    pub(super) fn on_timer(&mut self, x: usize, life: u32, at: Duration) {
        let now = self.now;
        let node = &mut self.nodes[x];
        if node.life != life || node.timer_at != Some(at) {
            return;
        }
        node.timer_at = None;
        if let Some(driver) = node.driver.as_mut() {
            driver.handle_timeout(now);
        }
        self.flush(x);
    }

    /// Carries out a driver's actions, takes in its events, and queues its
    /// next timer.
    pub(super) fn flush(&mut self, x: usize) {
        loop {
            let Some(driver) = self.nodes[x].driver.as_mut() else {
                return;
            };
            if let Some(action) = driver.poll_action() {
                self.carry_out(x, action);
            } else if let Some(event) = driver.poll_event() {
                self.on_event(x, event);
            } else {
                break;
            }
        }
        let now = self.now;
        self.submit_outbox(x);
        let node = &mut self.nodes[x];
        let Some(driver) = node.driver.as_ref() else {
            return;
        };
        if let Some(at) = driver.poll_timeout()
            && node.timer_at.is_none_or(|t| at < t)
        {
            node.timer_at = Some(at);
            let life = node.life;
            self.queue
                .push(at.max(now), Ev::Timer { node: x, life, at });
        }
    }

    /// Does what node `x`'s driver asked, the way the agent's I/O would.
    fn carry_out(&mut self, x: usize, action: DriverAction) {
        let life = self.nodes[x].life;
        match action {
            DriverAction::Send(t) => self.send(x, t),
            DriverAction::DialSeeds { .. } => {
                // A dial reaches a seed's process if it runs and is on our
                // side; its certificate names it.
                let now = self.now;
                for y in self.seeds.clone() {
                    if y == x {
                        if let Some(d) = self.nodes[x].driver.as_mut() {
                            d.handle_self_seed();
                        }
                    } else if self.host.is_some() {
                        // A dial, answered (or not) a handshake later.
                        self.nodes[x].outbox.push(Out::Seed { to: y });
                    } else if self.is_live(y) && !self.net.separated(x, y) {
                        let name = self.names[y].clone();
                        if let Some(d) = self.nodes[x].driver.as_mut() {
                            d.handle_seed(now, name, address(y));
                        }
                    }
                }
            }
            DriverAction::SyncMembers {
                peer,
                payload,
                gossip,
            } => {
                if let Some(y) = self.index(&peer.name) {
                    self.counters.sync_bytes += payload.len() as u64;
                    let msg = StreamMsg::Members {
                        from: x,
                        from_life: life,
                        payload,
                        answer: false,
                        gossip,
                    };
                    self.stream(x, y, msg);
                }
            }
            DriverAction::Fetch { node, .. } => {
                let Some(y) = self.index(&node) else {
                    return;
                };
                if self.catalogs.slot(y).is_none() {
                    self.counters.empty_fetches += 1;
                }
                let msg = StreamMsg::Fetch {
                    from: x,
                    from_life: life,
                };
                if !self.stream(x, y, msg) {
                    self.fetch_failed(x, life, y);
                }
            }
            DriverAction::ExchangeDigest { peer, digest, .. } => {
                if let Some(y) = self.index(&peer) {
                    let msg = StreamMsg::Digest {
                        from: x,
                        from_life: life,
                        digest,
                        answer: false,
                    };
                    self.stream(x, y, msg);
                }
            }
            DriverAction::Disconnect { peer } => {
                if let Some(y) = self.index(&peer)
                    && let Some(host) = self.host.as_mut()
                {
                    host.conns.close(x, life, y);
                }
            }
            DriverAction::DisconnectStale { peer } => {
                if let Some(y) = self.index(&peer.name)
                    && let Some(host) = self.host.as_mut()
                {
                    host.conns.close_stale(x, y, self.nodes[y].life);
                }
            }
            DriverAction::Purge { .. } => {}
            DriverAction::FetchDoc { key, from, .. } => {
                let Some(y) = self.index(&from) else {
                    return;
                };
                let msg = StreamMsg::DocFetch {
                    from: x,
                    from_life: life,
                    key: key.clone(),
                };
                if !self.stream(x, y, msg) {
                    let msg = StreamMsg::DocFetch {
                        from: x,
                        from_life: life,
                        key,
                    };
                    self.stream_failed(y, msg);
                }
            }
            DriverAction::ExchangeDocs { peer, summary, .. } => {
                if let Some(y) = self.index(&peer) {
                    let list = self.nodes[x]
                        .driver
                        .as_ref()
                        .map(|d| d.docs().list())
                        .unwrap_or_default();
                    let msg = StreamMsg::DocCompare {
                        from: x,
                        from_life: life,
                        summary,
                        list,
                    };
                    self.stream(x, y, msg);
                }
            }
        }
    }

    pub(super) fn index(&self, name: &str) -> Option<usize> {
        index_of(name).filter(|&y| y < self.nodes.len())
    }

    fn send(&mut self, from: usize, t: Transmit) {
        self.counters.datagrams += 1;
        self.counters.bytes += t.data.len() as u64;
        self.watch_suspicions(&t.data);
        let Some(to) = index_of(&t.to.name).filter(|&i| i < self.nodes.len()) else {
            self.counters.undeliverable += 1;
            return;
        };
        if self.host.is_some() {
            self.nodes[from]
                .outbox
                .push(Out::Datagram { to, data: t.data });
            return;
        }
        self.net_datagram(from, to, t.data);
    }

    /// A datagram on the wire: cut, lost, or delivered after a delay.
    pub(super) fn net_datagram(&mut self, from: usize, to: usize, data: Bytes) {
        if self.net.separated(from, to) {
            self.counters.cut += 1;
            return;
        }
        if self.net.lost() {
            self.counters.lost += 1;
            return;
        }
        let at = self.now + self.net.delay();
        self.queue.push(at, Ev::Datagram { from, to, data });
    }
}
