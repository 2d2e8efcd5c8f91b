//! The outbound listener: local applications send plain HTTP/1.1 or h2c
//! here; the target service comes from the Host header (`web`, `web.mesh`)
//! or an absolute-form URI (so `HTTP_PROXY` works). This is the glue
//! between the listener and `Proxy::dispatch`: name the service, cut
//! loops, set the forwarding headers, and hash the request's key.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::request::Parts;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tracing::warn;

use super::Proxy;
use super::body::{ProxyBody, Replayable, holding};
use super::dispatch::Overrides;
use super::error::{ERROR_HEADER, grpc_error, is_grpc, local_response};
use super::hop::{HOPS_HEADER, MAX_HOPS};
use super::metrics::MirrorLabels;
use super::policy::{MirrorSpec, choose_arm, draw};
use super::routes::HashPolicy;
use super::upgrade::is_upgrade;
use crate::balance::rendezvous::hash_key;
use crate::listener::{self, Limits, ListenerMetrics};
use crate::observe::access::{self, Logged};
use gossamer_membership::catalog::validate_service_name;
use std::time::Instant;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Set on a mirror's copy of a request: the service it was copied from.
pub const MIRROR_HEADER: HeaderName = HeaderName::from_static("x-gossamer-mirrored-from");

/// Serves local applications until `tasks` drain.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: Limits,
    metrics: ListenerMetrics,
    tasks: crate::tasks::Tasks,
) {
    let handler = listener::handler(move |req, peer| handle(proxy.clone(), req, peer));
    listener::serve(listener, "proxy", limits, metrics, tasks, handler).await;
}

/// Why a request names no service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Neither an absolute URI nor a Host header.
    #[error("no target service: set the Host header (web or web.mesh) or use an absolute URI")]
    Missing,
    /// More than one Host header: which one a server would use is anyone's guess.
    #[error("more than one Host header")]
    DuplicateHost,
    /// The host is not a service name; only its start is echoed.
    #[error("{0:?} is not a service name (web or web.mesh)")]
    NotAName(String),
}

/// The service a request is for: the absolute-form URI's (or HTTP/2
/// `:authority`'s) host, else the Host header; a `.mesh` suffix and any
/// port are ignored.
pub fn target_service<B>(req: &Request<B>) -> Result<String, TargetError> {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(TargetError::DuplicateHost);
    }
    let host = match req.uri().host() {
        Some(h) => h,
        None => {
            let h = header
                .ok_or(TargetError::Missing)?
                .to_str()
                .map_err(|_| TargetError::NotAName("(not ASCII)".into()))?;
            h.rsplit_once(':').map_or(h, |(host, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    host
                } else {
                    h
                }
            })
        }
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let name = host.strip_suffix(".mesh").unwrap_or(&host);
    if name.is_empty() {
        return Err(TargetError::Missing);
    }
    if validate_service_name(name).is_err() {
        let shown: String = name.chars().take(64).collect();
        return Err(TargetError::NotAName(shown));
    }
    Ok(name.to_owned())
}

/// The bytes the hash policy picks from a request; the client IP when the
/// policy's value is absent.
pub fn hash_input<'a>(parts: &'a Parts, policy: &HashPolicy, peer: SocketAddr) -> HashInput<'a> {
    let found: Option<&[u8]> = match policy {
        HashPolicy::Header(name) => parts.headers.get(name).map(HeaderValue::as_bytes),
        HashPolicy::Cookie(name) => parts
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_bytes()),
        HashPolicy::Query(name) => parts.uri.query().and_then(|q| {
            q.split('&')
                .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_bytes())
        }),
        HashPolicy::Path => Some(parts.uri.path().as_bytes()),
        HashPolicy::SourceIp => None,
    };
    match found {
        Some(bytes) => HashInput::Picked(bytes),
        // The text of the address (as before), without `fmt`: this runs
        // for every request under the default policy.
        None => HashInput::Ip(access::IpText::new(peer.ip())),
    }
}

/// What [`hash_input`] picked, without a copy: bytes of the request, or
/// the client IP's text.
#[derive(Debug)]
pub enum HashInput<'a> {
    /// Bytes of the request (a header, a cookie, a query parameter, the
    /// path).
    Picked(&'a [u8]),
    /// The client IP as text.
    Ip(access::IpText),
}

impl std::ops::Deref for HashInput<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Picked(bytes) => bytes,
            Self::Ip(text) => text,
        }
    }
}

/// A request to an upstream listener of `service`: whatever its Host
/// header or URI says, it goes to `service`.
pub async fn handle_for(
    proxy: Arc<Proxy>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    service: String,
) -> Response<Logged> {
    if let Some(path) = req.uri().path_and_query().cloned() {
        *req.uri_mut() = path.into();
    }
    req.headers_mut().remove(http::header::HOST);
    if let Ok(v) = HeaderValue::from_str(&service) {
        req.headers_mut().insert(http::header::HOST, v);
    }
    let entry = Entry {
        listener: Some("upstream"),
        ..Entry::default()
    };
    handle_entry(proxy, req, peer, &entry).await
}

async fn handle(proxy: Arc<Proxy>, req: Request<Incoming>, peer: SocketAddr) -> Response<Logged> {
    handle_entry(proxy, req, peer, &Entry::default()).await
}

/// What the way in (the outbound listener, a gateway route) sets for a
/// request beyond what the service's route document says.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// Timeout and retries that win over the route document's.
    pub overrides: Overrides,
    /// Cap on the request body (413 past it).
    pub body_limit: Option<u64>,
    /// The listener, for access logs; `None`: the caller logs the request.
    pub listener: Option<&'static str>,
}

impl Default for Entry {
    fn default() -> Self {
        Self {
            overrides: Overrides::default(),
            body_limit: None,
            listener: Some("proxy"),
        }
    }
}

/// The request path for a request whose Host names its service. The body
/// logs the request when it ends, if the entry has a listener and the
/// access log, tap or tracer wants it.
pub async fn handle_entry(
    proxy: Arc<Proxy>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    entry: &Entry,
) -> Response<Logged> {
    let started = Instant::now();
    let service = target_service(&req);
    // The gateway (no listener here) logs and traces its requests itself.
    let (trace, span) = match (entry.listener, proxy.tracer()) {
        (Some(_), Some(tracer)) => {
            let (id, span) =
                tracer.enter_trace(req.headers_mut(), crate::observe::trace::Kind::Client);
            (Some(id), span)
        }
        _ => (None, None),
    };
    let logged = entry.listener.and_then(|listener| {
        let sinks = access::Sinks::for_request(&proxy, span.is_some())?;
        let mut record = access::begin(&req, peer, listener, proxy.node_text(), trace);
        record.span = span;
        if sinks.tap.is_some() {
            record.headers = Some(req.headers().clone());
        }
        Some((record, sinks))
    });
    let (response, service) = match service {
        Err(e) => (local_response(StatusCode::BAD_REQUEST, e.to_string()), None),
        Ok(service) => {
            let response = if is_grpc(req.headers()) {
                grpc_error(route_request(&proxy, req, peer, entry, &service).await)
            } else {
                route_request(&proxy, req, peer, entry, &service).await
            };
            count_signals(&proxy, &service, &response, started);
            (response, Some(service))
        }
    };
    match logged {
        Some((mut record, log)) => {
            // Moved in, not copied: the request path is done with it.
            record.service = service.map(access::Text::from);
            access::finish_logged(record, response, started, &log)
        }
        None => response.map(Logged::plain),
    }
}

/// Adds the request to the golden signals of its service (and route arm).
fn count_signals(proxy: &Proxy, service: &str, response: &Response<ProxyBody>, started: Instant) {
    use crate::observe::stats::Direction;
    let unknown = response
        .extensions()
        .get::<super::error::LocalError>()
        .is_some_and(|e| e.0.starts_with("unknown service"));
    if unknown {
        return;
    }
    let now = Instant::now();
    let latency = now.saturating_duration_since(started);
    let failed = response.status().is_server_error();
    let stats = proxy.stats();
    stats.record(Direction::Outbound, service, latency, failed, now);
    if let Some(choice) = response.extensions().get::<access::RouteChoice>() {
        stats.record_route(service, &choice.rule, &choice.arm, latency, failed, now);
    }
}

/// What the caller's sidecar adds to a request before it leaves: `Host`
/// from the URI's authority (so the instance sees the name it was called
/// by, from an absolute URI or HTTP/2's `:authority` too, whatever
/// protocol it speaks), the hop count one higher, and the caller's address
/// appended to `X-Forwarded-For`.
pub fn forward_headers(parts: &mut Parts, hops: u32, peer: SocketAddr) {
    if let Some(authority) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(http::header::HOST, v);
    }
    parts.headers.insert(HOPS_HEADER, hop_value(hops + 1));
    if let Some(v) = ip_value(peer.ip()) {
        parts.headers.append(X_FORWARDED_FOR, v);
    }
}

/// The caller's address as a header value. A sidecar's callers are nearly
/// always the same local address, so each thread keeps the last one and
/// hands out clones of it instead of building it again.
fn ip_value(ip: std::net::IpAddr) -> Option<HeaderValue> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(std::net::IpAddr, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| {
        if let Some((kept, value)) = last.as_ref()
            && *kept == ip
        {
            return Some(value.clone());
        }
        let value = HeaderValue::from_bytes(&access::IpText::new(ip)).ok()?;
        *last = Some((ip, value.clone()));
        Some(value)
    })
}

/// The hop count's header value; the counts a request can reach are
/// static, not allocated for each request.
fn hop_value(hops: u32) -> HeaderValue {
    const VALUES: [&str; MAX_HOPS as usize + 1] = ["0", "1", "2", "3", "4", "5", "6", "7", "8"];
    match VALUES.get(hops as usize) {
        Some(v) => HeaderValue::from_static(v),
        None => HeaderValue::from(hops),
    }
}

async fn route_request(
    proxy: &Arc<Proxy>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    entry: &Entry,
    service: &str,
) -> Response<ProxyBody> {
    let proxy = proxy.clone();
    let service = service.to_owned();
    let hops = req
        .headers()
        .get(HOPS_HEADER)
        .and_then(|v| v.to_str().ok()?.parse::<u32>().ok())
        .unwrap_or(0);
    if hops >= MAX_HOPS {
        warn!(%service, hops, "request loop cut: it passed through the mesh {hops} times");
        return local_response(
            StatusCode::LOOP_DETECTED,
            format!(
                "request loop: this request passed through the mesh {hops} times; check that {service:?} does not call itself through its own proxy"
            ),
        );
    }
    let routes = proxy.routes();
    let Some(route) = routes.services.get(&service).cloned() else {
        proxy.count(&service, "none", "5xx");
        return local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unknown service {service:?}"),
        );
    };
    if super::tcp::speaks_tcp(&route) {
        proxy.count(&service, "none", "5xx");
        return local_response(
            StatusCode::BAD_GATEWAY,
            format!(
                "service {service:?} speaks tcp, not HTTP: reach it through an upstream listener ([[upstream]] service = \"{service}\" in the agent config, or PUT /v1/agent/upstreams/{service})"
            ),
        );
    }
    let on_upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    forward_headers(&mut parts, hops, peer);
    let Some(policy) = routes.policies.get(&service).cloned() else {
        let hash = hash_key(&hash_input(&parts, &route.policy, peer));
        return proxy
            .dispatch(
                &route,
                hash,
                parts,
                Replayable::new(body).limited(entry.body_limit),
                on_upgrade,
                entry.overrides,
            )
            .await;
    };
    // A route document is in force: its first matching rule, then an arm
    // of the split by the sticky key.
    let matched = policy.rule_for(&parts);
    let rule = matched.map(|(_, r)| r);
    let rule_label = matched.map_or_else(|| "default".to_owned(), |(i, _)| i.to_string());
    let key = hash_key(&hash_input(
        &parts,
        policy.sticky.as_ref().unwrap_or(&route.policy),
        peer,
    ));
    let arms = policy.arms_for(rule);
    let (target, arm_label) = if arms.is_empty() {
        (route, service.clone())
    } else {
        let Some(i) = choose_arm(arms, key) else {
            return local_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("route {service} rule {rule_label}: no arm with a weight"),
            );
        };
        let arm = &arms[i];
        let target = match &arm.subset {
            None => routes.services.get(&arm.service).cloned(),
            Some(_) => routes.subsets.get(&arm.label).cloned(),
        };
        let Some(target) = target else {
            proxy.count(&arm.service, "none", "5xx");
            return local_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "route {service} rule {rule_label}: no instance of {}",
                    arm.label
                ),
            );
        };
        (target, arm.label.clone())
    };
    proxy.count_route(&service, &rule_label, &arm_label);
    let mut response_edits = None;
    let mut overrides = Overrides {
        timeout: entry.overrides.timeout.or(policy.timeout),
        retries: entry.overrides.retries.or(policy.retries),
    };
    let mut mirror = None;
    if let Some(r) = rule {
        if let Some((status, share)) = r.abort
            && draw() < share
        {
            let why = format!("fault injected by route {service} rule {rule_label}");
            return with_error(local_response(status, why.clone()), &why);
        }
        if let Some((delay, share)) = r.delay
            && draw() < share
        {
            tokio::time::sleep(delay).await;
        }
        r.rewrite(&mut parts);
        if let Some(edits) = &r.request_headers {
            edits.apply(&mut parts.headers);
        }
        response_edits = r.response_headers.clone();
        overrides.timeout = entry.overrides.timeout.or(r.timeout).or(overrides.timeout);
        overrides.retries = entry.overrides.retries.or(r.retries).or(overrides.retries);
        mirror = r.mirror.as_ref().filter(|m| draw() < m.share);
    }
    let overloaded = |why: String| {
        proxy.count(&service, "none", "overflow");
        with_error(
            local_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("overloaded {service}: {why}"),
            ),
            &format!("overloaded {service}"),
        )
    };
    let admitted = match policy.max_requests {
        None => None,
        Some(max) => match proxy.admit(&service, max) {
            Some(a) => Some(a),
            None => return overloaded(format!("{max} requests in flight from this agent")),
        },
    };
    let slot = match policy.max_connections {
        None => None,
        Some(max) => {
            let wait = overrides.timeout.unwrap_or(proxy.config.request_timeout);
            match proxy
                .connection_slot(&service, max, policy.max_pending, wait)
                .await
            {
                Ok(permit) => Some(permit),
                Err(why) => return overloaded(why),
            }
        }
    };
    let body = Replayable::new(body).limited(entry.body_limit);
    // A copy of a request without a body goes at once; one with a body
    // once the main request has sent it all.
    let mut mirror = mirror.map(|m| (m, parts.clone()));
    if body.is_empty()
        && let Some((m, copy)) = mirror.take()
    {
        send_mirror(&proxy, &service, m, copy, body.copy(), key);
    }
    let mut response = proxy
        .dispatch(&target, key, parts, body.clone(), on_upgrade, overrides)
        .await;
    if let Some((m, copy)) = mirror {
        send_mirror(&proxy, &service, m, copy, body.copy(), key);
    }
    if let Some(edits) = response_edits {
        edits.apply(response.headers_mut());
    }
    response.extensions_mut().insert(access::RouteChoice {
        rule: rule_label.into(),
        arm: arm_label.into(),
    });
    // The breaker's counts last until the response has streamed.
    if admitted.is_some() || slot.is_some() {
        response = response.map(|b| holding(b, (admitted, slot)));
    }
    response
}

/// Sets `x-gossamer-error` on a local answer.
fn with_error(mut response: Response<ProxyBody>, why: &str) -> Response<ProxyBody> {
    if let Ok(v) = HeaderValue::from_str(why) {
        response.headers_mut().insert(ERROR_HEADER, v);
    }
    response
}

/// Most mirror copies in flight from one agent; more are dropped (and
/// counted), so a slow mirror cannot pile up work or memory.
const MIRRORS_IN_FLIGHT: usize = 256;

/// Sends a copy of a request to a mirror service in the background; its
/// answer is discarded, and nothing about it reaches the caller.
fn send_mirror(
    proxy: &Arc<Proxy>,
    service: &str,
    mirror: &MirrorSpec,
    mut parts: Parts,
    body: Option<Replayable>,
    key: u64,
) {
    let outcome = |what: &str| {
        proxy
            .metrics
            .mirrored
            .get_or_create(&MirrorLabels {
                service: service.to_owned(),
                mirror: mirror.service.clone(),
                outcome: what.to_owned(),
            })
            .inc();
    };
    let Some(body) = body else {
        return outcome("body");
    };
    let Some(route) = proxy.route(&mirror.service) else {
        return outcome("no-route");
    };
    let taken = proxy
        .mirrors
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MIRRORS_IN_FLIGHT).then_some(n + 1)
        })
        .is_ok();
    if !taken {
        return outcome("overflow");
    }
    outcome("sent");
    if let Ok(v) = HeaderValue::from_str(&mirror.service) {
        parts.headers.insert(http::header::HOST, v);
    }
    if let Ok(v) = HeaderValue::from_str(service) {
        parts.headers.insert(MIRROR_HEADER, v);
    }
    let proxy = proxy.clone();
    tokio::spawn(async move {
        let response = proxy
            .dispatch(&route, key, parts, body, None, Overrides::default())
            .await;
        // Read the answer to its end so the connection can be reused.
        let _ = response.into_body().collect().await;
        proxy.mirrors.fetch_sub(1, Ordering::AcqRel);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hop_count_s_static_value_reads_as_the_count() {
        for n in 0..=MAX_HOPS + 3 {
            assert_eq!(hop_value(n), HeaderValue::from(n), "{n}");
        }
    }

    #[test]
    fn each_caller_s_own_address_is_forwarded_and_hashed() {
        let policy = HashPolicy::SourceIp;
        // The same address twice (the kept value), then others.
        for peer in [
            "127.0.0.1:1",
            "127.0.0.1:2",
            "10.0.0.7:3",
            "[::1]:4",
            "127.0.0.1:5",
        ] {
            let peer: SocketAddr = peer.parse().unwrap();
            let (mut parts, ()) = Request::get("http://web/")
                .header(X_FORWARDED_FOR, "192.0.2.1")
                .body(())
                .unwrap()
                .into_parts();
            forward_headers(&mut parts, 0, peer);
            let forwarded: Vec<_> = parts.headers.get_all(X_FORWARDED_FOR).iter().collect();
            let ip = peer.ip().to_string();
            assert_eq!(forwarded, ["192.0.2.1", ip.as_str()], "{peer}");
            assert_eq!(&*hash_input(&parts, &policy, peer), ip.as_bytes());
        }
        let (parts, ()) = Request::get("http://web/a/b")
            .body(())
            .unwrap()
            .into_parts();
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(&*hash_input(&parts, &HashPolicy::Path, peer), b"/a/b");
        let name = HeaderName::from_static("x-user");
        assert_eq!(
            &*hash_input(&parts, &HashPolicy::Header(name), peer),
            b"127.0.0.1"
        );
    }
}
