//! The event queue and how an event reaches its handler.
//!
//! Events are ordered by `(time, sequence)`: the sequence number is taken
//! when an event is scheduled, so events at the same instant run in the
//! order they were created and a run depends on nothing but its seed.

use std::collections::BinaryHeap;
use std::time::Duration;

use bytes::Bytes;

use super::host::Job;
use super::stream::StreamMsg;
use super::{Action, Sim};

#[derive(Debug)]
pub(super) enum Ev {
    Datagram {
        from: usize,
        to: usize,
        data: Bytes,
    },
    Timer {
        node: usize,
        life: u32,
        at: Duration,
    },
    Stream {
        to: usize,
        to_life: u32,
        msg: StreamMsg,
    },
    StallEnd {
        node: usize,
        life: u32,
        at: Duration,
    },
    Sample,
    Action(Action),
    /// A machine's job in service finishes (if `epoch` is still current).
    Cpu {
        machine: usize,
        epoch: u64,
    },
    /// A handshake's first flight reaches the peer (`to`).
    Dial {
        from: usize,
        from_life: u32,
        to: usize,
        to_life: u32,
        id: u64,
        resumed: bool,
    },
    /// The peer's answer reaches the dialer (`to`).
    DialAnswer {
        to: usize,
        to_life: u32,
        from: usize,
        from_life: u32,
        id: u64,
        resumed: bool,
    },
    /// A dial timed out.
    DialFailed {
        node: usize,
        life: u32,
        peer: usize,
        id: u64,
    },
    /// Time to apply the link policy.
    Sweep {
        node: usize,
        life: u32,
    },
}

impl Ev {
    /// The node whose process must handle this event, if any.
    fn target(&self) -> Option<usize> {
        match self {
            Ev::Datagram { to, .. }
            | Ev::Stream { to, .. }
            | Ev::Dial { to, .. }
            | Ev::DialAnswer { to, .. } => Some(*to),
            Ev::Timer { node, .. } => Some(*node),
            Ev::StallEnd { .. }
            | Ev::Sample
            | Ev::Action(_)
            | Ev::Cpu { .. }
            | Ev::DialFailed { .. }
            | Ev::Sweep { .. } => None,
        }
    }
}

#[derive(Debug)]
struct Scheduled {
    at: Duration,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    /// Reversed: `BinaryHeap` pops the greatest, we want the earliest.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Events still to come, earliest first.
#[derive(Debug, Default)]
pub(super) struct Queue {
    heap: BinaryHeap<Scheduled>,
    seq: u64,
}

impl Queue {
    /// Schedules `ev` at `at`, after everything already scheduled then.
    pub(super) fn push(&mut self, at: Duration, ev: Ev) {
        self.seq += 1;
        self.heap.push(Scheduled {
            at,
            seq: self.seq,
            ev,
        });
    }

    /// Takes the earliest event if it is due at or before `end`.
    pub(super) fn pop_until(&mut self, end: Duration) -> Option<(Duration, Ev)> {
        if self.heap.peek()?.at > end {
            return None;
        }
        self.heap.pop().map(|s| (s.at, s.ev))
    }
}

impl Sim {
    pub(super) fn dispatch(&mut self, ev: Ev) {
        self.accept_event(ev);
        if let Some(host) = self.host.as_mut() {
            for w in host.cpu.wakes(self.now) {
                self.queue.push(
                    w.at,
                    Ev::Cpu {
                        machine: w.machine,
                        epoch: w.epoch,
                    },
                );
            }
        }
    }

    /// Drops an event for a process that is gone, holds it during a stall,
    /// queues it for the CPU, or handles it now.
    fn accept_event(&mut self, ev: Ev) {
        if let Some(x) = ev.target() {
            let node = &mut self.nodes[x];
            let gone = match &ev {
                Ev::Dial { to_life, .. } => *to_life != node.life,
                _ => false,
            };
            if node.driver.is_none() || gone {
                // A dial to a process that is gone gets no answer and
                // fails at its deadline.
                match ev {
                    Ev::Datagram { .. } => self.counters.undeliverable += 1,
                    Ev::Stream { .. } => self.counters.stream_failures += 1,
                    _ => {}
                }
                return;
            }
            if node.stalled_until.is_some() {
                node.backlog.push_back(ev);
                return;
            }
            if let Some(host) = self.host.as_mut()
                && let Some(cost) = host.input_cost(&ev)
            {
                host.cpu.submit(self.now, x, cost, Job::Input(ev), false);
                return;
            }
        }
        self.handle(ev);
    }

    pub(super) fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Datagram { from, to, data } => self.on_datagram(from, to, &data),
            Ev::Timer { node, life, at } => self.on_timer(node, life, at),
            Ev::Stream { to, to_life, msg } => self.on_stream(to, to_life, msg),
            Ev::StallEnd { node, life, at } => self.on_stall_end(node, life, at),
            Ev::Sample => self.on_sample(),
            Ev::Action(action) => self.on_action(action),
            Ev::Cpu { machine, epoch } => self.on_cpu(machine, epoch),
            Ev::Dial {
                from,
                from_life,
                to,
                to_life,
                id,
                resumed,
            } => self.on_dial((from, from_life), (to, to_life), id, resumed),
            Ev::DialAnswer {
                to,
                to_life,
                from,
                from_life,
                id,
                ..
            } => self.on_dial_answer((to, to_life), (from, from_life), id),
            Ev::DialFailed {
                node,
                life,
                peer,
                id,
            } => self.on_dial_failed(node, life, peer, id),
            Ev::Sweep { node, life } => self.on_sweep(node, life),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_pops_in_time_then_sequence_order() {
        let mut heap = BinaryHeap::new();
        for (at, seq) in [(5, 1), (1, 3), (1, 2), (3, 4)] {
            heap.push(Scheduled {
                at: Duration::from_millis(at),
                seq,
                ev: Ev::Sample,
            });
        }
        let order: Vec<(u128, u64)> = std::iter::from_fn(|| heap.pop())
            .map(|s| (s.at.as_millis(), s.seq))
            .collect();
        assert_eq!(order, vec![(1, 2), (1, 3), (3, 4), (5, 1)]);
    }

    #[test]
    fn same_instant_runs_in_scheduling_order_and_end_is_inclusive() {
        let mut queue = Queue::default();
        let at = |ms| Duration::from_millis(ms);
        for (ms, node) in [(2, 0), (1, 1), (1, 2), (3, 3)] {
            queue.push(at(ms), Ev::Sweep { node, life: 0 });
        }
        let order: Vec<(u128, usize)> = std::iter::from_fn(|| queue.pop_until(at(2)))
            .map(|(t, ev)| match ev {
                Ev::Sweep { node, .. } => (t.as_millis(), node),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(order, vec![(1, 1), (1, 2), (2, 0)]);
        assert!(queue.pop_until(at(3)).is_some());
        assert!(queue.pop_until(at(9)).is_none());
    }
}
