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

use crate::catalog::Shared;
use crate::catalog::view::{self, Effective};
use crate::members::Snapshot;

/// Counters owned by the agent (the transport keeps its own).
#[derive(Debug, Default)]
pub struct Counters {
    /// New certificate files that did not load (kept the old ones).
    pub cert_reload_failures: AtomicU64,
    decode_errors: AtomicU64,
    identity_mismatches: AtomicU64,
    member_syncs_ok: AtomicU64,
    member_syncs_err: AtomicU64,
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

    /// A push-pull member sync this node started finished.
    pub fn member_sync(&self, ok: bool) {
        let counter = if ok {
            &self.member_syncs_ok
        } else {
            &self.member_syncs_err
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything `/metrics` reports.
#[derive(Debug)]
struct AgentCollector {
    catalog: Arc<Shared>,
    documents: Arc<crate::documents::Documents>,
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
        {
            let docs = &self.documents;
            ConstGauge::new(docs.stamps().len() as i64).encode(encoder.encode_descriptor(
                "gossamer_config_documents",
                "Configuration documents held (tombstones included)",
                None,
                MetricType::Gauge,
            )?)?;
            counter(
                &mut encoder,
                "gossamer_config_applied",
                "Configuration documents applied (from the API or a peer)",
                &[(
                    &[],
                    docs.counters
                        .applied
                        .load(std::sync::atomic::Ordering::Relaxed),
                )],
            )?;
            counter(
                &mut encoder,
                "gossamer_config_conflicts",
                "Two documents with the same version met here (the higher digest won)",
                &[(
                    &[],
                    docs.counters
                        .conflicts
                        .load(std::sync::atomic::Ordering::Relaxed),
                )],
            )?;
            let refused = docs.counters.refused();
            let mut metric = encoder.encode_descriptor(
                "gossamer_config_refused",
                "Configuration documents refused, by reason",
                None,
                MetricType::Counter,
            )?;
            for (reason, n) in refused {
                ConstCounter::new(n).encode(metric.encode_family(&[("reason", reason)])?)?;
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
        let udp = self.transport.udp_totals();
        counter(
            &mut encoder,
            "gossamer_transport_udp_bytes",
            "UDP bytes on the wire for all node-to-node traffic (QUIC overhead included)",
            &[
                (&[("direction", "in")], udp.bytes_in),
                (&[("direction", "out")], udp.bytes_out),
            ],
        )?;
        counter(
            &mut encoder,
            "gossamer_transport_udp_datagrams",
            "UDP datagrams on the wire for all node-to-node traffic",
            &[
                (&[("direction", "in")], udp.datagrams_in),
                (&[("direction", "out")], udp.datagrams_out),
            ],
        )?;
        counter(
            &mut encoder,
            "gossamer_member_syncs",
            "Push-pull member list exchanges this node started, by result",
            &[
                (
                    &[("result", "ok")],
                    self.counters.member_syncs_ok.load(Ordering::Relaxed),
                ),
                (
                    &[("result", "error")],
                    self.counters.member_syncs_err.load(Ordering::Relaxed),
                ),
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
            "gossamer_transport_handshakes",
            "QUIC/TLS handshakes completed, by who dialed",
            &[
                (&[("side", "out")], get(&s.handshakes_out)),
                (&[("side", "in")], get(&s.handshakes_in)),
            ],
        )?;
        counter(
            &mut encoder,
            "gossamer_transport_resumed_handshakes",
            "Inbound handshakes that resumed an earlier TLS session",
            &[(&[], s.resumed.load(Ordering::Relaxed))],
        )?;
        counter(
            &mut encoder,
            "gossamer_transport_idle_closed",
            "Connections the cache closed as idle or over its cap",
            &[(&[], get(&s.idle_closed))],
        )?;
        counter(
            &mut encoder,
            "gossamer_transport_keep_alives",
            "Keep-alives sent on connections carrying a quiet stream",
            &[(&[], get(&s.keep_alives))],
        )?;
        counter(
            &mut encoder,
            "gossamer_cert_reloads",
            "Certificate rotations: new files put in use, or refused (the old certificate stays)",
            &[
                (&[("outcome", "ok")], get(&s.cert_reloads)),
                (
                    &[("outcome", "failed")],
                    self.counters.cert_reload_failures.load(Ordering::Relaxed),
                ),
            ],
        )?;
        counter(
            &mut encoder,
            "gossamer_revocation_cutoffs",
            "Connections closed because the peer's certificate was revoked",
            &[(&[], get(&s.revocation_cutoffs))],
        )?;
        let revocations = self.transport.revocations();
        for (name, help, value) in [
            (
                "gossamer_revoked_certificates",
                "Serial numbers on the mesh CA's revocation list in force",
                revocations.len(),
            ),
            (
                "gossamer_revoked_peers",
                "Peers refused because the certificate they presented is revoked",
                revocations.peers().len(),
            ),
        ] {
            ConstGauge::new(value as i64).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        ConstGauge::new(self.transport.connections() as i64).encode(encoder.encode_descriptor(
            "gossamer_transport_connections",
            "Open QUIC connections to peers",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(self.transport.udp_receive_buffer() as i64).encode(
            encoder.encode_descriptor(
                "gossamer_transport_udp_receive_buffer_bytes",
                "The UDP socket's receive buffer as the kernel reports it (capped by net.core.rmem_max)",
                None,
                MetricType::Gauge,
            )?,
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
        self.encode_catalog(&mut encoder, &snapshot)?;
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

impl AgentCollector {
    fn encode_catalog(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
        snapshot: &Snapshot,
    ) -> Result<(), std::fmt::Error> {
        let catalog = self.catalog.catalog.borrow().clone();
        let local_version = self.catalog.local.borrow().version;
        let services = view::services(&catalog, snapshot);
        let mut counts = [0i64; 3];
        for instance in services.values().flatten() {
            counts[instance.health as usize] += 1;
        }
        {
            let mut g = encoder.encode_descriptor(
                "gossamer_catalog_instances",
                "Service instances in the catalog by effective health",
                None,
                MetricType::Gauge,
            )?;
            for (health, n) in [
                (Effective::Passing, counts[0]),
                (Effective::Critical, counts[1]),
                (Effective::Unavailable, counts[2]),
            ] {
                let label = match health {
                    Effective::Passing => "passing",
                    Effective::Critical => "critical",
                    Effective::Unavailable => "unavailable",
                };
                ConstGauge::new(n).encode(g.encode_family(&vec![("health", label)])?)?;
            }
        }
        for (name, help, value) in [
            (
                "gossamer_catalog_nodes",
                "Nodes with an entry in the catalog",
                catalog.len() as i64,
            ),
            (
                "gossamer_catalog_services",
                "Distinct service names in the catalog",
                services.len() as i64,
            ),
            (
                "gossamer_catalog_local_version",
                "Version of this node's own catalog entry",
                local_version as i64,
            ),
        ] {
            let g = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(g)?;
        }
        let c = &self.catalog.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            encoder,
            "gossamer_catalog_syncs",
            "Catalog syncs this node started, by kind and result",
            &[
                (&[("kind", "fetch"), ("result", "ok")], get(&c.fetch_ok)),
                (&[("kind", "fetch"), ("result", "error")], get(&c.fetch_err)),
                (&[("kind", "digest"), ("result", "ok")], get(&c.digest_ok)),
                (
                    &[("kind", "digest"), ("result", "error")],
                    get(&c.digest_err),
                ),
            ],
        )?;
        {
            let m = encoder.encode_descriptor(
                "gossamer_catalog_sync_seconds",
                "Time spent in catalog syncs this node started",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(get(&c.sync_micros) as f64 / 1e6).encode(m)?;
        }
        counter(
            encoder,
            "gossamer_catalog_sync_bytes",
            "Catalog sync stream bytes",
            &[
                (&[("direction", "in")], get(&c.bytes_in)),
                (&[("direction", "out")], get(&c.bytes_out)),
            ],
        )?;
        counter(
            encoder,
            "gossamer_gossip_broadcast_bytes",
            "Bytes of new broadcast items (catalog and leave notices) received by gossip",
            &[(&[], snapshot.broadcast_bytes)],
        )?;
        counter(
            encoder,
            "gossamer_swim_held_down_notices",
            "\"You are down\" messages not sent because the suspect refuted in time",
            &[(&[], snapshot.held_down_notices)],
        )?;
        for (name, help, value) in [
            (
                "gossamer_swim_health_score",
                "Local health score (0 healthy, up to swim.max_health_score): failed probes and refuted suspicions raise it and stretch this node's probing",
                f64::from(snapshot.health_score),
            ),
            (
                "gossamer_swim_suspicion_timeout_seconds",
                "How long a suspect has to refute before it is declared down, at the current cluster size",
                snapshot.suspicion_timeout_ms as f64 / 1e3,
            ),
            (
                "gossamer_cert_expiry_seconds",
                "Seconds until this node's certificate expires (negative: expired)",
                {
                    let end = self.transport.cert_not_after();
                    let now = std::time::SystemTime::now();
                    match end.duration_since(now) {
                        Ok(left) => left.as_secs_f64(),
                        Err(past) => -past.duration().as_secs_f64(),
                    }
                },
            ),
        ] {
            let g = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(g)?;
        }
        let h = snapshot.health;
        counter(
            encoder,
            "gossamer_swim_probes",
            "Probes this node ran, by result (late: answered during the late-ack grace)",
            &[
                (&[("result", "ok")], h.probes_ok),
                (&[("result", "failed")], h.probes_failed),
                (&[("result", "late")], h.late_acks),
            ],
        )?;
        counter(
            encoder,
            "gossamer_swim_refuted_suspicions",
            "Suspicions of this node that it refuted",
            &[(&[], h.refuted)],
        )?;
        counter(
            encoder,
            "gossamer_catalog_refused_instances",
            "Instances left out of fetched catalog entries because the owner's certificate does not name their service",
            &[(&[], get(&c.refused_instances))],
        )?;
        counter(
            encoder,
            "gossamer_health_checks",
            "Health checks run on local services, by result",
            &[
                (&[("result", "pass")], get(&c.checks_pass)),
                (&[("result", "fail")], get(&c.checks_fail)),
            ],
        )
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
        catalog: Arc<Shared>,
        documents: Arc<crate::documents::Documents>,
    ) -> (
        Self,
        crate::proxy::metrics::ProxyMetrics,
        crate::listener::ListenerMetrics,
        crate::gateway::serve::GatewayMetrics,
    ) {
        let mut registry = Registry::default();
        let proxy = crate::proxy::metrics::ProxyMetrics::register(&mut registry);
        let listeners = crate::listener::ListenerMetrics::register(&mut registry);
        let gateway = crate::gateway::serve::GatewayMetrics::register(&mut registry);
        registry.register_collector(Box::new(AgentCollector {
            catalog,
            documents,
            transport,
            counters,
            snapshot,
        }));
        (Self { registry }, proxy, listeners, gateway)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
