//! Data-plane metrics: per service and instance.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `service`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    /// Service name.
    pub service: String,
}

/// `service`, `instance` (`node/id`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    /// Service name.
    pub service: String,
    /// `node/id`.
    pub instance: String,
}

/// `service`, `instance`, `class` (`2xx`…`5xx`, `error`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Service name.
    pub service: String,
    /// `node/id`, or `none` when no instance was chosen.
    pub instance: String,
    /// Status class.
    pub class: String,
}

/// `service`, `rule` (its index, or `default`), `arm` (its label).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The destination service the route document is for.
    pub service: String,
    /// Which rule matched.
    pub rule: String,
    /// Which arm of the split was taken.
    pub arm: String,
}

/// `service`, `mirror`, `outcome` (`sent`, `overflow`: too many copies in
/// flight, `body`: the body could not be copied).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    /// The service whose requests are copied.
    pub service: String,
    /// Where the copies go.
    pub mirror: String,
    /// What became of the copy.
    pub outcome: String,
}

/// `service`, `rule` (`rule N` or `default`), `decision` (`allow`, `deny`,
/// `audit`: a denial let through).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// The destination service.
    pub service: String,
    /// What decided.
    pub rule: String,
    /// The decision.
    pub decision: String,
}

/// `service`, `direction` (`request` or `response` body bytes).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// Service name.
    pub service: String,
    /// Which body.
    pub direction: String,
}

/// `service`, `instance`, `outcome` (`opened`, `failed`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// Service name.
    pub service: String,
    /// `node/id`, or `none` when no instance could be reached.
    pub instance: String,
    /// What became of the connection attempt.
    pub outcome: String,
}

/// `service`, `instance`, `direction` (`sent`: client to instance,
/// `received`: instance to client).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpBytesLabels {
    /// Service name.
    pub service: String,
    /// `node/id`.
    pub instance: String,
    /// Which way.
    pub direction: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// The proxy's metric families.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    /// Requests by outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Time to response head.
    pub latency: Family<ServiceLabel, Histogram, fn() -> Histogram>,
    /// Retries.
    pub retries: Family<ServiceLabel, Counter>,
    /// Ejections.
    pub ejections: Family<InstanceLabels, Counter>,
    /// Body bytes.
    pub bytes: Family<BytesLabels, Counter>,
    /// Requests under a route document, by rule and arm.
    pub routed: Family<RouteLabels, Counter>,
    /// Copies of requests for a mirror.
    pub mirrored: Family<MirrorLabels, Counter>,
    /// Authorization decisions at this (destination) agent.
    pub authz: Family<AuthzLabels, Counter>,
    /// Requests in flight through this agent (both sides).
    pub active: Gauge,
    /// TCP connections through upstream listeners, by outcome.
    pub tcp_connections: Family<TcpLabels, Counter>,
    /// TCP connections open through upstream listeners, per instance.
    pub tcp_active: Family<InstanceLabels, Gauge>,
    /// TCP bytes each way, per instance.
    pub tcp_bytes: Family<TcpBytesLabels, Counter>,
    /// Time to reach a TCP instance (until it accepted the connection).
    pub tcp_connect: Family<ServiceLabel, Histogram, fn() -> Histogram>,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
    /// Span export counters.
    pub trace: crate::observe::trace::TraceMetrics,
    /// Handles of the per-request series, found without building labels.
    handles: std::sync::Arc<Handles>,
}

/// Request counters of one service: per instance, per class.
type ByInstance = std::collections::HashMap<String, Vec<(String, Counter)>>;

/// The counters every request touches, by service (and instance), kept
/// so the request path finds them with one lookup by `&str` instead of
/// allocating a label set and hashing it into a family for each. They are
/// the families' own counters, so what they count is what is exported.
/// Series are never removed from these families, so a kept handle never
/// goes stale.
#[derive(Debug, Default)]
struct Handles {
    /// `bytes`: `[request, response]` per service.
    bytes: std::sync::RwLock<std::collections::HashMap<String, [Counter; 2]>>,
    /// `requests`: per service, per instance, per class.
    requests: std::sync::RwLock<std::collections::HashMap<String, ByInstance>>,
}

impl ProxyMetrics {
    /// Creates the families and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            retries: Family::default(),
            ejections: Family::default(),
            bytes: Family::default(),
            routed: Family::default(),
            mirrored: Family::default(),
            authz: Family::default(),
            active: Gauge::default(),
            tcp_connections: Family::default(),
            tcp_active: Family::default(),
            tcp_bytes: Family::default(),
            tcp_connect: Family::new_with_constructor(latency_histogram),
            access_log_dropped: Counter::default(),
            trace: crate::observe::trace::TraceMetrics::register(registry),
            handles: std::sync::Arc::default(),
        };
        registry.register(
            "gossamer_proxy_requests",
            "Proxied requests by service, instance and status class",
            m.requests.clone(),
        );
        registry.register(
            "gossamer_proxy_request_duration_seconds",
            "Time from request to response head",
            m.latency.clone(),
        );
        registry.register("gossamer_proxy_retries", "Retries", m.retries.clone());
        registry.register(
            "gossamer_proxy_ejections",
            "Outlier ejections",
            m.ejections.clone(),
        );
        registry.register(
            "gossamer_route_requests",
            "Requests under a route document, by rule and arm",
            m.routed.clone(),
        );
        registry.register(
            "gossamer_route_mirrored",
            "Copies of requests for a route's mirror, by outcome",
            m.mirrored.clone(),
        );
        registry.register(
            "gossamer_authz_decisions",
            "Authorization decisions for requests to local instances, by service, rule and decision",
            m.authz.clone(),
        );
        registry.register(
            "gossamer_proxy_body_bytes",
            "Request and response body bytes",
            m.bytes.clone(),
        );
        registry.register(
            "gossamer_tcp_connections",
            "TCP connections through upstream listeners, by service, instance and outcome (opened, failed)",
            m.tcp_connections.clone(),
        );
        registry.register(
            "gossamer_tcp_active_connections",
            "TCP connections open through upstream listeners, by service and instance",
            m.tcp_active.clone(),
        );
        registry.register(
            "gossamer_tcp_bytes",
            "TCP bytes through upstream listeners, by service, instance and direction (sent: client to instance)",
            m.tcp_bytes.clone(),
        );
        registry.register(
            "gossamer_tcp_connect_seconds",
            "Time to reach a TCP instance through the mesh",
            m.tcp_connect.clone(),
        );
        registry.register(
            "gossamer_proxy_active_streams",
            "Requests in flight (outbound and inbound)",
            m.active.clone(),
        );
        registry.register(
            "gossamer_access_log_dropped",
            "Access-log lines dropped because the writer fell behind",
            m.access_log_dropped.clone(),
        );
        m
    }

    /// The byte counter of one service and direction.
    pub fn bytes(&self, service: &str, direction: &str) -> Counter {
        let at = match direction {
            "request" => 0,
            "response" => 1,
            _ => return self.bytes_series(service, direction),
        };
        let cached = self
            .handles
            .bytes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
            .map(|pair| pair[at].clone());
        cached.unwrap_or_else(|| {
            let pair = [
                self.bytes_series(service, "request"),
                self.bytes_series(service, "response"),
            ];
            let counter = pair[at].clone();
            self.handles
                .bytes
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(service.to_owned(), pair);
            counter
        })
    }

    fn bytes_series(&self, service: &str, direction: &str) -> Counter {
        self.bytes
            .get_or_create(&BytesLabels {
                service: service.to_owned(),
                direction: direction.to_owned(),
            })
            .clone()
    }

    /// Counts one request of `service` to `instance` with outcome `class`.
    pub fn count_request(&self, service: &str, instance: &str, class: &str) {
        let found = self
            .handles
            .requests
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
            .and_then(|instances| instances.get(instance))
            .and_then(|classes| classes.iter().find(|(c, _)| c == class))
            .map(|(_, counter)| counter.clone());
        let counter = found.unwrap_or_else(|| {
            let counter = self
                .requests
                .get_or_create(&RequestLabels {
                    service: service.to_owned(),
                    instance: instance.to_owned(),
                    class: class.to_owned(),
                })
                .clone();
            self.handles
                .requests
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .entry(service.to_owned())
                .or_default()
                .entry(instance.to_owned())
                .or_default()
                .push((class.to_owned(), counter.clone()));
            counter
        });
        counter.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_handles_count_into_the_exported_series() {
        let mut registry = Registry::default();
        let m = ProxyMetrics::register(&mut registry);
        for _ in 0..3 {
            m.count_request("web", "n1/web-1", "2xx");
        }
        m.count_request("web", "n1/web-1", "5xx");
        m.count_request("web", "n2/web-2", "2xx");
        m.bytes("web", "request").inc_by(10);
        m.bytes("web", "request").inc_by(5);
        m.bytes("web", "response").inc_by(7);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"gossamer_proxy_requests_total{service="web",instance="n1/web-1",class="2xx"} 3"#,
            r#"gossamer_proxy_requests_total{service="web",instance="n1/web-1",class="5xx"} 1"#,
            r#"gossamer_proxy_requests_total{service="web",instance="n2/web-2",class="2xx"} 1"#,
            r#"direction="request"} 15"#,
            r#"direction="response"} 7"#,
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
