//! The CPU model's side of a node: what each input and output costs its
//! machine, and what runs when a machine finishes a job
//! ([`crate::cpu`]); what a node sends, routed over its links
//! ([`crate::conns`]).

use std::time::Duration;

use bytes::Bytes;
use gossamer_membership::links::LinkPolicy;
use gossamer_membership::sync::SyncPayload;

use super::dials::SWEEP_EVERY;
use super::queue::Ev;
use super::stream::StreamMsg;
use super::{Sim, address};
use crate::conns::{Conns, Route, Started};
use crate::cpu::{Costs, Cpu};

/// Where nodes run and what their work costs.
#[derive(Debug, Clone, PartialEq)]
pub struct HostConfig {
    /// Machines; node `i` runs on machine `i % machines`.
    pub machines: usize,
    /// Cores per machine.
    pub cores: u32,
    /// CPU per piece of work.
    pub costs: Costs,
    /// Which connections a node keeps (the agent's policy).
    pub links: LinkPolicy,
    /// A dial without an answer fails after this long (the transport's
    /// `connect_timeout`).
    pub connect_timeout: Duration,
}

impl HostConfig {
    /// `machines` machines of `cores` cores, default costs and policies.
    pub fn new(machines: usize, cores: u32) -> Self {
        Self {
            machines,
            cores,
            costs: Costs::default(),
            links: LinkPolicy::default(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Something a node sends, once the CPU to send it is spent.
#[derive(Debug)]
pub(super) enum Out {
    Datagram {
        to: usize,
        data: Bytes,
    },
    Stream {
        to: usize,
        to_life: u32,
        msg: StreamMsg,
    },
    /// Dial a seed and tell the driver who answered.
    Seed {
        to: usize,
    },
}

impl Out {
    fn to(&self) -> usize {
        match self {
            Out::Datagram { to, .. } | Out::Stream { to, .. } | Out::Seed { to } => *to,
        }
    }
}

/// Work queued on a node's CPU.
#[derive(Debug)]
pub(super) enum Job {
    /// Handle an input.
    Input(Ev),
    /// Send what handling produced.
    Transmit(Vec<Out>),
    /// The process of this life finished starting: its driver starts.
    Boot(u32),
    /// A second's background work (nothing to carry out).
    Background,
}

/// The machines and connections of a run with a [`HostConfig`].
#[derive(Debug)]
pub(super) struct Host {
    pub(super) config: HostConfig,
    pub(super) cpu: Cpu<Job>,
    pub(super) conns: Conns<Out>,
}

impl Host {
    fn cost(&self, us: f64) -> Duration {
        Costs::time(us)
    }

    /// The CPU an input costs its receiver.
    pub(super) fn input_cost(&self, ev: &Ev) -> Option<Duration> {
        let c = &self.config.costs;
        Some(match ev {
            Ev::Datagram { .. } => self.cost(c.datagram_recv_us + c.agent_input_us),
            Ev::Timer { .. } => self.cost(c.timer_us + c.agent_input_us),
            Ev::Stream { msg, .. } => {
                self.cost(c.stream_message_us + sync_cost(c, msg) + c.agent_stream_us)
            }
            Ev::Dial { resumed, .. } | Ev::DialAnswer { resumed, .. } => self.handshake(*resumed),
            _ => return None,
        })
    }

    fn handshake(&self, resumed: bool) -> Duration {
        let c = &self.config.costs;
        self.cost(if resumed {
            c.handshake_resumed_us
        } else {
            c.handshake_full_us
        })
    }

    /// The CPU starting a process costs (`None`: it starts at once).
    pub(super) fn start_cost(&self) -> Option<Duration> {
        let us = self.config.costs.process_start_us;
        (us > 0.0).then(|| self.cost(us))
    }

    /// The CPU a second of background work costs a process that holds
    /// `members` members active.
    pub(super) fn background_cost(&self, members: usize) -> Option<Duration> {
        let c = &self.config.costs;
        let us = c.background_us_per_s + c.member_us_per_s * members as f64;
        (us > 0.0).then(|| self.cost(us * SWEEP_EVERY.as_secs_f64()))
    }

    /// The CPU sending costs.
    fn output_cost(&self, out: &Out) -> Duration {
        let c = &self.config.costs;
        match out {
            Out::Datagram { .. } => self.cost(c.datagram_send_us),
            Out::Stream { msg, .. } => {
                self.cost(c.stream_message_us + sync_cost(c, msg) + c.agent_stream_us)
            }
            // The dial's CPU is charged when its answer arrives.
            Out::Seed { .. } => Duration::ZERO,
        }
    }
}

/// The per-member part of a member sync frame's cost.
fn sync_cost(c: &Costs, msg: &StreamMsg) -> f64 {
    match msg {
        StreamMsg::Members { payload, .. } => {
            let members = SyncPayload::decode(payload).map_or(0, |p| p.members.len());
            c.sync_member_us * members as f64
        }
        _ => 0.0,
    }
}

impl Sim {
    /// A machine finished a job: carry out what it was for.
    pub(super) fn on_cpu(&mut self, machine: usize, epoch: u64) {
        let now = self.now;
        let Some(host) = self.host.as_mut() else {
            return;
        };
        let Some((x, job)) = host.cpu.complete(now, machine, epoch) else {
            return;
        };
        match job {
            Job::Input(ev) => {
                self.handle(ev);
                // Replies sent without a flush (stream answers).
                self.submit_outbox(x);
            }
            Job::Transmit(outs) => {
                for out in outs {
                    self.release(x, out);
                }
            }
            Job::Boot(life) => self.booted(x, life),
            Job::Background => {}
        }
        if let Some(host) = self.host.as_mut() {
            host.cpu.resume(now, x);
        }
    }

    /// Queues the sending of what `x` produced, right after the job in
    /// service: a process sends what it decided before its next input.
    pub(super) fn submit_outbox(&mut self, x: usize) {
        if self.nodes[x].outbox.is_empty() {
            return;
        }
        if self.nodes[x]
            .driver
            .as_ref()
            .is_some_and(|d| d.core().has_left())
        {
            // Leave notices go before the process exits, whatever its
            // queue: the agent waits for them.
            for out in std::mem::take(&mut self.nodes[x].outbox) {
                self.release(x, out);
            }
            return;
        }
        if let Some(host) = self.host.as_mut() {
            let outs = std::mem::take(&mut self.nodes[x].outbox);
            let cost = outs.iter().map(|o| host.output_cost(o)).sum();
            host.cpu
                .submit(self.now, x, cost, Job::Transmit(outs), true);
        }
    }

    /// Puts what `x` sends on its way: over its link to the peer, or into
    /// a dial.
    fn release(&mut self, x: usize, out: Out) {
        let now = self.now;
        let to = out.to();
        let (x_life, to_life) = (self.nodes[x].life, self.nodes[to].life);
        if let Out::Stream { to_life: meant, .. } = &out
            && *meant != to_life
        {
            // An answer to a process that is gone: it fails on arrival.
            self.deliver(x, out);
            return;
        }
        let datagram = matches!(out, Out::Datagram { .. });
        let Some(host) = self.host.as_mut() else {
            return;
        };
        match host
            .conns
            .route(now, (x, x_life), (to, to_life), out, datagram)
        {
            Route::Open(out) => self.deliver(x, out),
            Route::Queued => {}
            Route::Dropped(_) => self.counters.dial_drops += 1,
            Route::Dial {
                id,
                resumed,
                now: start,
            } => {
                // The transport's connect timeout runs from the request,
                // the wait for a turn included.
                let at = now + host.config.connect_timeout;
                self.queue.push(
                    at,
                    Ev::DialFailed {
                        node: x,
                        life: x_life,
                        peer: to,
                        id,
                    },
                );
                if start {
                    self.start_dial(
                        x,
                        x_life,
                        Started {
                            to,
                            to_life,
                            id,
                            resumed,
                        },
                    );
                }
            }
        }
    }

    /// Sends over an open link.
    pub(super) fn deliver(&mut self, x: usize, out: Out) {
        match out {
            Out::Datagram { to, data } => self.net_datagram(x, to, data),
            Out::Stream { to, to_life, msg } => {
                if self.nodes[to].life != to_life || self.net.separated(x, to) {
                    self.counters.stream_failures += 1;
                    self.stream_failed(to, msg);
                    return;
                }
                let at = self.now + self.net.stream_delay();
                self.queue.push(at, Ev::Stream { to, to_life, msg });
            }
            Out::Seed { to } => {
                let (now, name) = (self.now, self.names[to].clone());
                if let Some(d) = self.nodes[x].driver.as_mut() {
                    d.handle_seed(now, name, address(to));
                }
                self.flush(x);
            }
        }
    }

    /// What waited in a dial that failed.
    pub(super) fn undelivered(&mut self, out: Out) {
        match out {
            Out::Datagram { .. } => self.counters.dial_drops += 1,
            Out::Stream { to, msg, .. } => {
                self.counters.stream_failures += 1;
                self.stream_failed(to, msg);
            }
            Out::Seed { .. } => {}
        }
    }
}
