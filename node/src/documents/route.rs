//! The `route` document: traffic policy for one destination service.
//!
//! ```toml
//! [[route]]
//! name = "web"                      # the destination service
//! sticky = "header:x-user-id"       # the key that picks an arm
//! backends = [
//!   { subset = { version = "v1" }, weight = 90 },
//!   { subset = { version = "v2" }, weight = 10 },
//! ]
//!
//! [[route.rule]]                    # rules in order; the first match wins
//! match = { headers = [{ name = "x-canary", exact = "1" }] }
//! backends = [{ subset = { version = "v2" }, weight = 1 }]
//! ```
//!
//! Everything here is checked when a document is applied and wherever it
//! arrives: unknown fields, bad regexes, weights that send nothing, and
//! percentages out of range are refused with the field named.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::proxy::routes::HashPolicy;

/// Longest regex source accepted.
pub const MAX_REGEX_LEN: usize = 1024;
/// Compiled size cap of one regex.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Rules per route document.
pub const MAX_RULES: usize = 256;
/// Backends per rule.
pub const MAX_BACKENDS: usize = 64;
/// Header edits per block.
pub const MAX_HEADER_OPS: usize = 64;

/// A `"5s"`-style duration field of a document body.
pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    gossamer_membership::duration::parse(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// A route document's body.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Where a request's split key comes from (`header:NAME`,
    /// `cookie:NAME`, `query:NAME`, `path`, `source-ip`); the service's own
    /// hash policy when absent.
    #[serde(default)]
    pub sticky: Option<String>,
    /// Arms for requests no rule matches; empty: every instance of the
    /// service, as without a route.
    #[serde(default)]
    pub backends: Vec<Backend>,
    /// Rules, in order.
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
    /// Timeout of requests no rule sets one for.
    #[serde(default, deserialize_with = "duration")]
    pub timeout: Option<Duration>,
    /// Retries of requests no rule sets them for.
    #[serde(default)]
    pub retries: Option<Retries>,
    /// Limits on requests to the service from each agent.
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreaker>,
}

/// One rule.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// What a request must look like; empty matches everything.
    #[serde(default, rename = "match")]
    pub matches: Match,
    /// Where matching requests go; empty: the route's default backends.
    #[serde(default)]
    pub backends: Vec<Backend>,
    /// Whole-request timeout.
    #[serde(default, deserialize_with = "duration")]
    pub timeout: Option<Duration>,
    /// Retries.
    #[serde(default)]
    pub retries: Option<Retries>,
    /// Request path rewrite.
    #[serde(default)]
    pub rewrite: Option<Rewrite>,
    /// Request header edits.
    #[serde(default)]
    pub request_headers: Option<HeaderOps>,
    /// Response header edits.
    #[serde(default)]
    pub response_headers: Option<HeaderOps>,
    /// Injected delays and aborts.
    #[serde(default)]
    pub fault: Option<Fault>,
    /// A copy of some requests to another service.
    #[serde(default)]
    pub mirror: Option<Mirror>,
}

/// Request conditions; all given ones must hold.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// The path.
    #[serde(default)]
    pub path: Option<PathMatch>,
    /// Any of these methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Header conditions.
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    /// Query parameter conditions.
    #[serde(default)]
    pub query: Vec<ValueMatch>,
}

/// A path condition: exactly one of the three.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    /// The whole path.
    #[serde(default)]
    pub exact: Option<String>,
    /// A leading part of the path.
    #[serde(default)]
    pub prefix: Option<String>,
    /// A regex the whole path must match.
    #[serde(default)]
    pub regex: Option<String>,
}

/// A header or query parameter condition: one of `exact`, `prefix`,
/// `regex`, or `present`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    /// Header or parameter name.
    pub name: String,
    /// The whole value.
    #[serde(default)]
    pub exact: Option<String>,
    /// A leading part of the value.
    #[serde(default)]
    pub prefix: Option<String>,
    /// A regex the whole value must match.
    #[serde(default)]
    pub regex: Option<String>,
    /// `true`: present with any value; `false`: absent.
    #[serde(default)]
    pub present: Option<bool>,
}

/// One arm of a split.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// The service; the route's own when absent.
    #[serde(default)]
    pub service: Option<String>,
    /// Which of its instances.
    #[serde(default)]
    pub subset: Option<Subset>,
    /// Share: weight / sum of the rule's weights.
    pub weight: u32,
}

/// Instances with all these tags and this version.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subset {
    /// Tags the instance must carry.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The registration's `version`.
    #[serde(default)]
    pub version: Option<String>,
}

/// Retries of a route.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Attempts in all (1: no retry).
    pub attempts: u32,
    /// What is retried: `5xx`, `gateway-error`, `connect-failure`, `reset`.
    #[serde(default)]
    pub on: Vec<String>,
    /// Timeout of each attempt.
    #[serde(default, deserialize_with = "duration")]
    pub per_try_timeout: Option<Duration>,
}

/// Path rewrite.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Replaces the matched path prefix (needs a `prefix` path match).
    pub path_prefix: String,
}

/// Header edits.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    /// Replace (or add) these.
    #[serde(default)]
    pub set: std::collections::BTreeMap<String, String>,
    /// Add these, keeping existing values.
    #[serde(default)]
    pub add: std::collections::BTreeMap<String, String>,
    /// Remove these.
    #[serde(default)]
    pub remove: Vec<String>,
}

impl HeaderOps {
    /// Checks names and values; returns the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        let count = self.set.len() + self.add.len() + self.remove.len();
        if count > MAX_HEADER_OPS {
            return Err(format!("{count} header edits, at most {MAX_HEADER_OPS}"));
        }
        for h in self
            .set
            .keys()
            .chain(self.add.keys())
            .chain(self.remove.iter())
        {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(format!("{h:?} is not a header name"));
            }
        }
        for v in self.set.values().chain(self.add.values()) {
            if http::HeaderValue::from_str(v).is_err() {
                return Err(format!("{v:?} is not a header value"));
            }
        }
        Ok(())
    }
}

/// Fault injection.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Delay some requests.
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    /// Answer some requests at once with a status.
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

/// An injected delay.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    /// How long.
    #[serde(deserialize_with = "duration")]
    pub fixed: Option<Duration>,
    /// Share of requests, 0–100.
    pub percent: f64,
}

/// An injected abort.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    /// The status answered.
    pub status: u16,
    /// Share of requests, 0–100.
    pub percent: f64,
}

/// Mirroring.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// Where copies go.
    pub service: String,
    /// Share of requests copied, 0–100.
    pub percent: f64,
}

/// Per-service limits, per agent.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Requests in flight.
    #[serde(default)]
    pub max_requests: Option<u32>,
    /// Requests waiting for a connection.
    #[serde(default)]
    pub max_pending: Option<u32>,
    /// Upstream connections.
    #[serde(default)]
    pub max_connections: Option<u32>,
}

const RETRY_ON: &[&str] = &["5xx", "gateway-error", "connect-failure", "reset"];

/// Compiles a match regex with the size caps every node applies.
pub fn compile_regex(field: &str, source: &str) -> Result<regex::Regex, String> {
    if source.len() > MAX_REGEX_LEN {
        return Err(format!(
            "{field}: regex is {} bytes, over the {MAX_REGEX_LEN}-byte limit",
            source.len()
        ));
    }
    regex::RegexBuilder::new(&format!("^(?:{source})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("{field}: bad regex: {e}"))
}

fn percent(field: &str, p: f64) -> Result<(), String> {
    if !(0.0..=100.0).contains(&p) {
        return Err(format!("{field}: {p} is not a percentage (0-100)"));
    }
    Ok(())
}

fn backends(field: &str, list: &[Backend]) -> Result<(), String> {
    if list.len() > MAX_BACKENDS {
        return Err(format!("{field}: more than {MAX_BACKENDS} backends"));
    }
    if !list.is_empty() && list.iter().all(|b| b.weight == 0) {
        return Err(format!(
            "{field}: every weight is 0, so nothing would be sent"
        ));
    }
    for (i, b) in list.iter().enumerate() {
        if let Some(s) = &b.service {
            gossamer_membership::catalog::validate_service_name(s)
                .map_err(|e| format!("{field}[{i}].service: {e}"))?;
        }
    }
    Ok(())
}

fn retries(field: &str, r: &Retries) -> Result<(), String> {
    if r.attempts == 0 || r.attempts > 10 {
        return Err(format!("{field}.attempts: must be 1-10"));
    }
    if r.per_try_timeout == Some(Duration::ZERO) {
        return Err(format!("{field}.per_try_timeout: must be more than 0"));
    }
    for on in &r.on {
        if !RETRY_ON.contains(&on.as_str()) {
            return Err(format!(
                "{field}.on: {on:?} is not one of {}",
                RETRY_ON.join(", ")
            ));
        }
    }
    Ok(())
}

/// Checks header (`headers`) or query conditions; errors name the field.
pub(crate) fn value_matches(field: &str, list: &[ValueMatch], headers: bool) -> Result<(), String> {
    for (i, m) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if headers && http::HeaderName::from_bytes(m.name.as_bytes()).is_err() {
            return Err(format!("{f}.name: {:?} is not a header name", m.name));
        }
        let given = [
            m.exact.is_some(),
            m.prefix.is_some(),
            m.regex.is_some(),
            m.present.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(format!(
                "{f}: give exactly one of exact, prefix, regex, present"
            ));
        }
        if let Some(r) = &m.regex {
            compile_regex(&format!("{f}.regex"), r)?;
        }
    }
    Ok(())
}

impl RouteSpec {
    /// Checks what serde cannot. Errors name the field.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(cb) = &self.circuit_breaker {
            for (name, v) in [
                ("max_requests", cb.max_requests),
                ("max_connections", cb.max_connections),
            ] {
                if v == Some(0) {
                    return Err(format!("circuit_breaker.{name}: must be at least 1"));
                }
            }
            if cb.max_pending.is_some() && cb.max_connections.is_none() {
                return Err(
                    "circuit_breaker.max_pending: requests wait for a connection, so it needs max_connections".into(),
                );
            }
        }
        if let Some(s) = &self.sticky {
            HashPolicy::parse(s).map_err(|e| format!("sticky: {}", e.problem))?;
        }
        backends("backends", &self.backends)?;
        if let Some(r) = &self.retries {
            retries("retries", r)?;
        }
        if self.rules.len() > MAX_RULES {
            return Err(format!("rule: more than {MAX_RULES} rules"));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let f = format!("rule[{i}]");
            let m = &rule.matches;
            if let Some(p) = &m.path {
                let given = [p.exact.is_some(), p.prefix.is_some(), p.regex.is_some()];
                if given.iter().filter(|g| **g).count() != 1 {
                    return Err(format!(
                        "{f}.match.path: give exactly one of exact, prefix, regex"
                    ));
                }
                if let Some(r) = &p.regex {
                    compile_regex(&format!("{f}.match.path.regex"), r)?;
                }
            }
            for (j, method) in m.methods.iter().enumerate() {
                http::Method::from_bytes(method.as_bytes())
                    .map_err(|_| format!("{f}.match.methods[{j}]: {method:?} is not a method"))?;
            }
            value_matches(&format!("{f}.match.headers"), &m.headers, true)?;
            value_matches(&format!("{f}.match.query"), &m.query, false)?;
            backends(&format!("{f}.backends"), &rule.backends)?;
            if let Some(r) = &rule.retries {
                retries(&format!("{f}.retries"), r)?;
            }
            if rule.rewrite.is_some() && m.path.as_ref().and_then(|p| p.prefix.as_ref()).is_none() {
                return Err(format!(
                    "{f}.rewrite: a path_prefix rewrite needs a match.path.prefix"
                ));
            }
            for (name, ops) in [
                ("request_headers", &rule.request_headers),
                ("response_headers", &rule.response_headers),
            ] {
                if let Some(ops) = ops {
                    ops.validate().map_err(|e| format!("{f}.{name}: {e}"))?;
                }
            }
            if let Some(fault) = &rule.fault {
                if let Some(d) = &fault.delay {
                    percent(&format!("{f}.fault.delay.percent"), d.percent)?;
                    if d.fixed.is_none() {
                        return Err(format!("{f}.fault.delay.fixed: required"));
                    }
                }
                if let Some(a) = &fault.abort {
                    percent(&format!("{f}.fault.abort.percent"), a.percent)?;
                    if !(200..=599).contains(&a.status) {
                        return Err(format!(
                            "{f}.fault.abort.status: {} is not 200-599",
                            a.status
                        ));
                    }
                }
            }
            if let Some(mirror) = &rule.mirror {
                percent(&format!("{f}.mirror.percent"), mirror.percent)?;
                gossamer_membership::catalog::validate_service_name(&mirror.service)
                    .map_err(|e| format!("{f}.mirror.service: {e}"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<RouteSpec, String> {
        let v: toml::Value = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        let spec: RouteSpec = v.try_into().map_err(|e: toml::de::Error| e.to_string())?;
        spec.validate()?;
        Ok(spec)
    }

    #[test]
    fn a_canary_route_parses() {
        let spec = parse(
            r#"
            sticky = "header:x-user-id"
            backends = [
              { subset = { version = "v1" }, weight = 90 },
              { subset = { version = "v2" }, weight = 10 },
            ]
            [[rule]]
            match = { headers = [{ name = "x-canary", exact = "1" }] }
            backends = [{ subset = { version = "v2" }, weight = 1 }]
            timeout = "2s"
            [[rule]]
            match = { path = { prefix = "/api" } }
            rewrite = { path_prefix = "/v2/api" }
            fault = { abort = { status = 503, percent = 10 } }
            "#,
        )
        .unwrap();
        assert_eq!(spec.rules.len(), 2);
        assert_eq!(spec.rules[0].timeout, Some(Duration::from_secs(2)));
    }

    #[test]
    fn mistakes_name_the_field() {
        let cases = [
            ("weigth = 3", "unknown field `weigth`"),
            ("backends = [{ weight = 0 }]", "backends: every weight is 0"),
            ("sticky = \"header\"", "sticky:"),
            (
                "[[rule]]\nmatch = { path = { regex = \"(\" } }",
                "rule[0].match.path.regex: bad regex",
            ),
            (
                "[[rule]]\nmatch = { headers = [{ name = \"x\", exact = \"1\", present = true }] }",
                "rule[0].match.headers[0]: give exactly one",
            ),
            (
                "[[rule]]\nfault = { abort = { status = 503, percent = 110 } }",
                "rule[0].fault.abort.percent",
            ),
            (
                "[[rule]]\nretries = { attempts = 0 }",
                "rule[0].retries.attempts: must be 1-10",
            ),
            (
                "retries = { attempts = 2, on = [\"4xx\"] }",
                "retries.on: \"4xx\" is not one of",
            ),
            (
                "retries = { attempts = 2, per_try_timeout = \"0s\" }",
                "retries.per_try_timeout: must be more than 0",
            ),
            (
                "[[rule]]\nmirror = { service = \"Shadow!\", percent = 5 }",
                "rule[0].mirror.service",
            ),
            (
                "[[rule]]\nmirror = { service = \"shadow\", percent = -1 }",
                "rule[0].mirror.percent",
            ),
            (
                "circuit_breaker = { max_pending = 5 }",
                "circuit_breaker.max_pending: requests wait for a connection",
            ),
            (
                "circuit_breaker = { max_connections = 0 }",
                "circuit_breaker.max_connections: must be at least 1",
            ),
            (
                "[[rule]]\nrewrite = { path_prefix = \"/x\" }",
                "rule[0].rewrite",
            ),
            ("timeout = \"soon\"", "soon"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e:?} lacks {want:?}");
        }
        let long = format!(
            "[[rule]]\nmatch = {{ path = {{ regex = \"{}\" }} }}",
            "a".repeat(2000)
        );
        assert!(
            parse(&long)
                .unwrap_err()
                .contains("over the 1024-byte limit")
        );
    }
}
