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
    /// How long a member stays suspect before it is declared down.
    #[serde(with = "crate::duration")]
    pub suspect_to_down_after: Duration,
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
            suspect_to_down_after: Duration::from_secs(4),
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

    /// The equivalent foca configuration for a cluster of `nodes` (see
    /// [`SwimConfig::transmissions_for`]).
    pub fn to_foca_for(&self, nodes: usize) -> Result<foca::Config, InvalidSwimConfig> {
        let mut config = self.to_foca()?;
        config.max_transmissions =
            NonZeroU8::new(self.transmissions_for(nodes)).expect("validated");
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
