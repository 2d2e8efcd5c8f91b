//! Gateway listeners and the edge of the request path: every request is
//! checked (head size, path, route, CORS, rate limits, body size), given
//! the forwarding headers, and then follows the destination's own route
//! policy over the mesh like any other request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info};

use super::config::{IngressConfig, ListenerConfig};
use super::table::{Route, Table, normalize};
use super::tls::Store;
use crate::documents::Documents;
use crate::listener::{Acceptor, Limits, ListenerMetrics};
use crate::observe::access;
use crate::proxy::Proxy;
use crate::proxy::body::{self, ProxyBody};
use crate::proxy::dispatch::Overrides;
use crate::proxy::error::local_response;
use crate::proxy::outbound::{Entry, handle_entry};
use crate::tasks::Tasks;

/// Longest `x-request-id` taken from a client (longer ones are replaced).
const MAX_REQUEST_ID: usize = 128;

/// `outcome` of a certificate reload.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `reloaded` or `failed`.
    pub outcome: &'static str,
}

/// `route`, `class` of a gateway answer.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayLabels {
    /// `ingress NAME route[i]`, or `none`.
    pub route: String,
    /// `2xx` … `5xx`.
    pub class: &'static str,
}

/// `reason` a gateway refused a request itself.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabel {
    /// `no_route`, `bad_path`, `rate_limited`, `headers_too_large`,
    /// `body_too_large`, `cors`, `no_host`.
    pub reason: &'static str,
}

/// The gateway's metrics.
#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    requests: Family<GatewayLabels, Counter>,
    refused: Family<RefusedLabel, Counter>,
    /// Certificate reloads by outcome.
    pub cert_reloads: Family<OutcomeLabel, Counter>,
}

impl GatewayMetrics {
    /// Registers the families.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            refused: Family::default(),
            cert_reloads: Family::default(),
        };
        registry.register(
            "gossamer_gateway_requests",
            "Requests answered by the gateway, by ingress route and status class",
            m.requests.clone(),
        );
        registry.register(
            "gossamer_gateway_refused",
            "Requests the gateway answered itself, by reason",
            m.refused.clone(),
        );
        registry.register(
            "gossamer_gateway_cert_reloads",
            "Reloads of the gateway's public certificates, by outcome",
            m.cert_reloads.clone(),
        );
        m
    }
}

/// What every gateway listener shares.
#[derive(Debug)]
pub struct Gateway {
    proxy: Arc<Proxy>,
    table: watch::Receiver<Arc<Table>>,
    config: IngressConfig,
    metrics: GatewayMetrics,
}

/// How one listener answers.
#[derive(Debug, Clone, Copy)]
struct Side {
    https: bool,
    redirect_https_port: Option<u16>,
}

/// Bound gateway listeners, before they serve.
#[derive(Debug)]
pub struct Bound(Vec<(ListenerConfig, TcpListener)>);

impl Bound {
    /// Binds every listener; an error names the address.
    pub async fn bind(config: &IngressConfig) -> Result<Self, (SocketAddr, std::io::Error)> {
        let mut out = Vec::new();
        for l in &config.listeners {
            let socket = TcpListener::bind(l.listen)
                .await
                .map_err(|e| (l.listen, e))?;
            out.push((l.clone(), socket));
        }
        Ok(Self(out))
    }

    /// The addresses bound (port 0 resolved).
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.0
            .iter()
            .filter_map(|(_, s)| s.local_addr().ok())
            .collect()
    }

    /// Serves every listener until `tasks` drain, with routes from the
    /// `ingress` documents in force.
    pub fn serve(
        self,
        config: IngressConfig,
        proxy: Arc<Proxy>,
        documents: Arc<Documents>,
        metrics: GatewayMetrics,
        listener_metrics: ListenerMetrics,
        tasks: Tasks,
    ) -> Result<(), String> {
        if self.0.is_empty() {
            return Ok(());
        }
        let (tx, table) = watch::channel(Arc::new(Table::build(&documents, &Table::default())));
        tasks.spawn(keep_table(documents, tx, tasks.clone()));
        let limits = Limits {
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            max_connections: config.max_connections,
        };
        let gateway = Arc::new(Gateway {
            proxy,
            table,
            config,
            metrics: metrics.clone(),
        });
        // One acceptor: the connection cap is over all gateway listeners.
        let acceptor = Acceptor::new("gateway", limits, listener_metrics, tasks.clone());
        for (l, socket) in self.0 {
            let side = Side {
                https: !l.tls.is_empty(),
                redirect_https_port: l.redirect_https_port,
            };
            let tls = if l.tls.is_empty() {
                None
            } else {
                let store = Store::load(l.tls.clone())?;
                tasks.spawn(
                    store
                        .clone()
                        .keep_fresh(metrics.cert_reloads.clone(), tasks.clone()),
                );
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                    super::tls::server_config(store)?,
                )))
            };
            info!(
                listen = %l.listen,
                scheme = if side.https { "https" } else { "http" },
                "gateway listening"
            );
            tasks.spawn(accept_loop(
                socket,
                acceptor.clone(),
                tls,
                gateway.clone(),
                side,
                limits.header_read_timeout,
            ));
        }
        Ok(())
    }
}

async fn keep_table(documents: Arc<Documents>, tx: watch::Sender<Arc<Table>>, tasks: Tasks) {
    let mut changes = documents.subscribe();
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = tasks.draining() => return,
        }
        let previous = tx.borrow().clone();
        let table = Table::build(&documents, &previous);
        debug!(routes = table.len(), "ingress routes rebuilt");
        tx.send_replace(Arc::new(table));
    }
}

async fn accept_loop(
    socket: TcpListener,
    mut acceptor: Acceptor,
    tls: Option<tokio_rustls::TlsAcceptor>,
    gateway: Arc<Gateway>,
    side: Side,
    handshake_timeout: Duration,
) {
    let handler = crate::listener::handler(move |req, peer| {
        // The request's future is built inside this one: built outside and
        // moved in, it was held twice (13 KB a request instead of 6.6).
        let gateway = gateway.clone();
        async move {
            handle(gateway, req, peer, side)
                .await
                .map(access::Logged::plain)
        }
    });
    while let Some((stream, peer, slot)) = acceptor.accept(&socket).await {
        let handler = handler.clone();
        match &tls {
            None => acceptor.serve_http(stream, peer, slot, handler),
            Some(tls) => {
                let tls = tls.clone();
                let acceptor = acceptor.clone();
                acceptor.clone().spawn(async move {
                    match tokio::time::timeout(handshake_timeout, tls.accept(stream)).await {
                        Ok(Ok(stream)) => acceptor.serve_http(stream, peer, slot, handler),
                        Ok(Err(e)) => debug!(%peer, error = %e, "gateway TLS handshake failed"),
                        Err(_) => debug!(%peer, "gateway TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

/// The host a request is for: the URI's authority (HTTP/2, absolute
/// form), else the Host header; lower case, without port or final dot.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = match req.uri().host() {
        Some(h) => h.to_owned(),
        None => {
            let h = req.headers().get(header::HOST)?.to_str().ok()?;
            let authority: http::uri::Authority = h.parse().ok()?;
            authority.host().to_owned()
        }
    };
    let host = raw.trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

fn head_bytes<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |p| p.as_str().len())
        + req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>()
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(REQUEST_ID)
        && !v.is_empty()
        && v.len() <= MAX_REQUEST_ID
        && v.as_bytes().iter().all(u8::is_ascii_graphic)
    {
        return v.clone();
    }
    let id: u128 = rand::random();
    let mut hex = [0u8; 32];
    for (i, b) in hex.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[(id >> (124 - 4 * i)) as usize & 15];
    }
    HeaderValue::from_bytes(&hex).expect("hex is a header value")
}

impl Gateway {
    fn refuse(
        &self,
        reason: &'static str,
        status: StatusCode,
        message: String,
    ) -> Response<ProxyBody> {
        self.metrics
            .refused
            .get_or_create(&RefusedLabel { reason })
            .inc();
        local_response(status, message)
    }

    fn count(&self, route: Option<&Route>, status: StatusCode) {
        const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        let class = (usize::from(status.as_u16() / 100)).clamp(1, 5) - 1;
        let family = &self.metrics.requests;
        let counter = |route: &str, class: usize| {
            family
                .get_or_create(&GatewayLabels {
                    route: route.to_owned(),
                    class: CLASSES[class],
                })
                .clone()
        };
        match route {
            // A route's counters are looked up once, not per request.
            Some(r) => r
                .counters
                .get_or_init(|| std::array::from_fn(|c| counter(&r.label, c)))[class]
                .inc(),
            None => counter("none", class).inc(),
        };
    }
}

async fn handle(
    gateway: Arc<Gateway>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    side: Side,
) -> Response<ProxyBody> {
    let id = request_id(req.headers());
    let (trace, span) = match gateway.proxy.tracer() {
        Some(t) => {
            let (id, span) = t.enter_trace(req.headers_mut(), crate::observe::trace::Kind::Server);
            (Some(id), span)
        }
        None => (None, None),
    };
    let logged = access::Sinks::for_request(&gateway.proxy, span.is_some()).map(|sinks| {
        let mut record = access::begin(&req, peer, "gateway", gateway.proxy.node_text(), trace);
        record.request_id = access::Text::header(&id);
        record.span = span;
        if sinks.tap.is_some() {
            record.headers = Some(req.headers().clone());
        }
        (record, Instant::now(), sinks)
    });
    let (matched, mut response) = route(&gateway, req, peer, side, &id).await;
    gateway.count(matched.as_deref(), response.status());
    response.headers_mut().insert(REQUEST_ID, id);
    match logged {
        Some((mut record, started, log)) => {
            if let Some(route) = &matched {
                record.ingress_route = Some(route.label.as_str().into());
                record.service = Some(route.service.as_str().into());
            }
            access::finish(record, response, started, &log)
        }
        None => response,
    }
}

async fn route(
    gateway: &Gateway,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    side: Side,
    id: &HeaderValue,
) -> (Option<Arc<Route>>, Response<ProxyBody>) {
    let none = || None;
    let config = &gateway.config;
    if head_bytes(&req) > config.max_header_bytes {
        let message = format!(
            "request line and headers larger than {} bytes",
            config.max_header_bytes
        );
        return (
            none(),
            gateway.refuse(
                "headers_too_large",
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                message,
            ),
        );
    }
    let Some(host) = request_host(&req) else {
        let message = "no host: send a Host header (or an HTTP/2 :authority)".to_owned();
        return (
            none(),
            gateway.refuse("no_host", StatusCode::BAD_REQUEST, message),
        );
    };
    if let Some(port) = side.redirect_https_port {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let location = if port == 443 {
            format!("https://{host}{path}")
        } else {
            format!("https://{host}:{port}{path}")
        };
        let response = Response::builder()
            .status(StatusCode::PERMANENT_REDIRECT)
            .header(header::LOCATION, location)
            .body(body::empty())
            .expect("valid redirect");
        return (none(), response);
    }
    let path = match normalize(req.uri().path()) {
        Ok(p) => p,
        Err(e) => {
            let message = format!("bad path: {e}");
            return (
                none(),
                gateway.refuse("bad_path", StatusCode::BAD_REQUEST, message),
            );
        }
    };
    let table = gateway.table.borrow().clone();
    let Some(route) = table.find(&host, &path).cloned() else {
        let message = format!("no route for host {host} path {path}");
        return (
            none(),
            gateway.refuse("no_route", StatusCode::NOT_FOUND, message),
        );
    };
    let label = Some(route.clone());
    let origin = req.headers().get(header::ORIGIN).cloned();
    if let (Some(cors), Some(origin)) = (&route.cors, &origin)
        && req.method() == Method::OPTIONS
        && let Some(asked) = req.headers().get(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return (
            label,
            preflight(gateway, cors, origin, asked, req.headers()),
        );
    }
    if let Some(limits) = &route.limits
        && let Err(over) = limits.admit(peer.ip())
    {
        let which = match over {
            super::limit::Over::Client(_) => "for this client",
            super::limit::Over::Route(_) => "for the route on this gateway",
        };
        let mut response = gateway.refuse(
            "rate_limited",
            StatusCode::TOO_MANY_REQUESTS,
            format!("rate limit of {} exceeded {which}", route.label),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(over.retry_after()));
        return (label, response);
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > config.max_body_bytes) {
        let message = format!("request body larger than {} bytes", config.max_body_bytes);
        return (
            label,
            gateway.refuse("body_too_large", StatusCode::PAYLOAD_TOO_LARGE, message),
        );
    }
    let target = forward_target(req.uri(), route.forward_path(&path));
    forward(&mut req, &route, &host, target, side, id);
    let entry = Entry {
        overrides: Overrides {
            timeout: route.timeout,
            retries: route.retries,
        },
        body_limit: Some(config.max_body_bytes),
        // The gateway logs its requests itself, refusals included.
        listener: None,
    };
    let mut response = handle_entry(gateway.proxy.clone(), req, peer, &entry)
        .await
        .map(access::Logged::into_inner);
    if let Some(edits) = &route.response_headers {
        edits.apply(response.headers_mut());
    }
    if let (Some(cors), Some(origin)) = (&route.cors, &origin)
        && origin.to_str().is_ok_and(|o| cors.allows_origin(o))
    {
        let h = response.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            cors.allow_origin_value(origin),
        );
        if cors.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(expose) = &cors.expose {
            h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
    (label, response)
}

/// The forwarded request's URI, when it differs from the client's: the
/// normalised (and maybe stripped) path, with the query, in origin form.
fn forward_target(uri: &http::Uri, path: &str) -> Option<http::Uri> {
    if uri.scheme().is_none() && uri.authority().is_none() && uri.path() == path {
        return None;
    }
    let mut target = path.to_owned();
    if let Some(q) = uri.query() {
        target.push('?');
        target.push_str(q);
    }
    target.parse().ok()
}

/// Rewrites a request for its destination service: the new URI (if
/// any), the service as Host, the forwarding headers, the route's header
/// edits; the mesh's own headers from outside are dropped.
fn forward(
    req: &mut Request<Incoming>,
    route: &Route,
    host: &str,
    target: Option<http::Uri>,
    side: Side,
    id: &HeaderValue,
) {
    if let Some(uri) = target {
        *req.uri_mut() = uri;
    }
    let headers = req.headers_mut();
    crate::proxy::hop::strip_internal(headers);
    if let Some(v) = &route.service_host {
        headers.insert(header::HOST, v.clone());
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if side.https { "https" } else { "http" }),
    );
    if let Ok(v) = HeaderValue::from_str(host) {
        headers.insert(X_FORWARDED_HOST, v);
    }
    headers.insert(REQUEST_ID, id.clone());
    if let Some(edits) = &route.request_headers {
        edits.apply(headers);
    }
}

fn preflight(
    gateway: &Gateway,
    cors: &super::table::CompiledCors,
    origin: &HeaderValue,
    asked: &HeaderValue,
    headers: &HeaderMap,
) -> Response<ProxyBody> {
    let origin_text = origin.to_str().unwrap_or("");
    if !cors.allows_origin(origin_text) {
        return gateway.refuse(
            "cors",
            StatusCode::FORBIDDEN,
            format!("CORS: origin {origin_text:?} is not allowed"),
        );
    }
    let method = asked.to_str().unwrap_or("");
    if !cors.allows_method(method) {
        return gateway.refuse(
            "cors",
            StatusCode::FORBIDDEN,
            format!("CORS: method {method:?} is not allowed"),
        );
    }
    let mut response = Response::builder()
        .status(StatusCode::NO_CONTENT)
        .header(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            cors.allow_origin_value(origin),
        )
        .header(header::ACCESS_CONTROL_ALLOW_METHODS, cors.methods.clone())
        .header(header::VARY, "origin")
        .body(body::full(Bytes::new()))
        .expect("valid preflight answer");
    let h = response.headers_mut();
    if let Some(allowed) = cors
        .headers
        .clone()
        .or_else(|| headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned())
    {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allowed);
    }
    if cors.credentials {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    if let Some(age) = &cors.max_age {
        h.insert(header::ACCESS_CONTROL_MAX_AGE, age.clone());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uri_is_rewritten_only_when_the_path_changes() {
        let uri = |s: &str| s.parse::<http::Uri>().unwrap();
        assert_eq!(forward_target(&uri("/a/b?x=1"), "/a/b"), None);
        assert_eq!(
            forward_target(&uri("/api/cart?x=1"), "/cart"),
            Some(uri("/cart?x=1"))
        );
        assert_eq!(forward_target(&uri("/a//b"), "/a/b"), Some(uri("/a/b")));
        // Absolute form (HTTP/2, or a proxy-style request line) becomes
        // origin form even with the same path.
        assert_eq!(
            forward_target(&uri("https://shop.example/a?q"), "/a"),
            Some(uri("/a?q"))
        );
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_made_otherwise() {
        let mut headers = HeaderMap::new();
        let made = request_id(&headers);
        assert_eq!(made.len(), 32);
        assert!(
            made.as_bytes()
                .iter()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(request_id(&headers), made);
        headers.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&headers), "abc-123");
        headers.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        assert_eq!(request_id(&headers).len(), 32);
    }
}
