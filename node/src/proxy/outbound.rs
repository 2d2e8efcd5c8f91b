//! The outbound listener: local applications send plain HTTP/1.1 or h2c
//! here; the target service comes from the Host header (`web`, `web.mesh`)
//! or an absolute-form URI (so `HTTP_PROXY` works).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gossamer_transport::frame::read_frame;
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::body::{self, BoxError, ProxyBody, Replayable};
use super::inbound::{self, Upstream};
use super::metrics::{InstanceLabels, RequestLabels, ServiceLabel};
use super::outlier::Verdict;
use super::routes::{Backend, HashPolicy, ServiceRoute};
use super::wire::{self, RequestHead, ResponseHead, STREAM_PROXY};
use super::{ERROR_HEADER, HOPS_HEADER, MAX_HOPS, Proxy, grpc_error, is_grpc, local_response};
use crate::balance::rendezvous::hash_key;
use crate::listener::{self, Limits, ListenerMetrics};
use gossamer_membership::catalog::validate_service_name;

/// Serves local applications until `shutdown` flips.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: Limits,
    metrics: ListenerMetrics,
    shutdown: watch::Receiver<bool>,
) {
    let handler = move |req, peer| handle(proxy.clone(), req, peer);
    listener::serve(listener, "proxy", limits, metrics, shutdown, handler).await;
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
pub fn hash_input(parts: &Parts, policy: &HashPolicy, peer: SocketAddr) -> Vec<u8> {
    let found: Option<Vec<u8>> = match policy {
        HashPolicy::Header(name) => parts.headers.get(name).map(|v| v.as_bytes().to_vec()),
        HashPolicy::Cookie(name) => parts
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_bytes().to_vec()),
        HashPolicy::Query(name) => parts.uri.query().and_then(|q| {
            q.split('&')
                .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_bytes().to_vec())
        }),
        HashPolicy::Path => Some(parts.uri.path().as_bytes().to_vec()),
        HashPolicy::SourceIp => None,
    };
    found.unwrap_or_else(|| peer.ip().to_string().into_bytes())
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(http::header::UPGRADE)
        && req
            .headers()
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// The instance could not be reached; nothing was sent.
    #[error("{0}")]
    Connect(String),
    /// Failed after sending, before any response byte.
    #[error("no response: {0}")]
    NoResponse(String),
}

async fn handle(
    proxy: Arc<Proxy>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    if is_grpc(req.headers()) {
        grpc_error(route_request(proxy, req, peer).await)
    } else {
        route_request(proxy, req, peer).await
    }
}

async fn route_request(
    proxy: Arc<Proxy>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let service = match target_service(&req) {
        Ok(s) => s,
        Err(e) => return local_response(StatusCode::BAD_REQUEST, e.to_string()),
    };
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
    let Some(route) = proxy.route(&service) else {
        proxy.count(&service, "none", "5xx");
        return local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unknown service {service:?}"),
        );
    };
    let on_upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // The instance sees the name it was called by: from an absolute URI or
    // HTTP/2's :authority too, whatever protocol it speaks.
    if let Some(authority) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(http::header::HOST, v);
    }
    parts
        .headers
        .insert(HOPS_HEADER, HeaderValue::from(hops + 1));
    if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
        parts.headers.append("x-forwarded-for", v);
    }
    let hash = hash_key(&hash_input(&parts, &route.policy, peer));
    proxy
        .dispatch(&route, hash, parts, Replayable::new(body), on_upgrade)
        .await
}

impl Proxy {
    /// Sends a request to the instance its key maps to, retrying and
    /// failing over as the policy allows.
    async fn dispatch(
        &self,
        route: &ServiceRoute,
        hash: u64,
        parts: Parts,
        body: Replayable,
        mut on_upgrade: Option<OnUpgrade>,
    ) -> Response<ProxyBody> {
        let service = &route.name;
        let timeouts = self.config.timeouts(service, &parts.headers);
        let (request_timeout, connect_timeout) = (timeouts.request, timeouts.connect);
        let budget = self.budget(service);
        budget.request();
        // The client side of an upgrade goes to the first attempt; a retry
        // would be a plain request, so upgrades are never retried.
        let upgrade = on_upgrade.is_some();
        let mut tried = Vec::new();
        let mut last_error = None;
        loop {
            let Some(index) = self.pick(route, hash, &tried) else {
                self.count(service, "none", "5xx");
                return match last_error {
                    Some(e) => local_response(StatusCode::BAD_GATEWAY, format!("{service}: {e}")),
                    None => local_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("no healthy instance of {service:?}"),
                    ),
                };
            };
            tried.push(index);
            let backend = &route.backends[index];
            let started = Instant::now();
            let in_flight = self.begin(&backend.key);
            let attempt = tokio::time::timeout(
                request_timeout,
                self.attempt(
                    route,
                    backend,
                    &parts,
                    &body,
                    on_upgrade.take(),
                    connect_timeout,
                ),
            )
            .await;
            drop(in_flight);
            self.metrics
                .latency
                .get_or_create(&ServiceLabel {
                    service: service.clone(),
                })
                .observe(started.elapsed().as_secs_f64());
            // The client's own mistakes (a malformed body, hanging up
            // mid-upload, sending too slowly) are never the instance's.
            if body.client_failed() {
                self.count(service, &backend.key, "4xx");
                debug!(instance = %backend.key, "request body broken by the client");
                return local_response(
                    StatusCode::BAD_REQUEST,
                    "request body: malformed or cut short by the client".into(),
                );
            }
            let error = match attempt {
                Ok(Ok(response)) => {
                    if response.status().is_server_error() {
                        self.failed(route, backend);
                    } else {
                        self.outliers.success(&backend.key);
                    }
                    self.count(service, &backend.key, class(response.status()));
                    return response;
                }
                Ok(Err(e)) => e,
                Err(_) if !body.complete() => {
                    self.count(service, &backend.key, "4xx");
                    return local_response(
                        StatusCode::REQUEST_TIMEOUT,
                        format!("request body not received within {request_timeout:?}"),
                    );
                }
                Err(_) => {
                    if !timeouts.callers_deadline {
                        self.failed(route, backend);
                    }
                    self.count(service, &backend.key, "5xx");
                    return local_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("{} did not answer within {request_timeout:?}", backend.key),
                    );
                }
            };
            self.failed(route, backend);
            self.count(service, &backend.key, "error");
            let may_retry = match &error {
                AttemptError::Connect(_) => true,
                AttemptError::NoResponse(_) => idempotent(&parts.method),
            };
            debug!(instance = %backend.key, error = %error, "attempt failed");
            last_error = Some(error);
            if !(may_retry
                && body.replayable()
                && !upgrade
                && tried.len() <= self.config.max_retries as usize
                && budget.try_retry())
            {
                let e = last_error.take().expect("set above");
                return local_response(StatusCode::BAD_GATEWAY, e.to_string());
            }
            self.metrics
                .retries
                .get_or_create(&ServiceLabel {
                    service: service.clone(),
                })
                .inc();
        }
    }

    fn count(&self, service: &str, instance: &str, class: &str) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                service: service.to_owned(),
                instance: instance.to_owned(),
                class: class.to_owned(),
            })
            .inc();
    }

    fn failed(&self, route: &ServiceRoute, backend: &Backend) {
        if let Verdict::Ejected(time) =
            self.outliers
                .failure(&backend.key, &route.keys, &self.policy(), Instant::now())
        {
            warn!(instance = %backend.key, ejected_for = ?time, "instance ejected after consecutive failures");
            self.metrics
                .ejections
                .get_or_create(&InstanceLabels {
                    service: route.name.clone(),
                    instance: backend.key.clone(),
                })
                .inc();
        }
    }

    async fn attempt(
        &self,
        route: &ServiceRoute,
        backend: &Backend,
        parts: &Parts,
        body: &Replayable,
        on_upgrade: Option<OnUpgrade>,
        connect_timeout: Duration,
    ) -> Result<Response<ProxyBody>, AttemptError> {
        if backend.local {
            self.call_local(route, backend, parts, body, on_upgrade, connect_timeout)
                .await
        } else {
            self.call_remote(route, backend, parts, body, on_upgrade, connect_timeout)
                .await
        }
    }

    /// Calls an instance on this node with the pooled client.
    async fn call_local(
        &self,
        route: &ServiceRoute,
        backend: &Backend,
        parts: &Parts,
        body: &Replayable,
        on_upgrade: Option<OnUpgrade>,
        connect_timeout: Duration,
    ) -> Result<Response<ProxyBody>, AttemptError> {
        let upstream = Upstream {
            instance: &backend.key,
            address: &backend.address,
            port: backend.port,
            protocol: backend.protocol,
        };
        let mut response = self
            .call_upstream(
                &upstream,
                parts,
                body.attempt(),
                on_upgrade.is_some(),
                connect_timeout,
            )
            .await?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_side) = on_upgrade
        {
            let upstream = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                match (client_side.await, upstream.await) {
                    (Ok(a), Ok(b)) => {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(a),
                            &mut TokioIo::new(b),
                        )
                        .await;
                    }
                    (a, b) => debug!(client = ?a.err(), upstream = ?b.err(), "upgrade failed"),
                }
            });
            let (mut head, _) = response.into_parts();
            head.headers = wire::headers_from_wire(&wire::headers_to_wire(&head.headers, true));
            return Ok(Response::from_parts(head, body::empty()));
        }
        let counter = self.metrics.bytes(&route.name, "response");
        let (mut head, incoming) = response.into_parts();
        head.headers = wire::headers_from_wire(&wire::headers_to_wire(&head.headers, false));
        Ok(Response::from_parts(
            head,
            Counting::boxed(incoming, counter),
        ))
    }

    async fn call_remote(
        &self,
        route: &ServiceRoute,
        backend: &Backend,
        parts: &Parts,
        body: &Replayable,
        on_upgrade: Option<OnUpgrade>,
        connect_timeout: Duration,
    ) -> Result<Response<ProxyBody>, AttemptError> {
        let addr = backend.owner_addr.ok_or_else(|| {
            AttemptError::Connect(format!("no address for node {}", backend.node))
        })?;
        let (mut send, mut recv) =
            tokio::time::timeout(connect_timeout, self.transport.open_bi(&backend.node, addr))
                .await
                .map_err(|_| {
                    AttemptError::Connect(format!(
                        "node {} not reachable within {connect_timeout:?}",
                        backend.node
                    ))
                })?
                .map_err(|e| AttemptError::Connect(format!("node {}: {e}", backend.node)))?;
        let upgrade = on_upgrade.is_some();
        let head = RequestHead {
            service: route.name.clone(),
            instance: backend.id.clone(),
            method: parts.method.as_str().to_owned(),
            path: parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned(),
            version: if parts.version == Version::HTTP_2 {
                2
            } else {
                1
            },
            headers: wire::headers_to_wire(&parts.headers, upgrade),
            upgrade,
            end_stream: body.is_empty(),
        };
        let encoded = wire::encode_head(&head).map_err(|e| AttemptError::Connect(e.to_string()))?;
        let sent = async {
            send.write_all(&[STREAM_PROXY]).await?;
            send.write_all(&encoded).await
        };
        sent.await
            .map_err(|e| AttemptError::NoResponse(format!("node {}: {e}", backend.node)))?;
        let mut send = Some(send);
        if !upgrade {
            let mut send = send.take().expect("present");
            let counter = self.metrics.bytes(&route.name, "request");
            let body = body.attempt();
            tokio::spawn(async move {
                if let Err(e) = body::to_quic(body, &mut send, &counter).await {
                    debug!(error = %e, "request body not fully sent");
                    let _ = send.reset(1u32.into());
                }
            });
        }
        let no_response =
            |e: String| AttemptError::NoResponse(format!("node {}: {e}", backend.node));
        let frame = read_frame(&mut recv, wire::MAX_HEAD)
            .await
            .map_err(|e| no_response(e.to_string()))?
            .ok_or_else(|| no_response("stream closed before the response".into()))?;
        let head: ResponseHead =
            wire::decode_head(&frame).map_err(|e| no_response(e.to_string()))?;
        let status = StatusCode::from_u16(head.status).map_err(|e| no_response(e.to_string()))?;
        let mut headers = wire::headers_from_wire(&head.headers);
        // The owner answered for its service: when nothing reached the
        // service (gone, refused) the request can go elsewhere. Its message
        // names the cause.
        let message = || {
            headers
                .get(inbound::MESSAGE_HEADER)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_else(|| format!("{} failed on its node", backend.key))
        };
        match headers.get(ERROR_HEADER).map(|v| v.as_bytes()) {
            Some(r) if r == inbound::UNREACHABLE.as_bytes() => {
                return Err(AttemptError::Connect(message()));
            }
            Some(r) if r == inbound::NO_RESPONSE.as_bytes() => {
                return Err(AttemptError::NoResponse(message()));
            }
            Some(r) if r == inbound::OTHER.as_bytes() => {
                let _ = recv.stop(0u32.into());
                return Ok(local_response(status, message()));
            }
            _ => {}
        }
        headers.remove(inbound::MESSAGE_HEADER);
        let mut response = Response::builder().status(status);
        *response.headers_mut().expect("builder ok") = headers;
        if status == StatusCode::SWITCHING_PROTOCOLS
            && let (Some(client_side), Some(send)) = (on_upgrade, send)
        {
            tokio::spawn(bridge_quic(client_side, send, recv));
            return Ok(response.body(body::empty()).expect("valid"));
        }
        if head.end_stream {
            let _ = recv.stop(0u32.into());
            return Ok(response.body(body::empty()).expect("valid"));
        }
        let counter = self.metrics.bytes(&route.name, "response");
        Ok(response
            .body(body::from_quic(recv, counter))
            .expect("valid"))
    }
}

/// Copies raw bytes between an upgraded HTTP connection and a QUIC stream.
pub(crate) async fn bridge_quic(
    upgraded: OnUpgrade,
    mut send: gossamer_transport::SendStream,
    mut recv: gossamer_transport::RecvStream,
) {
    let io = match upgraded.await {
        Ok(io) => TokioIo::new(io),
        Err(e) => {
            debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let (mut read, mut write) = tokio::io::split(io);
    let up = async {
        let _ = tokio::io::copy(&mut read, &mut send).await;
        let _ = send.finish();
    };
    let down = async {
        let _ = tokio::io::copy(&mut recv, &mut write).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut write).await;
    };
    tokio::join!(up, down);
    info!("upgraded connection closed");
}

/// Counts the data bytes of a body as they pass.
pub(crate) struct Counting<B> {
    inner: B,
    counter: Counter,
}

impl<B> Counting<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// Wraps `inner` into a proxy body.
    pub(crate) fn boxed(inner: B, counter: Counter) -> ProxyBody {
        Self { inner, counter }.boxed_unsync()
    }
}

impl<B> Body for Counting<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.counter.inc_by(data.len() as u64);
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
