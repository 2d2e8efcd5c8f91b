//! The connection model's events: handshakes in flight, dials that fail,
//! and the periodic sweep that applies the link policy.

use std::time::Duration;

use super::Sim;
use super::queue::Ev;

/// How often each node applies the link policy.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl Sim {
    /// `x`'s dial `id` to `to` gets no answer: it fails at the timeout.
    pub(super) fn dial_lost(
        &mut self,
        x: usize,
        life: u32,
        to: usize,
        id: u64,
        dialled_at: Duration,
    ) {
        let Some(host) = self.host.as_ref() else {
            return;
        };
        let at = (dialled_at + host.config.connect_timeout).max(self.now);
        self.queue.push(
            at,
            Ev::DialFailed {
                node: x,
                life,
                peer: to,
                id,
            },
        );
    }

    /// The peer `y` spent its handshake CPU: it holds the link and answers.
    pub(super) fn on_dial(
        &mut self,
        (x, x_life): (usize, u32),
        (y, y_life): (usize, u32),
        id: u64,
        resumed: bool,
        dialled_at: Duration,
    ) {
        let now = self.now;
        if self.nodes[y].life != y_life || self.nodes[x].life != x_life {
            self.dial_lost(x, x_life, y, id, dialled_at);
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
            self.dial_lost(x, x_life, y, id, dialled_at);
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
        let waiting = host.conns.established(now, x, (y, y_life), id);
        for out in waiting {
            self.deliver(x, out);
        }
    }

    pub(super) fn on_dial_failed(&mut self, x: usize, life: u32, y: usize, id: u64) {
        if self.nodes[x].life != life {
            return;
        }
        let Some(host) = self.host.as_mut() else {
            return;
        };
        for out in host.conns.failed(x, y, id) {
            self.undelivered(x, life, out);
        }
    }

    /// Applies the link policy at `x`, and again a second later.
    pub(super) fn on_sweep(&mut self, x: usize, life: u32) {
        let now = self.now;
        if self.nodes[x].life != life || self.nodes[x].driver.is_none() {
            return;
        }
        let Some(host) = self.host.as_mut() else {
            return;
        };
        let policy = host.config.links;
        for y in host.conns.sweep(now, x, &policy) {
            host.conns.close(x, life, y);
        }
        self.queue
            .push(now + SWEEP_EVERY, Ev::Sweep { node: x, life });
    }
}
