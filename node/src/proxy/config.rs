//! `[proxy]` in the config file, parsed into types as the file loads: a
//! bad value stops the agent at start with its key named (exit 64); no
//! request ever meets an unparsed string.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use gossamer_membership::catalog::validate_service_name;
use gossamer_membership::duration;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// `[proxy]` in the config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Outbound listener for local applications; `--proxy` overrides it.
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    /// Time allowed until the response head arrives.
    #[serde(with = "gossamer_membership::duration")]
    pub request_timeout: Duration,
    /// Time allowed to reach an instance (local connect or QUIC stream).
    #[serde(with = "gossamer_membership::duration")]
    pub connect_timeout: Duration,
    /// Most retries of one request.
    pub max_retries: u32,
    /// Retries allowed per request over a 10 s window (0.2 = 20 % extra load).
    pub retry_budget: f64,
    /// Consecutive failures that eject an instance.
    pub eject_after: u32,
    /// First ejection; doubles for each ejection in a row.
    #[serde(with = "gossamer_membership::duration")]
    pub eject_base: Duration,
    /// Longest ejection.
    #[serde(with = "gossamer_membership::duration")]
    pub eject_max: Duration,
    /// Largest share of a service's instances ejected at once.
    pub eject_max_share: f64,
    /// Bounded-load mode: no instance above (1 + ε) × the average in-flight
    /// load; unset = plain consistent hashing.
    pub bounded_load: Option<f64>,
    /// Pooled connections to local instances unused for this long are
    /// closed.
    #[serde(with = "gossamer_membership::duration")]
    pub upstream_idle_timeout: Duration,
    /// On shutdown, time given to requests in flight to finish after the
    /// agent stopped accepting and left the mesh.
    #[serde(with = "gossamer_membership::duration")]
    pub shutdown_grace: Duration,
    /// A TCP connection through an upstream listener with no byte either
    /// way for this long is closed.
    #[serde(with = "gossamer_membership::duration")]
    pub tcp_idle_timeout: Duration,
    /// Per-service overrides, `[proxy.service.NAME]`.
    #[serde(deserialize_with = "service_overrides")]
    pub service: BTreeMap<String, ServiceOverride>,
}

/// Per-service timeouts, `[proxy.service.NAME]`; unset ones fall back to
/// the `[proxy]` values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceOverride {
    /// Overrides `request_timeout`, and bounds a gRPC caller's deadline.
    pub request_timeout: Option<Duration>,
    /// Overrides `connect_timeout`.
    pub connect_timeout: Option<Duration>,
}

/// `[proxy.service.NAME]` as written, before its values are parsed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceOverrideText {
    request_timeout: Option<String>,
    connect_timeout: Option<String>,
}

impl ServiceOverride {
    /// Parses the overrides of `service`; errors read
    /// `proxy.service.NAME.KEY: problem`.
    fn parse(service: &str, text: ServiceOverrideText) -> Result<Self, String> {
        validate_service_name(service).map_err(|e| {
            format!(
                "proxy.service.{service}: not a service name ({})",
                e.problem
            )
        })?;
        let parse = |key: &str, value: Option<String>| {
            value
                .map(|v| duration::parse(&v))
                .transpose()
                .map_err(|e| format!("proxy.service.{service}.{key}: {e}"))
        };
        Ok(Self {
            request_timeout: parse("request_timeout", text.request_timeout)?,
            connect_timeout: parse("connect_timeout", text.connect_timeout)?,
        })
    }
}

fn service_overrides<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, ServiceOverride>, D::Error> {
    BTreeMap::<String, ServiceOverrideText>::deserialize(d)?
        .into_iter()
        .map(|(name, text)| {
            let parsed = ServiceOverride::parse(&name, text).map_err(D::Error::custom)?;
            Ok((name, parsed))
        })
        .collect()
}

fn listen_address<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        D::Error::custom(format!(
            "proxy.listen: {text:?} is not an IP:PORT address (for example 127.0.0.1:7948)"
        ))
    })
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7948)),
            request_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(2),
            max_retries: 2,
            retry_budget: 0.2,
            eject_after: 5,
            eject_base: Duration::from_secs(10),
            eject_max: Duration::from_secs(300),
            eject_max_share: 0.5,
            bounded_load: None,
            upstream_idle_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            tcp_idle_timeout: Duration::from_secs(3600),
            service: BTreeMap::new(),
        }
    }
}

impl ProxyConfig {
    /// Checks values; returns `key: problem`.
    pub fn validate(&self) -> Result<(), String> {
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err("proxy.request_timeout / connect_timeout: must be positive".into());
        }
        if self.upstream_idle_timeout.is_zero() || self.tcp_idle_timeout.is_zero() {
            return Err("proxy.upstream_idle_timeout / tcp_idle_timeout: must be positive".into());
        }
        if !(0.0..=10.0).contains(&self.retry_budget) {
            return Err("proxy.retry_budget: must be between 0 and 10".into());
        }
        if self.eject_after == 0 {
            return Err("proxy.eject_after: must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.eject_max_share) {
            return Err("proxy.eject_max_share: must be between 0 and 1".into());
        }
        if self.bounded_load.is_some_and(|e| !(e > 0.0 && e <= 10.0)) {
            return Err("proxy.bounded_load: ε must be above 0 and at most 10".into());
        }
        for (name, o) in &self.service {
            for (key, value) in [
                ("request_timeout", o.request_timeout),
                ("connect_timeout", o.connect_timeout),
            ] {
                if value.is_some_and(|d| d.is_zero()) {
                    return Err(format!("proxy.service.{name}.{key}: must be positive"));
                }
            }
        }
        Ok(())
    }

    /// The request and connect timeouts of one call. A gRPC caller's
    /// deadline (`grpc-timeout`) replaces the default request timeout, and
    /// a per-service `request_timeout` bounds it.
    pub(super) fn timeouts(&self, service: &str, headers: &http::HeaderMap) -> Timeouts {
        let o = self.service.get(service).copied().unwrap_or_default();
        let (request, callers_deadline) = match (grpc_timeout(headers), o.request_timeout) {
            (Some(deadline), Some(bound)) if bound < deadline => (bound, false),
            (Some(deadline), _) => (deadline, true),
            (None, configured) => (configured.unwrap_or(self.request_timeout), false),
        };
        Timeouts {
            request,
            connect: o.connect_timeout.unwrap_or(self.connect_timeout),
            callers_deadline,
        }
    }
}

/// The time limits of one proxied call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Timeouts {
    /// Until the response head.
    pub request: Duration,
    /// To reach the instance.
    pub connect: Duration,
    /// `request` is the caller's own gRPC deadline: running out of it is
    /// no sign that the instance is unwell.
    pub callers_deadline: bool,
}

/// The caller's deadline from a `grpc-timeout` header: 1 to 8 digits and a
/// unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get(GRPC_TIMEOUT)?.as_bytes();
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
    .filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ProxyConfig, String> {
        #[derive(Deserialize)]
        struct File {
            proxy: ProxyConfig,
        }
        let file: File = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        file.proxy.validate()?;
        Ok(file.proxy)
    }

    #[test]
    fn overrides_are_durations_once_loaded() {
        let c = parse(
            "[proxy]\nlisten = \"127.0.0.1:9000\"\n[proxy.service.web]\nrequest_timeout = \"500ms\"\n[proxy.service.api]\nconnect_timeout = \"1s\"\n",
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(
            c.service["web"],
            ServiceOverride {
                request_timeout: Some(Duration::from_millis(500)),
                connect_timeout: None,
            }
        );
        let none = http::HeaderMap::new();
        let web = c.timeouts("web", &none);
        assert_eq!(web.request, Duration::from_millis(500));
        assert_eq!(web.connect, c.connect_timeout);
        let api = c.timeouts("api", &none);
        assert_eq!(api.request, c.request_timeout);
        assert_eq!(api.connect, Duration::from_secs(1));
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            (
                "[proxy.service.web]\nrequest_timeout = \"fast\"\n",
                "proxy.service.web.request_timeout: ",
            ),
            (
                "[proxy.service.web]\nconnect_timeout = \"2\"\n",
                "proxy.service.web.connect_timeout: ",
            ),
            (
                "[proxy.service.web]\nrequest_timeout = \"0s\"\n",
                "proxy.service.web.request_timeout: must be positive",
            ),
            (
                "[proxy.service.Web_1]\nrequest_timeout = \"1s\"\n",
                "proxy.service.Web_1: not a service name",
            ),
            ("[proxy]\nlisten = \"localhost\"\n", "proxy.listen: "),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.starts_with(key), "{text}: {e}");
        }
        let e = parse("[proxy.service.web]\ntimeout = \"1s\"\n").unwrap_err();
        assert!(e.contains("timeout"), "{e}");
    }

    #[test]
    fn a_service_bound_caps_the_callers_deadline() {
        let mut c = ProxyConfig::default();
        c.service.insert(
            "web".into(),
            ServiceOverride {
                request_timeout: Some(Duration::from_secs(2)),
                connect_timeout: None,
            },
        );
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-timeout", "500m".parse().unwrap());
        let t = c.timeouts("web", &headers);
        assert_eq!(
            (t.request, t.callers_deadline),
            (Duration::from_millis(500), true)
        );
        headers.insert("grpc-timeout", "5S".parse().unwrap());
        let t = c.timeouts("web", &headers);
        assert_eq!(
            (t.request, t.callers_deadline),
            (Duration::from_secs(2), false)
        );
        let t = c.timeouts("other", &headers);
        assert_eq!(
            (t.request, t.callers_deadline),
            (Duration::from_secs(5), true)
        );
        headers.insert("grpc-timeout", "0S".parse().unwrap());
        assert_eq!(grpc_timeout(&headers), None);
    }
}
