//! The connection model's events: handshakes in flight, dials that fail,
//! and the periodic sweep that applies the link policy.

use std::time::Duration;

use super::Sim;
use super::host::Job;
use super::queue::Ev;
use crate::conns::Started;

/// How often each node applies the link policy.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl Sim {
    /// `x`'s handshake with `d.to` starts: its first flight leaves. A dial
    /// nobody answers fails at its deadline, queued when it was asked for.
    pub(super) fn start_dial(&mut self, x: usize, x_life: u32, d: Started) {
        if self.nodes[d.to].driver.is_none() || self.net.separated(x, d.to) {
            return;
        }
        let at = self.now + self.net.stream_delay();
        self.queue.push(
            at,
            Ev::Dial {
                from: x,
                from_life: x_life,
                to: d.to,
                to_life: d.to_life,
                id: d.id,
                resumed: d.resumed,
            },
        );
    }

    /// `x`'s dial `id` is over: the dials waiting for its turn start.
    fn next_dials(&mut self, x: usize, x_life: u32, id: u64) {
        let Some(host) = self.host.as_mut() else {
            return;
        };
        for d in host.conns.dial_done(x, id) {
            self.start_dial(x, x_life, d);
        }
    }

    /// The peer `y` spent its handshake CPU: it holds the link and answers.
    pub(super) fn on_dial(
        &mut self,
        (x, x_life): (usize, u32),
        (y, y_life): (usize, u32),
        id: u64,
        resumed: bool,
    ) {
        let now = self.now;
        if self.nodes[y].life != y_life || self.nodes[x].life != x_life {
            // No answer: the dial fails at its deadline.
            return;
        }
        let Some(host) = self.host.as_mut() else {
            return;
        };
        let waiting = host.conns.accept(now, y, (x, x_life), resumed);
        for out in waiting {
            self.deliver(y, out);
        }
        if self.net.separated(x, y) {
            return;
        }
        let at = now + self.net.stream_delay();
        self.queue.push(
            at,
            Ev::DialAnswer {
                to: x,
                to_life: x_life,
                from: y,
                from_life: y_life,
                id,
                resumed,
            },
        );
    }

    /// The dialer spent its handshake CPU: the link is open both ways.
    pub(super) fn on_dial_answer(
        &mut self,
        (x, x_life): (usize, u32),
        (y, y_life): (usize, u32),
        id: u64,
    ) {
        let now = self.now;
        if self.nodes[x].life != x_life {
            return;
        }
        let Some(host) = self.host.as_mut() else {
            return;
        };
        if !host.conns.in_flight(x, id) {
            // It timed out first: the dialer dropped the connection.
            return;
        }
        let waiting = host.conns.established(now, x, (y, y_life), id);
        for out in waiting {
            self.deliver(x, out);
        }
        self.next_dials(x, x_life, id);
    }

    pub(super) fn on_dial_failed(&mut self, x: usize, life: u32, y: usize, id: u64) {
        if self.nodes[x].life != life {
            return;
        }
        let Some(host) = self.host.as_mut() else {
            return;
        };
        for out in host.conns.failed(x, y, id) {
            self.undelivered(out);
        }
        self.next_dials(x, life, id);
    }

    /// Applies the link policy at `x`, and again a second later.
    pub(super) fn on_sweep(&mut self, x: usize, life: u32) {
        let now = self.now;
        if self.nodes[x].life != life || self.nodes[x].driver.is_none() {
            return;
        }
        let members = self.nodes[x]
            .driver
            .as_ref()
            .map_or(0, |d| d.core().num_active());
        let Some(host) = self.host.as_mut() else {
            return;
        };
        let policy = host.config.links;
        for y in host.conns.sweep(now, x, &policy) {
            host.conns.close(x, life, y);
        }
        // The process's background work of the second that ends.
        if let Some(cost) = host.background_cost(members) {
            host.cpu.submit(now, x, cost, Job::Background, false);
        }
        self.queue
            .push(now + SWEEP_EVERY, Ev::Sweep { node: x, life });
    }
}
