//! The `ingress` document: routes from outside the mesh to its services,
//! served by every agent with a gateway listener. Routes of all `ingress`
//! documents form one table.
//!
//! ```toml
//! [[ingress]]
//! name = "public"
//!
//! [[ingress.route]]
//! hosts = ["shop.example.com", "*.example.com"]  # exact, *.suffix or "*"
//! path = "/api"                     # a prefix of whole segments; "/" if absent
//! strip_prefix = true               # /api/cart reaches the service as /cart
//! service = "web"
//! timeout = "5s"
//! retries = 2
//! request_headers = { set = { x-env = "prod" }, remove = ["x-debug"] }
//! rate_limit = { per_client = 50, per_route = 1000 }   # requests per second
//! cors = { origins = ["https://app.example.com"], methods = ["GET", "POST"] }
//! ```
//!
//! Every field is checked where a document is applied and wherever it
//! arrives; mistakes are refused with the field named.

use std::time::Duration;

use serde::Deserialize;

use super::route::duration;

use gossamer_membership::catalog::validate_service_name;

use super::route::HeaderOps;

/// Routes per document.
pub const MAX_ROUTES: usize = 1024;
/// Hosts, headers, origins or methods per route.
pub const MAX_NAMES: usize = 64;
/// Longest host pattern or path prefix.
const MAX_TEXT: usize = 512;
/// Most retries a route may ask for.
pub const MAX_RETRIES: u32 = 10;

/// An `ingress` document's body.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressSpec {
    /// Routes; precedence is by match length, not by order.
    #[serde(default, rename = "route")]
    pub routes: Vec<IngressRoute>,
}

/// One route.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressRoute {
    /// Host patterns: `shop.example.com`, `*.example.com` (any subdomain,
    /// not the bare domain) or `*` (any host).
    pub hosts: Vec<String>,
    /// Path prefix, matched on whole segments (`/api` matches `/api` and
    /// `/api/x`, not `/apix`).
    #[serde(default)]
    pub path: Option<String>,
    /// Remove the prefix before the request goes on.
    #[serde(default)]
    pub strip_prefix: bool,
    /// The mesh service (or `external` name) requests go to.
    pub service: String,
    /// The whole request's timeout (else the service's route document's,
    /// else the agent's).
    #[serde(default, deserialize_with = "duration")]
    pub timeout: Option<Duration>,
    /// Retries of idempotent requests, within the retry budget.
    #[serde(default)]
    pub retries: Option<u32>,
    /// Request header edits.
    #[serde(default)]
    pub request_headers: Option<HeaderOps>,
    /// Response header edits.
    #[serde(default)]
    pub response_headers: Option<HeaderOps>,
    /// Token buckets, local to each gateway.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Cross-origin requests allowed, with preflight answered here.
    #[serde(default)]
    pub cors: Option<Cors>,
}

/// Requests per second; a bucket holds `burst` tokens (the rate if absent).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Per client IP.
    #[serde(default)]
    pub per_client: Option<f64>,
    /// For the whole route on this gateway.
    #[serde(default)]
    pub per_route: Option<f64>,
    /// Bucket size of each (default: one second's worth).
    #[serde(default)]
    pub burst: Option<f64>,
}

/// Cross-origin resource sharing.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cors {
    /// Allowed origins (`https://app.example.com`), or `*`.
    pub origins: Vec<String>,
    /// Allowed methods (default GET, HEAD, POST).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Allowed request headers.
    #[serde(default)]
    pub headers: Vec<String>,
    /// Response headers scripts may read.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Whether cookies and credentials may be sent.
    #[serde(default)]
    pub credentials: bool,
    /// How long browsers may cache a preflight's answer.
    #[serde(default, deserialize_with = "duration")]
    pub max_age: Option<Duration>,
}

impl IngressSpec {
    /// Checks every route; returns `route[i].field: problem`.
    pub fn validate(&self) -> Result<(), String> {
        if self.routes.len() > MAX_ROUTES {
            return Err(format!(
                "route: {} routes, at most {MAX_ROUTES}",
                self.routes.len()
            ));
        }
        for (i, r) in self.routes.iter().enumerate() {
            r.validate().map_err(|e| format!("route[{i}].{e}"))?;
        }
        Ok(())
    }
}

impl IngressRoute {
    fn validate(&self) -> Result<(), String> {
        if self.hosts.is_empty() {
            return Err("hosts: at least one (\"*\" for any host)".into());
        }
        if self.hosts.len() > MAX_NAMES {
            return Err(format!("hosts: at most {MAX_NAMES}"));
        }
        for h in &self.hosts {
            check_host_pattern(h).map_err(|e| format!("hosts: {h:?}: {e}"))?;
        }
        if let Some(p) = &self.path {
            check_prefix(p).map_err(|e| format!("path: {p:?}: {e}"))?;
        }
        validate_service_name(&self.service).map_err(|e| format!("service: {e}"))?;
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err("timeout: must be positive".into());
        }
        if self.retries.is_some_and(|r| r > MAX_RETRIES) {
            return Err(format!("retries: at most {MAX_RETRIES}"));
        }
        for (field, edits) in [
            ("request_headers", &self.request_headers),
            ("response_headers", &self.response_headers),
        ] {
            if let Some(e) = edits {
                e.validate().map_err(|e| format!("{field}: {e}"))?;
            }
        }
        if let Some(l) = &self.rate_limit {
            l.validate().map_err(|e| format!("rate_limit.{e}"))?;
        }
        if let Some(c) = &self.cors {
            c.validate().map_err(|e| format!("cors.{e}"))?;
        }
        Ok(())
    }
}

/// `example.com`, `*.example.com` or `*`, lower case.
fn check_host_pattern(h: &str) -> Result<(), String> {
    if h == "*" {
        return Ok(());
    }
    let name = h.strip_prefix("*.").unwrap_or(h);
    if name.is_empty() || name.len() > MAX_TEXT {
        return Err("empty or too long".into());
    }
    let ok_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !name.split('.').all(ok_label) {
        return Err(
            "not a host name (lower-case labels of letters, digits and '-'; a leading '*.' for subdomains)"
                .into(),
        );
    }
    Ok(())
}

/// `/` or `/a/b` (no trailing slash needed), with no `.`/`..` segments or
/// escapes: prefixes are compared with normalised paths.
fn check_prefix(p: &str) -> Result<(), String> {
    if !p.starts_with('/') || p.len() > MAX_TEXT {
        return Err("must start with '/' (and be at most 512 bytes)".into());
    }
    if p.contains("//") || p.contains('%') || p.contains('?') || p.contains('#') {
        return Err("no '//', '%', '?' or '#': prefixes match the normalised path".into());
    }
    if p.split('/').any(|s| s == "." || s == "..") {
        return Err("no '.' or '..' segments".into());
    }
    if !p.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("printable ASCII only".into());
    }
    Ok(())
}

fn check_header_name(name: &str) -> Result<(), String> {
    http::HeaderName::from_bytes(name.as_bytes())
        .map(drop)
        .map_err(|_| format!("{name:?} is not a header name"))
}

impl RateLimit {
    fn validate(&self) -> Result<(), String> {
        for (field, v) in [
            ("per_client", self.per_client),
            ("per_route", self.per_route),
            ("burst", self.burst),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v > 0.0 && v <= 1e9)
            {
                return Err(format!("{field}: must be a positive number of requests"));
            }
        }
        if self.per_client.is_none() && self.per_route.is_none() {
            return Err("per_client or per_route: set at least one".into());
        }
        Ok(())
    }
}

impl Cors {
    fn validate(&self) -> Result<(), String> {
        if self.origins.is_empty() {
            return Err("origins: at least one (or \"*\")".into());
        }
        for list in [
            &self.origins,
            &self.methods,
            &self.headers,
            &self.expose_headers,
        ] {
            if list.len() > MAX_NAMES {
                return Err(format!("at most {MAX_NAMES} origins, methods or headers"));
            }
        }
        for o in &self.origins {
            let ok = o == "*"
                || (o.starts_with("https://") || o.starts_with("http://"))
                    && !o.ends_with('/')
                    && o.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err(format!(
                    "origins: {o:?} is not an origin (scheme://host[:port], no path) or \"*\""
                ));
            }
        }
        if self.credentials && self.origins.iter().any(|o| o == "*") {
            return Err("credentials: browsers refuse credentials with origin \"*\"".into());
        }
        for m in &self.methods {
            http::Method::from_bytes(m.as_bytes())
                .map_err(|_| format!("methods: {m:?} is not a method"))?;
        }
        for h in self.headers.iter().chain(&self.expose_headers) {
            check_header_name(h).map_err(|e| format!("headers: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<(), String> {
        let spec: IngressSpec = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        spec.validate()
    }

    #[test]
    fn good_routes_pass() {
        parse(
            r#"
            [[route]]
            hosts = ["shop.example.com", "*.example.com", "*"]
            path = "/api"
            strip_prefix = true
            service = "web"
            timeout = "5s"
            retries = 2
            request_headers = { set = { x-env = "prod" }, remove = ["x-debug"] }
            rate_limit = { per_client = 50, per_route = 1000 }
            cors = { origins = ["https://app.example.com"], methods = ["GET"], max_age = "10m" }
            "#,
        )
        .unwrap();
    }

    #[test]
    fn mistakes_name_the_field() {
        let cases = [
            (
                r#"[[route]]
                hosts = []
                service = "web""#,
                "route[0].hosts",
            ),
            (
                r#"[[route]]
                hosts = ["Shop.example.com"]
                service = "web""#,
                "route[0].hosts",
            ),
            (
                r#"[[route]]
                hosts = ["*"]
                path = "/a/../b"
                service = "web""#,
                "route[0].path",
            ),
            (
                r#"[[route]]
                hosts = ["*"]
                path = "api"
                service = "web""#,
                "route[0].path",
            ),
            (
                r#"[[route]]
                hosts = ["*"]
                service = "Web!""#,
                "route[0].service",
            ),
            (
                r#"[[route]]
                hosts = ["*"]
                service = "web"
                rate_limit = { burst = 3 }"#,
                "route[0].rate_limit",
            ),
            (
                r#"[[route]]
                hosts = ["*"]
                service = "web"
                cors = { origins = ["*"], credentials = true }"#,
                "route[0].cors.credentials",
            ),
            (
                r#"[[route]]
                hosts = ["*"]
                service = "web"
                request_headers = { set = { "bad header" = "x" } }"#,
                "route[0].request_headers",
            ),
        ];
        for (text, field) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.starts_with(field), "{field}: {e}");
        }
        let e = parse("[[route]]\nhosts = [\"*\"]\nservice = \"web\"\nwat = 1").unwrap_err();
        assert!(e.contains("wat"), "{e}");
    }
}
