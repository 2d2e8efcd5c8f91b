//! Lifeguard's local health awareness on top of foca's plain SWIM.
//!
//! foca decides *what* happens in a probe round; the core decides *when*,
//! because foca hands every timer to its runtime. That is enough to add the
//! parts of Lifeguard that need no change to the protocol:
//!
//! - **Local health score** (0 to `max_health_score`): a node that fails
//!   its own probes, or has to refute suspicions of itself, is more likely
//!   slow itself than surrounded by dead members. Each point stretches its
//!   probe interval and probe timeout by one more multiple, so a slow node
//!   accuses others less often and gives their acks more time. It also
//!   stretches the suspicions the node raises (up to
//!   [`MAX_SUSPICION_STRETCH`] times), so that during a join storm or a
//!   starved CPU a suspect has time to hear of it and refute.
//! - **Late-ack grace**: a probe whose direct and indirect stages both went
//!   unanswered waits a little longer before foca turns it into a
//!   suspicion, so a member that stalls for a moment answers in time.
//!
//! The scaled suspicion timeout lives in [`crate::SwimConfig`]. What foca
//! lacks is suspicion *confirmations* (Lifeguard shortens the timeout as
//! independent suspicions of the same member arrive); see
//! docs/simulations.md for what that costs.

use std::time::Duration;

use foca::{Message, ProbeNumber, Timer};

use crate::identity::NodeId;

/// The most a suspicion timeout is stretched by a poor local health score.
/// Only the node that raised a suspicion times it (see
/// [`crate::core`]), so a node that is slow itself (a starved CPU, a join
/// storm) holds its own accusations longer and gives the suspect time to
/// refute; a healthy node still declares a crash down on time. Lifeguard
/// starts a lone suspicion at 6x the minimum timeout and shortens it with
/// confirmations from other members, which foca's updates cannot carry.
pub const MAX_SUSPICION_STRETCH: u32 = 6;

/// The probe this node has in flight.
#[derive(Debug, Clone)]
struct Probe {
    target: NodeId,
    number: ProbeNumber,
    acked: bool,
    /// Whether the round was already stretched by the late-ack grace.
    extended: bool,
}

/// Counters of what the detector saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthStats {
    /// Probes answered (directly or through another member).
    pub probes_ok: u64,
    /// Probes that went unanswered.
    pub probes_failed: u64,
    /// Probes that were answered during the late-ack grace.
    pub late_acks: u64,
    /// Suspicions of this node that it refuted.
    pub refuted: u64,
}

/// Local health score and the probe it judges by.
#[derive(Debug, Clone)]
pub struct Lifeguard {
    score: u8,
    max: u8,
    grace: Duration,
    probe: Option<Probe>,
    stats: HealthStats,
}

/// What to do with a `ProbeRandomMember` timer that is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to foca now.
    Fire,
    /// The probe is unanswered: wait this much longer for a late ack.
    Defer(Duration),
}

impl Lifeguard {
    /// A detector with the score ceiling and grace of the configuration.
    pub fn new(max_health_score: u8, late_ack_grace: Duration) -> Self {
        Self {
            score: 0,
            max: max_health_score,
            grace: late_ack_grace,
            probe: None,
            stats: HealthStats::default(),
        }
    }

    /// The current score (0 = healthy).
    pub fn score(&self) -> u8 {
        self.score
    }

    /// What the detector counted so far.
    pub fn stats(&self) -> HealthStats {
        self.stats
    }

    /// The delay foca asked for `timer`, stretched by the score: probe
    /// rounds by one more multiple per point, and a suspicion this node
    /// raised by one multiple per point beyond the first (the one its own
    /// failed probe just added), up to [`MAX_SUSPICION_STRETCH`] times.
    pub fn stretch(&self, timer: &Timer<NodeId>, after: Duration) -> Duration {
        let multiple = u32::from(self.score) + 1;
        match timer {
            Timer::ProbeRandomMember(_) | Timer::SendIndirectProbe { .. } => after * multiple,
            // foca raises a suspicion right after the failed probe that
            // just added a point, so that point is not held against it: a
            // healthy node (score 0 before the probe) declares a crash down
            // on time.
            Timer::ChangeSuspectToDown { .. } => {
                after * u32::from(self.score).clamp(1, MAX_SUSPICION_STRETCH)
            }
            _ => after,
        }
    }

    /// This node sent `message` to `to`.
    pub fn on_send(&mut self, to: &NodeId, message: &Message<NodeId>) {
        if let Message::Ping(number) = message {
            self.probe = Some(Probe {
                target: to.clone(),
                number: *number,
                acked: false,
                extended: false,
            });
        }
    }

    /// A datagram from `src` carrying `message` arrived.
    pub fn on_receive(&mut self, src: &NodeId, message: &Message<NodeId>) {
        let Some(probe) = self.probe.as_mut() else {
            return;
        };
        let answers = match message {
            Message::Ack(n) => src == &probe.target && *n == probe.number,
            Message::ForwardedAck {
                origin,
                probe_number,
            } => origin == &probe.target && *probe_number == probe.number,
            _ => false,
        };
        if answers && !probe.acked {
            probe.acked = true;
            if probe.extended {
                self.stats.late_acks += 1;
            }
        }
    }

    /// This node raised its incarnation: it refuted a suspicion of itself.
    pub fn on_refute(&mut self) {
        self.stats.refuted += 1;
        self.raise();
    }

    /// The probe round ends (foca's `ProbeRandomMember` is due): judge the
    /// probe, or ask for the grace once.
    pub fn on_round_end(&mut self) -> Verdict {
        let Some(probe) = self.probe.as_mut() else {
            return Verdict::Fire;
        };
        if !probe.acked && !probe.extended && !self.grace.is_zero() {
            probe.extended = true;
            return Verdict::Defer(self.grace);
        }
        let acked = probe.acked;
        self.probe = None;
        if acked {
            self.stats.probes_ok += 1;
            self.score = self.score.saturating_sub(1);
        } else {
            self.stats.probes_failed += 1;
            self.raise();
        }
        Verdict::Fire
    }

    fn raise(&mut self) {
        self.score = (self.score + 1).min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> NodeId {
        NodeId::new(name, ([10, 0, 0, 1], 7946).into(), 1).unwrap()
    }

    #[test]
    fn score_rises_on_failures_and_falls_on_successes() {
        let mut lg = Lifeguard::new(3, Duration::ZERO);
        for _ in 0..5 {
            lg.on_send(&id("a"), &Message::Ping(1));
            assert_eq!(lg.on_round_end(), Verdict::Fire);
        }
        assert_eq!(lg.score(), 3, "capped");
        let timer = Timer::ProbeRandomMember(0);
        assert_eq!(
            lg.stretch(&timer, Duration::from_secs(1)),
            Duration::from_secs(4)
        );
        lg.on_send(&id("a"), &Message::Ping(2));
        lg.on_receive(&id("a"), &Message::Ack(2));
        lg.on_round_end();
        assert_eq!(lg.score(), 2);
        assert_eq!(lg.stats().probes_ok, 1);
        assert_eq!(lg.stats().probes_failed, 5);
    }

    #[test]
    fn a_poor_score_stretches_own_suspicions_up_to_the_cap() {
        let mut lg = Lifeguard::new(7, Duration::ZERO);
        let timer = Timer::ChangeSuspectToDown {
            member_id: id("a"),
            incarnation: 0,
            token: 0,
        };
        let base = Duration::from_secs(3);
        assert_eq!(lg.stretch(&timer, base), base, "healthy: as configured");
        lg.on_send(&id("a"), &Message::Ping(1));
        lg.on_round_end();
        assert_eq!(
            lg.stretch(&timer, base),
            base,
            "the failed probe behind the suspicion does not count"
        );
        lg.on_send(&id("a"), &Message::Ping(2));
        lg.on_round_end();
        assert_eq!(lg.stretch(&timer, base), base * 2);
        for n in 3..10 {
            lg.on_send(&id("a"), &Message::Ping(n));
            lg.on_round_end();
        }
        assert_eq!(lg.score(), 7);
        assert_eq!(lg.stretch(&timer, base), base * MAX_SUSPICION_STRETCH);
        let other = Timer::PeriodicGossip(0);
        assert_eq!(lg.stretch(&other, base), base, "other timers keep theirs");
    }

    #[test]
    fn acks_must_match_target_and_number() {
        let mut lg = Lifeguard::new(7, Duration::ZERO);
        lg.on_send(&id("a"), &Message::Ping(9));
        lg.on_receive(&id("b"), &Message::Ack(9));
        lg.on_receive(&id("a"), &Message::Ack(8));
        lg.on_round_end();
        assert_eq!(lg.score(), 1, "neither ack counts");
        lg.on_send(&id("a"), &Message::Ping(10));
        let forwarded = Message::ForwardedAck {
            origin: id("a"),
            probe_number: 10,
        };
        lg.on_receive(&id("c"), &forwarded);
        lg.on_round_end();
        assert_eq!(lg.score(), 0, "an indirect ack counts");
    }

    #[test]
    fn grace_defers_once_and_counts_late_acks() {
        let grace = Duration::from_millis(700);
        let mut lg = Lifeguard::new(7, grace);
        lg.on_send(&id("a"), &Message::Ping(1));
        assert_eq!(lg.on_round_end(), Verdict::Defer(grace));
        lg.on_receive(&id("a"), &Message::Ack(1));
        assert_eq!(lg.on_round_end(), Verdict::Fire);
        assert_eq!(lg.stats().late_acks, 1);
        assert_eq!(lg.score(), 0);
        lg.on_send(&id("a"), &Message::Ping(2));
        assert_eq!(lg.on_round_end(), Verdict::Defer(grace));
        assert_eq!(lg.on_round_end(), Verdict::Fire, "only once");
        assert_eq!(lg.score(), 1);
    }

    #[test]
    fn other_timers_are_not_stretched() {
        let mut lg = Lifeguard::new(7, Duration::ZERO);
        lg.on_refute();
        let gossip = Timer::PeriodicGossip(0);
        assert_eq!(
            lg.stretch(&gossip, Duration::from_millis(200)),
            Duration::from_millis(200)
        );
        let indirect = Timer::SendIndirectProbe {
            probed_id: id("a"),
            token: 0,
        };
        assert_eq!(
            lg.stretch(&indirect, Duration::from_millis(500)),
            Duration::from_secs(1)
        );
    }
}
