//! The routes of every `ingress` document in force, compiled into one
//! table: the longest host match wins (an exact host over `*.suffix`, a
//! longer suffix over a shorter one, `*` last), then the longest path
//! prefix. Paths are normalised before matching ([`normalize`]), so
//! `/public/../admin` is matched as `/admin`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method};

use super::limit::Buckets;
use crate::documents::Documents;
use crate::documents::ingress::{Cors, IngressRoute, IngressSpec};
use crate::proxy::policy::{HeaderEdits, RetryPolicy};

/// One compiled route.
#[derive(Debug)]
pub struct Route {
    /// `ingress NAME route[i]`, for logs, metrics and errors.
    pub label: String,
    /// How it matched a host: its rank (bigger wins).
    hosts: Vec<HostPattern>,
    /// Normalised prefix, without a trailing `/` (empty for `/`).
    prefix: String,
    /// Remove the prefix before sending on.
    pub strip_prefix: bool,
    /// Destination service.
    pub service: String,
    /// The service as the forwarded request's Host (`None` if it cannot
    /// be one).
    pub service_host: Option<HeaderValue>,
    /// Request timeout.
    pub timeout: Option<Duration>,
    /// Retries.
    pub retries: Option<RetryPolicy>,
    /// Request header edits.
    pub request_headers: Option<HeaderEdits>,
    /// Response header edits.
    pub response_headers: Option<HeaderEdits>,
    /// Rate limits, with their state on this gateway.
    pub limits: Option<Buckets>,
    /// CORS.
    pub cors: Option<CompiledCors>,
    /// Answers by status class, for metrics (filled on first use).
    pub counters: std::sync::OnceLock<[prometheus_client::metrics::counter::Counter; 5]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    /// `.example.com` for `*.example.com`.
    Suffix(String),
    Exact(String),
}

impl HostPattern {
    fn of(text: &str) -> Self {
        if text == "*" {
            Self::Any
        } else if let Some(rest) = text.strip_prefix('*') {
            Self::Suffix(rest.to_owned())
        } else {
            Self::Exact(text.to_owned())
        }
    }

    /// How well `host` matches: `None` if not at all; longer is better and
    /// an exact match beats any suffix.
    fn rank(&self, host: &str) -> Option<usize> {
        match self {
            Self::Any => Some(0),
            Self::Suffix(s) => {
                (host.len() > s.len() && host.ends_with(s.as_str())).then_some(s.len())
            }
            Self::Exact(h) => (h == host).then_some(usize::MAX),
        }
    }
}

/// Allowed origins and what to answer them.
#[derive(Debug)]
pub struct CompiledCors {
    any_origin: bool,
    origins: Vec<String>,
    /// `Access-Control-Allow-Methods`.
    pub methods: HeaderValue,
    allowed_methods: Vec<Method>,
    /// `Access-Control-Allow-Headers` (absent: echo what was asked).
    pub headers: Option<HeaderValue>,
    /// `Access-Control-Expose-Headers`.
    pub expose: Option<HeaderValue>,
    /// `Access-Control-Allow-Credentials: true`.
    pub credentials: bool,
    /// `Access-Control-Max-Age`.
    pub max_age: Option<HeaderValue>,
}

impl CompiledCors {
    fn of(c: &Cors) -> Result<Self, String> {
        let methods: Vec<String> = if c.methods.is_empty() {
            vec!["GET".into(), "HEAD".into(), "POST".into()]
        } else {
            c.methods.iter().map(|m| m.to_ascii_uppercase()).collect()
        };
        let join = |v: &[String]| HeaderValue::from_str(&v.join(", ")).map_err(|e| e.to_string());
        Ok(Self {
            any_origin: c.origins.iter().any(|o| o == "*"),
            origins: c.origins.iter().map(|o| o.to_ascii_lowercase()).collect(),
            allowed_methods: methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect(),
            methods: join(&methods)?,
            headers: (!c.headers.is_empty())
                .then(|| join(&c.headers))
                .transpose()?,
            expose: (!c.expose_headers.is_empty())
                .then(|| join(&c.expose_headers))
                .transpose()?,
            credentials: c.credentials,
            max_age: c.max_age.map(|d| HeaderValue::from(d.as_secs())),
        })
    }

    /// Whether `origin` may call.
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.any_origin || self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }

    /// Whether a preflight may announce `method`.
    pub fn allows_method(&self, method: &str) -> bool {
        self.allowed_methods.iter().any(|m| m.as_str() == method)
    }

    /// `Access-Control-Allow-Origin` for an allowed origin: `*` when any
    /// origin may call without credentials, else the origin itself.
    pub fn allow_origin_value(&self, origin: &HeaderValue) -> HeaderValue {
        if self.any_origin && !self.credentials {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        }
    }
}

/// Every ingress route in force.
#[derive(Debug, Default)]
pub struct Table {
    routes: Vec<Arc<Route>>,
}

impl Table {
    /// Compiles the `ingress` documents in force. A document that no
    /// longer compiles (it passed the same checks when it arrived) is
    /// skipped with a warning. Routes whose state (rate limits) is the same
    /// as in `previous` keep it, so applying a document does not refill
    /// every bucket.
    pub fn build(documents: &Documents, previous: &Self) -> Self {
        let mut routes = Vec::new();
        for held in documents.all() {
            let env = &held.envelope;
            if env.kind != "ingress" || env.deleted {
                continue;
            }
            let compiled = serde_json::from_str::<IngressSpec>(&env.body)
                .map_err(|e| e.to_string())
                .and_then(|spec| {
                    spec.validate()?;
                    spec.routes
                        .iter()
                        .enumerate()
                        .map(|(i, r)| {
                            Route::compile(&format!("ingress {} route[{i}]", env.name), r)
                        })
                        .collect::<Result<Vec<_>, _>>()
                });
            match compiled {
                Ok(list) => routes.extend(list.into_iter().map(|mut r| {
                    if let (Some(old), Some(new)) = (previous.find_label(&r.label), &r.limits)
                        && let Some(kept) = &old.limits
                        && kept.same_settings(new)
                    {
                        r.limits = Some(kept.clone());
                    }
                    Arc::new(r)
                })),
                Err(e) => tracing::warn!(
                    document = %env.name, version = env.version, error = %e,
                    "ingress document not applied"
                ),
            }
        }
        Self { routes }
    }

    fn find_label(&self, label: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.label == label)
    }

    /// The route for a (lower-case, port-less) host and a normalised path.
    pub fn find(&self, host: &str, path: &str) -> Option<&Arc<Route>> {
        let mut best: Option<((usize, usize), &Arc<Route>)> = None;
        for r in &self.routes {
            let Some(host_rank) = r.hosts.iter().filter_map(|h| h.rank(host)).max() else {
                continue;
            };
            if !prefix_matches(&r.prefix, path) {
                continue;
            }
            let rank = (host_rank, r.prefix.len());
            // Ties go to the first route (documents in name order).
            if best.is_none_or(|(b, _)| rank > b) {
                best = Some((rank, r));
            }
        }
        best.map(|(_, r)| r)
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether there is no route.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

impl Route {
    fn compile(label: &str, r: &IngressRoute) -> Result<Self, String> {
        let prefix = r
            .path
            .as_deref()
            .unwrap_or("/")
            .trim_end_matches('/')
            .to_owned();
        Ok(Self {
            label: label.to_owned(),
            hosts: r.hosts.iter().map(|h| HostPattern::of(h)).collect(),
            prefix,
            strip_prefix: r.strip_prefix,
            service: r.service.clone(),
            service_host: HeaderValue::from_str(&r.service).ok(),
            timeout: r.timeout,
            retries: r.retries.map(|n| RetryPolicy {
                attempts: n + 1,
                on_5xx: false,
                on_gateway_error: true,
                on_connect_failure: true,
                on_reset: true,
                per_try_timeout: None,
            }),
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
            limits: r.rate_limit.as_ref().map(Buckets::new),
            cors: r.cors.as_ref().map(CompiledCors::of).transpose()?,
            counters: std::sync::OnceLock::new(),
        })
    }

    /// The path the service sees: without the prefix if it is stripped
    /// (never empty).
    pub fn forward_path<'a>(&self, path: &'a str) -> &'a str {
        if !self.strip_prefix || self.prefix.is_empty() {
            return path;
        }
        let rest = &path[self.prefix.len().min(path.len())..];
        if rest.is_empty() { "/" } else { rest }
    }
}

/// Whether `prefix` (no trailing `/`) covers `path` on whole segments.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix.is_empty()
        || path.starts_with(prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
}

/// Bytes a normalised path segment keeps as they are (RFC 3986 `pchar`
/// without escapes); the rest are percent-escaped.
fn unescaped(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b)
}

/// Why a path cannot be normalised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    /// `..` above the root.
    #[error("the path climbs above the root")]
    AboveRoot,
    /// A `%` not followed by two hex digits.
    #[error("a bad percent escape")]
    BadEscape,
    /// An escaped `/`, `\`, or a NUL or control byte: whatever the service
    /// would make of it, it could differ from what was matched.
    #[error("an escaped slash, backslash or control character")]
    Ambiguous,
}

/// The path as routes see it: percent escapes of unreserved bytes decoded,
/// `//` collapsed, `.` and `..` segments resolved; the result is
/// re-escaped where a URI needs it. An escaped `/`, a backslash or a
/// control character is refused rather than guessed at.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, BadPath> {
    let raw = path.as_bytes();
    // Most paths need nothing done: no escapes, no empty, `.` or `..`
    // segments, nothing to refuse.
    let plain = raw.first() == Some(&b'/')
        && !raw.windows(2).any(|w| w == b"//" || w == b"/.")
        && raw.iter().all(|&b| b == b'/' || unescaped(b));
    if plain {
        return Ok(Cow::Borrowed(path));
    }
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            let (Some(h), Some(l)) = (
                raw.get(i + 1).and_then(|&c| hex(c)),
                raw.get(i + 2).and_then(|&c| hex(c)),
            ) else {
                return Err(BadPath::BadEscape);
            };
            let v = (h * 16 + l) as u8;
            if v == b'/' || v == b'\\' || v < 0x20 || v == 0x7f {
                return Err(BadPath::Ambiguous);
            }
            decoded.push(v);
            i += 3;
        } else {
            if b == b'\\' || b < 0x20 || b == 0x7f {
                return Err(BadPath::Ambiguous);
            }
            decoded.push(b);
            i += 1;
        }
    }
    let mut segments: Vec<&[u8]> = Vec::new();
    let trailing = decoded.ends_with(b"/") || decoded.ends_with(b"/.") || decoded.ends_with(b"/..");
    for seg in decoded.split(|&b| b == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => {
                if segments.pop().is_none() {
                    return Err(BadPath::AboveRoot);
                }
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len() + 1);
    for seg in &segments {
        out.push('/');
        for &b in *seg {
            if unescaped(b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    if out.is_empty() || trailing && !segments.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_resolves_tricks() {
        let ok = |p: &str| normalize(p).unwrap().into_owned();
        assert_eq!(ok("/"), "/");
        assert_eq!(ok(""), "/");
        assert_eq!(ok("/a/b"), "/a/b");
        assert_eq!(ok("/a/b/"), "/a/b/");
        assert_eq!(ok("//a///b"), "/a/b");
        assert_eq!(ok("/public/../admin"), "/admin");
        assert_eq!(ok("/public/./x/."), "/public/x/");
        assert_eq!(ok("/%70ublic/%2e%2e/admin"), "/admin");
        assert_eq!(ok("/a%20b"), "/a%20b");
        assert_eq!(ok("/caf%C3%A9"), "/caf%C3%A9");
        assert_eq!(ok("/.well-known/x"), "/.well-known/x");
        assert_eq!(ok("/a/b.c;v=1"), "/a/b.c;v=1");
        assert_eq!(ok("/a{b}"), "/a%7Bb%7D");
        assert_eq!(normalize("/.."), Err(BadPath::AboveRoot));
        assert_eq!(normalize("/a/../../b"), Err(BadPath::AboveRoot));
        assert_eq!(normalize("/a%2fb"), Err(BadPath::Ambiguous));
        assert_eq!(normalize("/a%5Cb"), Err(BadPath::Ambiguous));
        assert_eq!(normalize("/a\\b"), Err(BadPath::Ambiguous));
        assert_eq!(normalize("/a%00"), Err(BadPath::Ambiguous));
        assert_eq!(normalize("/a%zz"), Err(BadPath::BadEscape));
        assert_eq!(normalize("/a%4"), Err(BadPath::BadEscape));
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("", "/anything"));
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(!prefix_matches("/api", "/ap"));
    }

    fn table(routes: &[(&[&str], &str, &str)]) -> Table {
        Table {
            routes: routes
                .iter()
                .enumerate()
                .map(|(i, (hosts, path, service))| {
                    let spec = IngressRoute {
                        hosts: hosts.iter().map(|h| h.to_string()).collect(),
                        path: Some(path.to_string()),
                        service: service.to_string(),
                        strip_prefix: true,
                        ..Default::default()
                    };
                    Arc::new(Route::compile(&format!("r{i}"), &spec).unwrap())
                })
                .collect(),
        }
    }

    #[test]
    fn host_then_path_precedence() {
        let t = table(&[
            (&["*"], "/", "fallback"),
            (&["*.example.com"], "/", "wild"),
            (&["*.shop.example.com"], "/", "wilder"),
            (&["shop.example.com"], "/", "shop"),
            (&["shop.example.com"], "/api", "shop-api"),
            (&["*"], "/api/v2", "any-v2"),
        ]);
        let svc = |h: &str, p: &str| t.find(h, p).map(|r| r.service.as_str());
        assert_eq!(svc("shop.example.com", "/"), Some("shop"));
        assert_eq!(svc("shop.example.com", "/api/x"), Some("shop-api"));
        assert_eq!(svc("shop.example.com", "/apix"), Some("shop"));
        // The host decides before the path does.
        assert_eq!(svc("shop.example.com", "/api/v2/x"), Some("shop-api"));
        assert_eq!(svc("a.shop.example.com", "/"), Some("wilder"));
        assert_eq!(svc("www.example.com", "/"), Some("wild"));
        assert_eq!(
            svc("example.com", "/"),
            Some("fallback"),
            "*.x does not match x"
        );
        assert_eq!(svc("other.org", "/api/v2/y"), Some("any-v2"));
        assert_eq!(svc("other.org", "/"), Some("fallback"));
        let none = table(&[(&["a.example.com"], "/x", "a")]);
        assert!(none.find("a.example.com", "/y").is_none());
        assert!(none.find("b.example.com", "/x").is_none());
    }

    #[test]
    fn strip_prefix_keeps_a_path() {
        let t = table(&[(&["*"], "/api", "a"), (&["*"], "/", "b")]);
        let r = t.find("h", "/api/cart").unwrap();
        assert_eq!(r.forward_path("/api/cart"), "/cart");
        assert_eq!(r.forward_path("/api"), "/");
        let r = t.find("h", "/x").unwrap();
        assert_eq!(r.forward_path("/x"), "/x");
    }
}
