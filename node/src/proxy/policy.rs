//! Traffic policy from `route` documents, compiled for the request path:
//! which rule a request matches, which arm of a split it takes, and what
//! the rule does to it.
//!
//! An arm is chosen by weighted rendezvous hashing of the sticky key: every
//! arm scores the key, `weight / -ln(u)` with `u` a uniform hash of (key,
//! arm), and the highest score wins. Every node computes the same scores,
//! so a key takes the same arm everywhere with no shared state; a key's
//! share of arms is weight / sum of weights; and when weights change, only
//! keys whose winner changes move: raising one arm's weight only takes keys
//! to that arm.

use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::Regex;

use super::routes::HashPolicy;
use crate::documents::route::{self, HeaderOps, RouteSpec, Subset, ValueMatch};

/// One arm of a split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arm {
    /// The service it goes to.
    pub service: String,
    /// Which instances (`None`: all).
    pub subset: Option<SubsetSpec>,
    /// Relative share.
    pub weight: u32,
    /// `service`, or `service/version=v2,tags=a+b`: the arm's name in
    /// metrics and explanations, and what its hash is keyed by.
    pub label: String,
}

/// Instances with these tags and this version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubsetSpec {
    /// Tags the instance must carry.
    pub tags: Vec<String>,
    /// Its `version`, if given.
    pub version: Option<String>,
}

impl SubsetSpec {
    /// Whether an instance with these tags and version belongs.
    pub fn admits(&self, tags: &[String], version: &str) -> bool {
        self.version.as_ref().is_none_or(|v| v == version)
            && self.tags.iter().all(|t| tags.contains(t))
    }
}

/// A header or query condition, compiled.
#[derive(Debug)]
enum TextMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    Present(bool),
}

impl TextMatch {
    /// Compiles a checked condition.
    fn of(m: &ValueMatch) -> Result<Self, String> {
        Ok(if let Some(e) = &m.exact {
            Self::Exact(e.clone())
        } else if let Some(p) = &m.prefix {
            Self::Prefix(p.clone())
        } else if let Some(r) = &m.regex {
            Self::Regex(route::compile_regex("regex", r)?)
        } else {
            Self::Present(m.present.unwrap_or(true))
        })
    }

    /// Whether a value (absent: `None`) meets it.
    fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (Self::Present(want), v) => v.is_some() == *want,
            (_, None) => false,
            (Self::Exact(e), Some(v)) => v == e,
            (Self::Prefix(p), Some(v)) => v.starts_with(p.as_str()),
            (Self::Regex(r), Some(v)) => r.is_match(v),
        }
    }
}

/// Header conditions, compiled: all must hold for a request to match.
#[derive(Debug, Default)]
pub(crate) struct HeaderConditions(Vec<(HeaderName, TextMatch)>);

impl HeaderConditions {
    /// Compiles checked conditions.
    pub(crate) fn of(list: &[ValueMatch]) -> Result<Self, String> {
        list.iter()
            .map(|h| {
                Ok((
                    HeaderName::from_bytes(h.name.as_bytes()).map_err(|e| e.to_string())?,
                    TextMatch::of(h)?,
                ))
            })
            .collect::<Result<_, String>>()
            .map(Self)
    }

    /// Whether `headers` meet every condition (of several values of one
    /// header, any may match).
    pub(crate) fn hold(&self, headers: &HeaderMap) -> bool {
        self.0.iter().all(|(name, m)| {
            let mut values = headers.get_all(name).iter().peekable();
            if values.peek().is_none() {
                return m.matches(None);
            }
            values.any(|v| m.matches(Some(v.to_str().unwrap_or(""))))
        })
    }
}

#[derive(Debug)]
enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    path: Option<PathMatch>,
    methods: Vec<Method>,
    headers: HeaderConditions,
    query: Vec<(String, TextMatch)>,
    /// Arms; empty: the route's defaults.
    pub arms: Vec<Arm>,
    /// Whole-request timeout.
    pub timeout: Option<Duration>,
    /// Replaces the matched path prefix.
    pub rewrite_prefix: Option<(String, String)>,
    /// Request header edits.
    pub request_headers: Option<HeaderEdits>,
    /// Response header edits.
    pub response_headers: Option<HeaderEdits>,
    /// Delay (length, share 0–1).
    pub delay: Option<(Duration, f64)>,
    /// Abort (status, share 0–1).
    pub abort: Option<(http::StatusCode, f64)>,
    /// Retries, replacing the route's.
    pub retries: Option<RetryPolicy>,
    /// Copies of requests go here.
    pub mirror: Option<MirrorSpec>,
}

/// Where a rule copies requests to.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorSpec {
    /// The service that gets the copies.
    pub service: String,
    /// Share of requests copied, 0–1.
    pub share: f64,
}

/// A route's retries, compiled: how many attempts in all, on which
/// outcomes, and each attempt's timeout. Every retry still needs the
/// service's retry budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (1: none retried).
    pub attempts: u32,
    /// Any 5xx answer (and an attempt's timeout).
    pub on_5xx: bool,
    /// 502, 503 and 504 answers (and an attempt's timeout).
    pub on_gateway_error: bool,
    /// No connection to the instance.
    pub on_connect_failure: bool,
    /// The connection or stream broke before an answer.
    pub on_reset: bool,
    /// Timeout of each attempt.
    pub per_try_timeout: Option<Duration>,
}

impl RetryPolicy {
    /// Compiles a checked `retries` block; `on` defaults to
    /// `gateway-error`, `connect-failure` and `reset`.
    pub fn of(r: &route::Retries) -> Self {
        let on = |what: &str| {
            if r.on.is_empty() {
                what != "5xx"
            } else {
                r.on.iter().any(|o| o == what)
            }
        };
        Self {
            attempts: r.attempts,
            on_5xx: on("5xx"),
            on_gateway_error: on("gateway-error"),
            on_connect_failure: on("connect-failure"),
            on_reset: on("reset"),
            per_try_timeout: r.per_try_timeout,
        }
    }

    /// Whether an answer with this status is tried again.
    pub fn retries_status(&self, status: http::StatusCode) -> bool {
        (self.on_5xx && status.is_server_error())
            || (self.on_gateway_error && matches!(status.as_u16(), 502..=504))
    }

    /// Whether an attempt that timed out is tried again.
    pub fn retries_timeout(&self) -> bool {
        self.on_5xx || self.on_gateway_error
    }
}

/// Header edits, parsed.
#[derive(Debug, Clone, Default)]
pub struct HeaderEdits {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderEdits {
    /// Compiles checked edits.
    pub fn of(ops: &HeaderOps) -> Result<Self, String> {
        let pair = |(k, v): (&String, &String)| -> Result<(HeaderName, HeaderValue), String> {
            Ok((
                HeaderName::from_bytes(k.as_bytes()).map_err(|e| e.to_string())?,
                HeaderValue::from_str(v).map_err(|e| e.to_string())?,
            ))
        };
        Ok(Self {
            set: ops.set.iter().map(pair).collect::<Result<_, _>>()?,
            add: ops.add.iter().map(pair).collect::<Result<_, _>>()?,
            remove: ops
                .remove
                .iter()
                .map(|h| HeaderName::from_bytes(h.as_bytes()).map_err(|e| e.to_string()))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Applies the edits.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// A service's compiled route document.
#[derive(Debug)]
pub struct Policy {
    /// The destination service.
    pub service: String,
    /// The document's version.
    pub version: u64,
    /// Where the split key comes from (`None`: the service's hash policy).
    pub sticky: Option<HashPolicy>,
    /// Arms of requests no rule matches (empty: the service, all instances).
    pub arms: Vec<Arm>,
    /// Rules, in order.
    pub rules: Vec<Rule>,
    /// Timeout when the rule sets none.
    pub timeout: Option<Duration>,
    /// Retries when the rule sets none.
    pub retries: Option<RetryPolicy>,
    /// Requests in flight to the service from this agent, at most.
    pub max_requests: Option<u32>,
    /// Requests being sent to the service's instances at once from this
    /// agent (each holds one upstream connection or stream), at most.
    pub max_connections: Option<u32>,
    /// Requests that may wait for one of those, at most.
    pub max_pending: u32,
}

/// `max_pending` when a route sets `max_connections` but not it.
pub const DEFAULT_MAX_PENDING: u32 = 1024;

fn arms(service: &str, list: &[route::Backend]) -> Vec<Arm> {
    list.iter()
        .map(|b| {
            let target = b.service.clone().unwrap_or_else(|| service.to_owned());
            let subset = b.subset.as_ref().map(|s: &Subset| {
                let mut tags = s.tags.clone();
                tags.sort();
                SubsetSpec {
                    tags,
                    version: s.version.clone(),
                }
            });
            let label = match &subset {
                None => target.clone(),
                Some(s) => {
                    let mut parts = Vec::new();
                    if let Some(v) = &s.version {
                        parts.push(format!("version={v}"));
                    }
                    if !s.tags.is_empty() {
                        parts.push(format!("tags={}", s.tags.join("+")));
                    }
                    format!("{target}/{}", parts.join(","))
                }
            };
            Arm {
                service: target,
                subset,
                weight: b.weight,
                label,
            }
        })
        .collect()
}

impl Policy {
    /// Compiles a checked route document.
    pub fn compile(service: &str, version: u64, spec: &RouteSpec) -> Result<Self, String> {
        spec.validate()?;
        let mut rules = Vec::with_capacity(spec.rules.len());
        for r in &spec.rules {
            let m = &r.matches;
            let path = match &m.path {
                None => None,
                Some(p) => Some(if let Some(e) = &p.exact {
                    PathMatch::Exact(e.clone())
                } else if let Some(pre) = &p.prefix {
                    PathMatch::Prefix(pre.clone())
                } else {
                    PathMatch::Regex(route::compile_regex(
                        "path",
                        p.regex.as_deref().unwrap_or_default(),
                    )?)
                }),
            };
            let rewrite_prefix = match (&r.rewrite, &m.path) {
                (Some(rw), Some(p)) => p
                    .prefix
                    .as_ref()
                    .map(|pre| (pre.clone(), rw.path_prefix.clone())),
                _ => None,
            };
            let fault = r.fault.as_ref();
            rules.push(Rule {
                path,
                methods: m
                    .methods
                    .iter()
                    .filter_map(|x| Method::from_bytes(x.as_bytes()).ok())
                    .collect(),
                headers: HeaderConditions::of(&m.headers)?,
                query: m
                    .query
                    .iter()
                    .map(|q| Ok((q.name.clone(), TextMatch::of(q)?)))
                    .collect::<Result<_, String>>()?,
                arms: arms(service, &r.backends),
                timeout: r.timeout,
                rewrite_prefix,
                request_headers: r
                    .request_headers
                    .as_ref()
                    .map(HeaderEdits::of)
                    .transpose()?,
                response_headers: r
                    .response_headers
                    .as_ref()
                    .map(HeaderEdits::of)
                    .transpose()?,
                delay: fault
                    .and_then(|f| f.delay.as_ref())
                    .and_then(|d| Some((d.fixed?, d.percent / 100.0))),
                abort: fault.and_then(|f| f.abort.as_ref()).and_then(|a| {
                    Some((
                        http::StatusCode::from_u16(a.status).ok()?,
                        a.percent / 100.0,
                    ))
                }),
                retries: r.retries.as_ref().map(RetryPolicy::of),
                mirror: r.mirror.as_ref().map(|m| MirrorSpec {
                    service: m.service.clone(),
                    share: m.percent / 100.0,
                }),
            });
        }
        Ok(Self {
            service: service.to_owned(),
            version,
            sticky: spec
                .sticky
                .as_deref()
                .map(HashPolicy::parse)
                .transpose()
                .map_err(|e| e.to_string())?,
            arms: arms(service, &spec.backends),
            rules,
            timeout: spec.timeout,
            retries: spec.retries.as_ref().map(RetryPolicy::of),
            max_requests: spec.circuit_breaker.as_ref().and_then(|c| c.max_requests),
            max_connections: spec
                .circuit_breaker
                .as_ref()
                .and_then(|c| c.max_connections),
            max_pending: spec
                .circuit_breaker
                .as_ref()
                .and_then(|c| c.max_pending)
                .unwrap_or(DEFAULT_MAX_PENDING),
        })
    }

    /// The first rule the request matches, with its index.
    pub fn rule_for(&self, parts: &Parts) -> Option<(usize, &Rule)> {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.matches(parts))
    }

    /// The arms a request with this rule takes (empty: the whole service).
    pub fn arms_for<'a>(&'a self, rule: Option<&'a Rule>) -> &'a [Arm] {
        match rule {
            Some(r) if !r.arms.is_empty() => &r.arms,
            _ => &self.arms,
        }
    }
}

impl Rule {
    fn matches(&self, parts: &Parts) -> bool {
        let path = parts.uri.path();
        let path_ok = match &self.path {
            None => true,
            Some(PathMatch::Exact(e)) => path == e,
            Some(PathMatch::Prefix(p)) => path.starts_with(p.as_str()),
            Some(PathMatch::Regex(r)) => r.is_match(path),
        };
        path_ok
            && (self.methods.is_empty() || self.methods.contains(&parts.method))
            && self.headers.hold(&parts.headers)
            && self.query.iter().all(|(name, m)| {
                let value = parts.uri.query().and_then(|q| {
                    q.split('&')
                        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v)
                });
                m.matches(value)
            })
    }

    /// Rewrites the path prefix, keeping the query.
    pub fn rewrite(&self, parts: &mut Parts) {
        let Some((from, to)) = &self.rewrite_prefix else {
            return;
        };
        let Some(rest) = parts.uri.path().strip_prefix(from.as_str()) else {
            return;
        };
        let mut pq = format!("{to}{rest}");
        if pq.is_empty() || !pq.starts_with('/') {
            pq.insert(0, '/');
        }
        if let Some(q) = parts.uri.query() {
            pq.push('?');
            pq.push_str(q);
        }
        let mut uri = parts.uri.clone().into_parts();
        if let Ok(p) = pq.parse() {
            uri.path_and_query = Some(p);
            if let Ok(u) = http::Uri::from_parts(uri) {
                parts.uri = u;
            }
        }
    }
}

/// The arm a key hash takes: weighted rendezvous over the arms.
pub fn choose_arm(arms: &[Arm], key_hash: u64) -> Option<usize> {
    let mut best: Option<(f64, usize)> = None;
    for (i, arm) in arms.iter().enumerate() {
        if arm.weight == 0 {
            continue;
        }
        let mut input = key_hash.to_le_bytes().to_vec();
        input.extend_from_slice(arm.label.as_bytes());
        let h = crate::balance::rendezvous::hash_key(&input);
        // A uniform draw in (0, 1), never 0 or 1.
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = f64::from(arm.weight) / -u.ln();
        if best.is_none_or(|(s, _)| score > s) {
            best = Some((score, i));
        }
    }
    best.map(|(_, i)| i)
}

/// A deterministic draw in [0, 1) per request, for fault percentages.
pub fn draw() -> f64 {
    rand::random::<f64>()
}

/// Every compiled policy, by service.
pub type Policies = std::collections::HashMap<String, Arc<Policy>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(toml_text: &str) -> Policy {
        let spec: RouteSpec = toml::from_str(toml_text).unwrap();
        Policy::compile("web", 1, &spec).unwrap()
    }

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn splits_follow_weights_and_only_needed_keys_move() {
        let p9010 = policy(
            "backends = [{ subset = { version = \"v1\" }, weight = 90 }, { subset = { version = \"v2\" }, weight = 10 }]",
        );
        let p5050 = policy(
            "backends = [{ subset = { version = \"v1\" }, weight = 50 }, { subset = { version = \"v2\" }, weight = 50 }]",
        );
        let n = 100_000u64;
        let (mut v2, mut moved, mut wrong_way) = (0, 0, 0);
        for k in 0..n {
            let h = crate::balance::rendezvous::hash_key(&k.to_le_bytes());
            let a = choose_arm(&p9010.arms, h).unwrap();
            let b = choose_arm(&p5050.arms, h).unwrap();
            v2 += usize::from(a == 1);
            if a != b {
                moved += 1;
                wrong_way += usize::from(a == 1);
            }
        }
        let share = v2 as f64 / n as f64;
        assert!((share - 0.10).abs() < 0.01, "{share}");
        // 40 % of keys must move from v1 to v2, and none the other way.
        let moved = moved as f64 / n as f64;
        assert!((moved - 0.40).abs() < 0.01, "{moved}");
        assert_eq!(wrong_way, 0);
        assert_eq!(p9010.arms[1].label, "web/version=v2");
    }

    #[test]
    fn rules_match_in_order_and_edit_requests() {
        let p = policy(
            r#"
            [[rule]]
            match = { headers = [{ name = "x-canary", exact = "1" }] }
            backends = [{ subset = { version = "v2" }, weight = 1 }]
            [[rule]]
            match = { path = { prefix = "/api/" }, methods = ["GET"], query = [{ name = "debug", present = true }] }
            rewrite = { path_prefix = "/v2/" }
            request_headers = { set = { x-route = "api" }, remove = ["x-drop"] }
            [[rule]]
            match = { path = { regex = "/item/[0-9]+" } }
            fault = { abort = { status = 503, percent = 100 } }
            "#,
        );
        let canary = parts("GET", "/api/x", &[("x-canary", "1")]);
        assert_eq!(p.rule_for(&canary).unwrap().0, 0);
        let mut api = parts("GET", "/api/x?debug", &[("x-drop", "1")]);
        let (i, rule) = p.rule_for(&api).unwrap();
        assert_eq!(i, 1);
        rule.rewrite(&mut api);
        assert_eq!(api.uri.to_string(), "/v2/x?debug");
        rule.request_headers
            .as_ref()
            .unwrap()
            .apply(&mut api.headers);
        assert_eq!(api.headers["x-route"], "api");
        assert!(api.headers.get("x-drop").is_none());
        assert!(p.rule_for(&parts("POST", "/api/x?debug", &[])).is_none());
        assert!(p.rule_for(&parts("GET", "/api/x", &[])).is_none());
        let (i, r) = p.rule_for(&parts("GET", "/item/42", &[])).unwrap();
        assert_eq!((i, r.abort.map(|a| a.0.as_u16())), (2, Some(503)));
        assert!(
            p.rule_for(&parts("GET", "/item/42x", &[])).is_none(),
            "regexes match the whole path"
        );
    }
}
