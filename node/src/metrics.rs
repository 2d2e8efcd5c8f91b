//! Prometheus metrics, rendered at scrape time from the live counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use gossamer_membership::MemberState;
use gossamer_transport::{Stats, Transport};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::agent::swim::Snapshot;

/// Counters owned by the agent (the transport keeps its own).
#[derive(Debug, Default)]
pub struct Counters {
    decode_errors: AtomicU64,
    identity_mismatches: AtomicU64,
}

impl Counters {
    /// A datagram failed to decode.
    pub fn decode_error(&self) {
        self.decode_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A datagram claimed another sender than its connection's certificate.
    pub fn identity_mismatch(&self) {
        self.identity_mismatches.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything `/metrics` reports.
#[derive(Debug)]
struct AgentCollector {
    transport: Transport,
    counters: Arc<Counters>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: &[(&[(&'static str, &'static str)], u64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        if labels.is_empty() {
            // An unlabeled series: `name_total 5`, not `name_total{} 5`.
            return ConstCounter::new(*value).encode(metric);
        }
        let labels: Vec<(&str, &str)> = labels.to_vec();
        ConstCounter::new(*value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snapshot = self.snapshot.borrow().clone();
        {
            let mut members = encoder.encode_descriptor(
                "gossamer_members",
                "Members this agent knows, itself included, by state",
                None,
                MetricType::Gauge,
            )?;
            for state in [
                MemberState::Alive,
                MemberState::Suspect,
                MemberState::Down,
                MemberState::Left,
            ] {
                let labels = vec![("state", state.as_str())];
                ConstGauge::new(snapshot.count(state) as i64)
                    .encode(members.encode_family(&labels)?)?;
            }
        }
        let s = self.transport.stats();
        let get = Stats::get;
        counter(
            &mut encoder,
            "gossamer_swim_datagrams",
            "SWIM datagrams sent and received",
            &[
                (&[("direction", "in")], get(&s.datagrams_in)),
                (&[("direction", "out")], get(&s.datagrams_out)),
            ],
        )?;
        counter(
            &mut encoder,
            "gossamer_swim_bytes",
            "SWIM datagram bytes sent and received",
            &[
                (&[("direction", "in")], get(&s.bytes_in)),
                (&[("direction", "out")], get(&s.bytes_out)),
            ],
        )?;
        let (udp_in, udp_out) = self.transport.udp_bytes();
        counter(
            &mut encoder,
            "gossamer_transport_udp_bytes",
            "UDP bytes on the wire for all node-to-node traffic (QUIC overhead included)",
            &[
                (&[("direction", "in")], udp_in),
                (&[("direction", "out")], udp_out),
            ],
        )?;
        counter(
            &mut encoder,
            "gossamer_swim_decode_errors",
            "Datagrams dropped because they did not decode",
            &[(&[], self.counters.decode_errors.load(Ordering::Relaxed))],
        )?;
        counter(
            &mut encoder,
            "gossamer_swim_identity_mismatches",
            "Datagrams whose SWIM sender differs from the certificate of their connection",
            &[(
                &[],
                self.counters.identity_mismatches.load(Ordering::Relaxed),
            )],
        )?;
        counter(
            &mut encoder,
            "gossamer_transport_handshake_failures",
            "QUIC/TLS handshakes that failed (unknown CA, bad certificate, timeout)",
            &[(&[], get(&s.handshake_failures))],
        )?;
        counter(
            &mut encoder,
            "gossamer_transport_identity_rejections",
            "Connections closed after the handshake: other trust domain or wrong node name",
            &[(&[], get(&s.identity_rejections))],
        )?;
        counter(
            &mut encoder,
            "gossamer_transport_dropped",
            "Datagrams or streams dropped, by reason",
            &[
                (&[("reason", "inbound_queue_full")], get(&s.inbound_dropped)),
                (
                    &[("reason", "outbound_undeliverable")],
                    get(&s.outbound_dropped),
                ),
                (&[("reason", "fault_injection")], get(&s.fault_drops)),
            ],
        )?;
        let mut info = encoder.encode_descriptor(
            "gossamer_agent",
            "Agent identity",
            None,
            MetricType::Gauge,
        )?;
        let generation = snapshot.local.generation.to_string();
        let labels = vec![
            ("name", snapshot.local.name.as_str()),
            ("version", env!("CARGO_PKG_VERSION")),
            ("generation", generation.as_str()),
        ];
        ConstGauge::new(1i64).encode(info.encode_family(&labels)?)?;
        Ok(())
    }
}

/// The metrics registry of one agent.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// Builds the registry.
    pub fn new(
        transport: Transport,
        counters: Arc<Counters>,
        snapshot: watch::Receiver<Arc<Snapshot>>,
    ) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(AgentCollector {
            transport,
            counters,
            snapshot,
        }));
        Self { registry }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
