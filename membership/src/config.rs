//! SWIM timing, shared by the agent and the simulator.

use std::num::{NonZeroU8, NonZeroUsize};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Timing and sizing of the SWIM protocol. The defaults suit a LAN of up to a
/// few hundred nodes (close to foca's `Config::new_lan`), with faster
/// re-announcing to down members so partitions heal by themselves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SwimConfig {
    /// How often each node probes one random member.
    #[serde(with = "crate::duration")]
    pub probe_period: Duration,
    /// How long to wait for a direct ack before asking others to probe.
    #[serde(with = "crate::duration")]
    pub probe_rtt: Duration,
    /// How many members are asked to probe indirectly.
    pub indirect_probes: usize,
    /// How long a member stays suspect before it is declared down, at the
    /// least; in larger clusters it grows with the size (see
    /// [`SwimConfig::suspicion_timeout_for`]).
    #[serde(with = "crate::duration")]
    pub suspect_to_down_after: Duration,
    /// Lifeguard's suspicion multiplier: a suspect is declared down after
    /// `max(suspect_to_down_after, suspicion_mult × max(1, log10 n) ×
    /// probe_period)` in a cluster of n. 0 keeps `suspect_to_down_after`.
    pub suspicion_mult: f64,
    /// Highest local health score (Lifeguard's "awareness"): each point
    /// stretches this node's probe interval and probe timeout by one more
    /// multiple. Failed probes and refuted suspicions of this node raise it,
    /// successful probes lower it. 0 turns it off.
    pub max_health_score: u8,
    /// How long a probe whose direct and indirect stages both went
    /// unanswered still waits for a late ack before the member is
    /// suspected. A member that stalls for a moment (a GC pause, a busy
    /// CPU, a VM migration) answers within it and is never suspected;
    /// a crashed one is suspected this much later.
    #[serde(with = "crate::duration")]
    pub late_ack_grace: Duration,
    /// How long a down member is remembered before it is forgotten.
    #[serde(with = "crate::duration")]
    pub remove_down_after: Duration,
    /// The least number of times each update is sent on; in clusters of
    /// 100 nodes and more the count grows with the size, see
    /// [`SwimConfig::transmissions_for`].
    pub max_transmissions: u8,
    /// Transmissions per decimal digit of the cluster size: each update is
    /// sent on `max(max_transmissions, retransmit_mult × ⌈log10(n + 1)⌉)`
    /// times. A node misses an update with probability about e^-T when
    /// every holder sends it T times, so T must grow like log n for a whole
    /// cluster of n² (observer, member) pairs to stay right.
    pub retransmit_mult: u8,
    /// The largest SWIM datagram this node builds.
    pub max_packet_size: usize,
    /// How often updates are pushed to `gossip_fanout` random members.
    #[serde(with = "crate::duration")]
    pub gossip_interval: Duration,
    /// Members each gossip round goes to.
    pub gossip_fanout: usize,
    /// How often to announce to a random live member (keeps views full).
    #[serde(with = "crate::duration")]
    pub announce_interval: Duration,
    /// How often to announce to members we believe are down: this is what
    /// rejoins the two sides of a healed partition.
    #[serde(with = "crate::duration")]
    pub announce_down_interval: Duration,
    /// Down members announced to each time.
    pub announce_down_fanout: usize,
    /// How often to swap whole member lists with a random member (push-pull
    /// sync), in clusters of up to 32 nodes; it grows with log2 of the size
    /// beyond (see [`crate::sync::interval_for`]). A node also syncs once
    /// right after it joins.
    #[serde(with = "crate::duration")]
    pub sync_interval: Duration,
}

impl Default for SwimConfig {
    fn default() -> Self {
        Self {
            probe_period: Duration::from_secs(1),
            probe_rtt: Duration::from_millis(500),
            indirect_probes: 3,
            // With the grace below, the time from a crash to `down` stays
            // where plain SWIM with a flat 4 s had it, up to 1,000 nodes,
            // with 18x fewer false suspicions (docs/simulations.md).
            suspect_to_down_after: Duration::from_secs(3),
            suspicion_mult: 1.4,
            max_health_score: 7,
            late_ack_grace: Duration::from_millis(800),
            remove_down_after: Duration::from_secs(6 * 3600),
            max_transmissions: 10,
            retransmit_mult: 4,
            max_packet_size: 1100,
            gossip_interval: Duration::from_millis(200),
            gossip_fanout: 3,
            announce_interval: Duration::from_secs(30),
            announce_down_interval: Duration::from_secs(3),
            announce_down_fanout: 2,
            sync_interval: Duration::from_secs(30),
        }
    }
}

/// A timing value that foca would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("swim.{key}: {problem}")]
pub struct InvalidSwimConfig {
    /// The offending key.
    pub key: &'static str,
    /// What is wrong with it.
    pub problem: &'static str,
}

impl SwimConfig {
    /// Checks the values; on success `to_foca` cannot fail.
    pub fn validate(&self) -> Result<(), InvalidSwimConfig> {
        let bad = |key, problem| Err(InvalidSwimConfig { key, problem });
        if self.probe_period.is_zero() {
            return bad("probe_period", "must be positive");
        }
        if self.probe_rtt.is_zero() || self.probe_rtt >= self.probe_period {
            return bad(
                "probe_rtt",
                "must be positive and shorter than probe_period",
            );
        }
        if self.indirect_probes == 0 {
            return bad("indirect_probes", "must be at least 1");
        }
        if self.suspect_to_down_after.is_zero() {
            return bad("suspect_to_down_after", "must be positive");
        }
        if !(0.0..=100.0).contains(&self.suspicion_mult) {
            return bad("suspicion_mult", "must be between 0 and 100");
        }
        if self.max_health_score > 15 {
            return bad("max_health_score", "must be at most 15");
        }
        if self.late_ack_grace > self.probe_period * 10 {
            return bad("late_ack_grace", "must be at most 10 probe periods");
        }
        if self.max_transmissions == 0 {
            return bad("max_transmissions", "must be at least 1");
        }
        if !(256..=crate::codec::MAX_DATAGRAM).contains(&self.max_packet_size) {
            return bad("max_packet_size", "must be between 256 and 65536");
        }
        if self.gossip_interval.is_zero() || self.gossip_fanout == 0 {
            return bad("gossip_interval", "interval and fanout must be positive");
        }
        if self.announce_interval.is_zero() || self.announce_down_interval.is_zero() {
            return bad("announce_interval", "must be positive");
        }
        if self.sync_interval.is_zero() {
            return bad("sync_interval", "must be positive");
        }
        if self.announce_down_fanout == 0 {
            return bad("announce_down_fanout", "must be at least 1");
        }
        Ok(())
    }

    /// How many times each update is sent on in a cluster of `nodes`
    /// (counting this one).
    pub fn transmissions_for(&self, nodes: usize) -> u8 {
        let digits = (nodes.saturating_add(1) as f64).log10().ceil() as u32;
        let scaled = u32::from(self.retransmit_mult).saturating_mul(digits);
        u8::try_from(scaled)
            .unwrap_or(u8::MAX)
            .max(self.max_transmissions)
    }

    /// How long a member stays suspect in a cluster of `nodes` (counting
    /// this one): Lifeguard's `mult × max(1, log10 n) × probe period`, never
    /// below `suspect_to_down_after`, rounded to whole milliseconds so that
    /// a change of size rarely changes it. The chance that a suspicion
    /// reaches the suspect and its refutation comes back in time falls as
    /// the cluster grows (both take O(log n) gossip rounds), hence the log.
    pub fn suspicion_timeout_for(&self, nodes: usize) -> Duration {
        let scale = (nodes.max(1) as f64).log10().max(1.0);
        let scaled = self.probe_period.as_secs_f64() * self.suspicion_mult * scale;
        let scaled = Duration::from_millis((scaled * 1000.0).round() as u64);
        scaled.max(self.suspect_to_down_after)
    }

    /// The equivalent foca configuration for a cluster of `nodes` (see
    /// [`SwimConfig::transmissions_for`] and
    /// [`SwimConfig::suspicion_timeout_for`]).
    pub fn to_foca_for(&self, nodes: usize) -> Result<foca::Config, InvalidSwimConfig> {
        let mut config = self.to_foca()?;
        config.max_transmissions =
            NonZeroU8::new(self.transmissions_for(nodes)).expect("validated");
        config.suspect_to_down_after = self.suspicion_timeout_for(nodes);
        Ok(config)
    }

    /// The equivalent foca configuration (with `max_transmissions` as is).
    pub fn to_foca(&self) -> Result<foca::Config, InvalidSwimConfig> {
        self.validate()?;
        let nz = |n: usize| NonZeroUsize::new(n).expect("validated");
        Ok(foca::Config {
            probe_period: self.probe_period,
            probe_rtt: self.probe_rtt,
            num_indirect_probes: nz(self.indirect_probes),
            max_transmissions: NonZeroU8::new(self.max_transmissions).expect("validated"),
            suspect_to_down_after: self.suspect_to_down_after,
            remove_down_after: Some(self.remove_down_after),
            max_packet_size: nz(self.max_packet_size),
            notify_down_members: true,
            periodic_announce: Some(foca::PeriodicParams {
                frequency: self.announce_interval,
                num_members: nz(1),
            }),
            periodic_announce_to_down_members: Some(foca::PeriodicParams {
                frequency: self.announce_down_interval,
                num_members: nz(self.announce_down_fanout),
            }),
            periodic_gossip: Some(foca::PeriodicParams {
                frequency: self.gossip_interval,
                num_members: nz(self.gossip_fanout),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        SwimConfig::default().to_foca().unwrap();
    }

    #[test]
    fn transmissions_grow_with_log_n() {
        let c = SwimConfig::default();
        assert_eq!(c.transmissions_for(1), 10);
        assert_eq!(c.transmissions_for(98), 10);
        assert_eq!(c.transmissions_for(100), 12);
        assert_eq!(c.transmissions_for(999), 12);
        assert_eq!(c.transmissions_for(1_000), 16);
        assert_eq!(c.transmissions_for(10_000), 20);
        assert_eq!(c.to_foca_for(10_000).unwrap().max_transmissions.get(), 20);
        let off = SwimConfig {
            retransmit_mult: 0,
            ..c
        };
        assert_eq!(off.transmissions_for(10_000), 10);
    }

    #[test]
    fn suspicion_timeout_grows_with_log_n_above_its_floor() {
        let c = SwimConfig::default();
        let ms = |n| c.suspicion_timeout_for(n).as_millis();
        assert_eq!(ms(1), 3_000);
        assert_eq!(ms(100), 3_000, "1.4 x 2 x 1 s is under the floor");
        assert_eq!(ms(1_000), 4_200);
        assert_eq!(ms(10_000), 5_600);
        assert_eq!(
            c.to_foca_for(1_000)
                .unwrap()
                .suspect_to_down_after
                .as_millis(),
            4_200
        );
        let flat = SwimConfig {
            suspicion_mult: 0.0,
            ..c
        };
        assert_eq!(
            flat.suspicion_timeout_for(10_000),
            flat.suspect_to_down_after
        );
    }

    #[test]
    fn rejects_nonsense() {
        let mut c = SwimConfig {
            probe_rtt: Duration::from_secs(5),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "probe_rtt");
        c = SwimConfig {
            max_packet_size: 10,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "max_packet_size");
    }
}
