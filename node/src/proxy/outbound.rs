//! The outbound listener: local applications send plain HTTP/1.1 or h2c
//! here; the target service comes from the Host header (`web`, `web.mesh`)
//! or an absolute-form URI (so `HTTP_PROXY` works).

use std::convert::Infallible;
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
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::body::{self, BoxError, ProxyBody, Replayable};
use super::metrics::{InstanceLabels, RequestLabels, ServiceLabel};
use super::outlier::Verdict;
use super::routes::{Backend, HashPolicy, ServiceRoute};
use super::wire::{self, RequestHead, ResponseHead, STREAM_PROXY};
use super::{Proxy, inbound, local_response};
use crate::balance::rendezvous::hash_key;

/// Serves local applications until `shutdown` flips.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, mut shutdown: watch::Receiver<bool>) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(proxy.clone(), req, peer));
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "proxy connection ended with an error");
            }
        });
    }
}

/// The service a request is for: the absolute-form URI's host, else the
/// Host header; a `.mesh` suffix and any port are ignored.
pub fn target_service(req: &Request<Incoming>) -> Option<String> {
    let host = req.uri().host().map(str::to_owned).or_else(|| {
        let h = req.headers().get(http::header::HOST)?.to_str().ok()?;
        let h = h.rsplit_once(':').map_or(h, |(host, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                host
            } else {
                h
            }
        });
        Some(h.to_owned())
    })?;
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let name = host.strip_suffix(".mesh").unwrap_or(&host);
    (!name.is_empty()).then(|| name.to_owned())
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
    #[error("cannot reach {0}")]
    Connect(String),
    /// Failed after sending, before any response byte.
    #[error("no response: {0}")]
    NoResponse(String),
}

async fn handle(
    proxy: Arc<Proxy>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<ProxyBody>, Infallible> {
    let Some(service) = target_service(&req) else {
        return Ok(local_response(
            StatusCode::BAD_REQUEST,
            "no target service: set the Host header (web or web.mesh) or use an absolute URI"
                .into(),
        ));
    };
    let Some(route) = proxy.route(&service) else {
        proxy
            .metrics
            .requests
            .get_or_create(&RequestLabels {
                service: service.clone(),
                instance: "none".into(),
                class: "5xx".into(),
            })
            .inc();
        return Ok(local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unknown service {service:?}"),
        ));
    };
    let on_upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
        parts.headers.append("x-forwarded-for", v);
    }
    let hash = hash_key(&hash_input(&parts, &route.policy, peer));
    Ok(proxy
        .dispatch(&route, hash, parts, Replayable::new(body), on_upgrade)
        .await)
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
        let (request_timeout, connect_timeout) = self.config.timeouts(service);
        let budget = self.budget(service);
        budget.request();
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
            self.begin(&backend.key);
            let attempt = tokio::time::timeout(
                request_timeout,
                self.attempt(
                    route,
                    backend,
                    &parts,
                    body.attempt(),
                    on_upgrade.take(),
                    connect_timeout,
                ),
            )
            .await;
            self.end(&backend.key);
            self.metrics
                .latency
                .get_or_create(&ServiceLabel {
                    service: service.clone(),
                })
                .observe(started.elapsed().as_secs_f64());
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
                Err(_) => {
                    self.failed(route, backend);
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
                && on_upgrade.is_none()
                && tried.len() <= self.config.max_retries as usize
                && budget.try_retry())
            {
                let e = last_error.take().expect("set above");
                return local_response(StatusCode::BAD_GATEWAY, format!("{}: {e}", backend.key));
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
        body: ProxyBody,
        on_upgrade: Option<OnUpgrade>,
        connect_timeout: Duration,
    ) -> Result<Response<ProxyBody>, AttemptError> {
        if backend.local {
            self.call_local(
                &route.name,
                &backend.address,
                backend.port,
                parts,
                body,
                on_upgrade,
                connect_timeout,
            )
            .await
        } else {
            self.call_remote(route, backend, parts, body, on_upgrade, connect_timeout)
                .await
        }
    }

    /// Calls an instance on this node with the pooled client.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn call_local(
        &self,
        service: &str,
        address: &str,
        port: u16,
        parts: &Parts,
        body: ProxyBody,
        on_upgrade: Option<OnUpgrade>,
        connect_timeout: Duration,
    ) -> Result<Response<ProxyBody>, AttemptError> {
        let upgrade = on_upgrade.is_some();
        let mut response = self
            .call_upstream(address, port, parts, body, upgrade, connect_timeout)
            .await
            .map_err(|e| {
                if e.is_connect() {
                    AttemptError::Connect(format!("{address}:{port}: {e}"))
                } else {
                    AttemptError::NoResponse(format!("{address}:{port}: {e}"))
                }
            })?;
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
        let counter = self.metrics.bytes(service, "response");
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
        body: ProxyBody,
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
                .map_err(|e| AttemptError::Connect(e.to_string()))?;
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
        };
        let encoded = wire::encode_head(&head).map_err(|e| AttemptError::Connect(e.to_string()))?;
        let sent = async {
            send.write_all(&[STREAM_PROXY]).await?;
            send.write_all(&encoded).await
        };
        sent.await
            .map_err(|e| AttemptError::NoResponse(e.to_string()))?;
        let mut send = Some(send);
        if !upgrade {
            let mut send = send.take().expect("present");
            let counter = self.metrics.bytes(&route.name, "request");
            tokio::spawn(async move {
                if let Err(e) = body::to_quic(body, &mut send, &counter).await {
                    debug!(error = %e, "request body not fully sent");
                    let _ = send.reset(1u32.into());
                }
            });
        }
        let frame = read_frame(&mut recv, wire::MAX_HEAD)
            .await
            .map_err(|e| AttemptError::NoResponse(e.to_string()))?
            .ok_or_else(|| AttemptError::NoResponse("stream closed before the response".into()))?;
        let head: ResponseHead =
            wire::decode_head(&frame).map_err(|e| AttemptError::NoResponse(e.to_string()))?;
        let status = StatusCode::from_u16(head.status)
            .map_err(|e| AttemptError::NoResponse(e.to_string()))?;
        let headers = wire::headers_from_wire(&head.headers);
        // The owner answered for its service: when nothing reached the
        // service (gone, refused) the request can go elsewhere.
        match headers.get("x-gossamer-error").map(|v| v.as_bytes()) {
            Some(r) if r == inbound::UNREACHABLE.as_bytes() => {
                return Err(AttemptError::Connect(format!(
                    "{}: unreachable from its node",
                    backend.key
                )));
            }
            Some(r) if r == inbound::NO_RESPONSE.as_bytes() => {
                return Err(AttemptError::NoResponse(format!(
                    "{}: no response to its node",
                    backend.key
                )));
            }
            _ => {}
        }
        let mut response = Response::builder().status(status);
        *response.headers_mut().expect("builder ok") = headers;
        if status == StatusCode::SWITCHING_PROTOCOLS
            && let (Some(client_side), Some(send)) = (on_upgrade, send)
        {
            tokio::spawn(bridge_quic(client_side, send, recv));
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
