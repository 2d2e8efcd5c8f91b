//! The owner's side of a proxied request: checks the caller asked for an
//! instance this node hosts and forwards it, in the protocol the instance
//! speaks, with the pooled client. The caller is a mesh node: the
//! transport only accepts streams on connections authenticated by the
//! mesh CA.

use std::sync::Arc;
use std::time::Duration;

use gossamer_transport::frame::read_frame;
use gossamer_transport::{RecvStream, SendStream};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use hyper::body::Body;
use prometheus_client::metrics::gauge::Gauge;
use tracing::{Instrument, debug, debug_span};

use super::Proxy;
use super::authz::Caller;
use super::body;
use super::dispatch::Upstream;
use super::dispatch::denial;
use super::error::{
    AttemptError, DENIED, ERROR_HEADER, MESSAGE_HEADER, NO_RESPONSE, OTHER, UNREACHABLE,
};
use super::hop;
use super::upgrade::bridge;
use super::wire::{self, RequestHead, ResponseHead};

const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers for the service when the request never got an answer from it;
/// the reason ([`UNREACHABLE`], [`NO_RESPONSE`], [`OTHER`]) tells the
/// caller whether it may try elsewhere.
async fn reply(send: &mut SendStream, status: StatusCode, reason: &str, message: &str) {
    let mut headers = HeaderMap::with_capacity(3);
    if let Ok(reason) = HeaderValue::from_str(reason) {
        headers.insert(ERROR_HEADER, reason);
    }
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(message) = HeaderValue::from_str(message) {
        headers.insert(MESSAGE_HEADER, message);
    }
    let head = ResponseHead {
        status: status.as_u16(),
        headers,
        end_stream: false,
    };
    if let Ok(encoded) = head.encode(false) {
        let _ = send.write_all(&encoded).await;
        let body = format!("gossamer: {message}\n");
        if let Ok(f) = wire::encode_frame(&wire::Frame::Data(body.into())) {
            let _ = send.write_all(&f).await;
        }
        let _ = send.finish();
    }
}

/// Keeps a gauge raised while alive.
struct Raised(Gauge);

impl Raised {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts a request to a local instance in the golden signals once its
/// answer's head is known, and ends its server span when dropped (after
/// the body, or when the stream ends early).
struct Signals {
    proxy: Arc<Proxy>,
    service: String,
    started: std::time::Instant,
    status: Option<u16>,
    span: Option<(
        crate::observe::trace::Tracer,
        Box<crate::observe::access::Record>,
    )>,
}

impl Signals {
    fn new(proxy: &Arc<Proxy>, service: &str) -> Self {
        Self {
            proxy: proxy.clone(),
            service: service.to_owned(),
            started: std::time::Instant::now(),
            status: None,
            span: None,
        }
    }

    /// The answer's head is going out with `status`.
    fn answered(&mut self, status: u16) {
        if self.status.is_none() {
            self.status = Some(status);
            let now = std::time::Instant::now();
            self.proxy.stats().record(
                crate::observe::stats::Direction::Inbound,
                &self.service,
                now.saturating_duration_since(self.started),
                status >= 500,
                now,
            );
        }
    }

    async fn reply(
        &mut self,
        send: &mut SendStream,
        status: StatusCode,
        reason: &str,
        message: &str,
    ) {
        self.answered(status.as_u16());
        if let Some((_, record)) = &mut self.span {
            record.flags = vec!["LR"];
        }
        reply(send, status, reason, message).await;
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        if let Some((tracer, mut record)) = self.span.take()
            && let Some(ids) = record.span.take()
        {
            // No head sent: the caller went away or the stream broke.
            record.status = self.status.unwrap_or(0);
            if self.status.is_none() {
                record.flags.push("DC");
            }
            record.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
            tracer.finish(ids, &record);
        }
    }
}

/// The request an owner makes of its instance from a proxy stream's head:
/// its method, path and version, and the head's headers (taken from it).
/// The error says which part does not parse.
pub fn request_parts(head: &mut RequestHead) -> Result<Parts, &'static str> {
    let method = Method::from_bytes(head.method.as_bytes()).map_err(|_| "bad method")?;
    let mut parts = Request::builder()
        .method(method)
        .uri(&head.path)
        .version(hop::version_from_wire(head.version))
        .body(())
        .map_err(|_| "bad request line")?
        .into_parts()
        .0;
    parts.headers = std::mem::take(&mut head.headers);
    Ok(parts)
}

/// Serves one proxy stream (the kind byte already read).
pub async fn serve(from: String, mut send: SendStream, mut recv: RecvStream, proxy: Arc<Proxy>) {
    let mut head =
        match tokio::time::timeout(HEAD_TIMEOUT, read_frame(&mut recv, wire::MAX_HEAD)).await {
            Ok(Ok(Some(frame))) => match RequestHead::decode(frame) {
                Ok(h) => h,
                Err(e) => {
                    let msg = format!("bad request head: {e}");
                    return reply(&mut send, StatusCode::BAD_REQUEST, OTHER, &msg).await;
                }
            },
            _ => {
                let _ = send.reset(1u32.into());
                return;
            }
        };
    let mut signals = Signals::new(&proxy, &head.service);
    let local = proxy.catalog.local.borrow().clone();
    // The entry's instances are sorted by id (its validation checks it).
    let Some(instance) = local
        .services
        .binary_search_by(|s| s.id.as_str().cmp(&head.instance))
        .ok()
        .map(|i| &local.services[i])
        .filter(|s| {
            s.name == head.service && s.protocol != gossamer_membership::catalog::Protocol::Tcp
        })
    else {
        let msg = format!(
            "no instance {:?} of {:?} on this node",
            head.instance, head.service
        );
        return signals
            .reply(
                &mut send,
                StatusCode::SERVICE_UNAVAILABLE,
                UNREACHABLE,
                &msg,
            )
            .await;
    };
    let mut parts = match request_parts(&mut head) {
        Ok(parts) => parts,
        Err(why) => {
            return signals
                .reply(&mut send, StatusCode::BAD_REQUEST, OTHER, why)
                .await;
        }
    };
    let counter = proxy.metrics.bytes(&head.service, "request");
    // Authorization: the caller is the node the handshake proved, with the
    // services its certificate names.
    let hosts = proxy
        .transport
        .peer_hosts(&from)
        .unwrap_or_else(|| Arc::new(gossamer_transport::pki::Hosts::Only(Vec::new())));
    let caller = Caller {
        node: &from,
        hosts: &hosts,
    };
    let verdict = proxy.authorize(&head.service, caller, &parts);
    if !verdict.allowed {
        let _ = recv.stop(0u32.into());
        let why = denial(&head.service, &verdict);
        return signals
            .reply(&mut send, StatusCode::FORBIDDEN, DENIED, &why)
            .await;
    }
    use crate::observe::access::Text;
    if let Some(tracer) = proxy.tracer()
        && let Some(ids) = tracer.enter(&mut parts.headers, crate::observe::trace::Kind::Server)
    {
        let record = crate::observe::access::Record {
            listener: "inbound",
            protocol: hop::protocol_name(parts.version),
            method: Some(Text::method(&parts.method)),
            authority: parts.headers.get(http::header::HOST).and_then(Text::header),
            path: Some(Text::path(&parts.uri)),
            source_node: proxy.node_text(),
            client: crate::observe::access::Peer::Node(from.clone()),
            service: Some(head.service.as_str().into()),
            instance: Some(format!("{}/{}", local.node, instance.id).into()),
            node: Some(proxy.node_text()),
            request_id: parts.headers.get("x-request-id").and_then(Text::header),
            span: Some(ids),
            ..Default::default()
        };
        signals.span = Some((tracer.clone(), Box::new(record)));
    }
    let timeouts = proxy.config.timeouts(&head.service, &parts.headers);
    let (request_timeout, connect_timeout) = (timeouts.request, timeouts.connect);
    let active = Raised::new(&proxy.metrics.active);
    let (request_body, upgrade_recv) = if head.upgrade {
        (body::empty(), Some(recv))
    } else if head.end_stream {
        body::end_read(&mut recv);
        (body::empty(), None)
    } else {
        (body::from_quic(recv, counter), None)
    };
    let key = format!("{}/{}", local.node, instance.id);
    let upstream = Upstream {
        instance: &key,
        address: &instance.address,
        port: instance.port,
        protocol: instance.protocol,
    };
    let call = proxy.call_upstream(
        &upstream,
        &parts,
        request_body,
        head.upgrade,
        connect_timeout,
    );
    let outcome = tokio::time::timeout(request_timeout, call).await;
    drop(active);
    let mut response = match outcome {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let (reason, msg) = match e {
                AttemptError::Connect(m) => (UNREACHABLE, m),
                AttemptError::NoResponse(m) => (NO_RESPONSE, m),
            };
            return signals
                .reply(&mut send, StatusCode::BAD_GATEWAY, reason, &msg)
                .await;
        }
        Err(_) => {
            let msg = format!("{key} did not answer within {request_timeout:?}");
            return signals
                .reply(&mut send, StatusCode::GATEWAY_TIMEOUT, OTHER, &msg)
                .await;
        }
    };
    signals.answered(response.status().as_u16());
    let keep_upgrade = head.upgrade && response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let end_stream = !keep_upgrade && response.body().is_end_stream();
    let Ok(encoded) = wire::encode_response(
        response.status().as_u16(),
        response.headers(),
        keep_upgrade,
        end_stream,
    ) else {
        return signals
            .reply(
                &mut send,
                StatusCode::BAD_GATEWAY,
                OTHER,
                "response head too large",
            )
            .await;
    };
    if keep_upgrade {
        if send.write_chunk(encoded).await.is_err() {
            return;
        }
        if let Some(recv) = upgrade_recv {
            bridge(
                hyper::upgrade::on(&mut response),
                tokio::io::join(recv, send),
            )
            .instrument(debug_span!("upgrade", peer = %from))
            .await;
        }
        return;
    }
    if end_stream {
        if send.write_chunk(encoded).await.is_ok() {
            let _ = send.finish();
        }
        return;
    }
    let counter = proxy.metrics.bytes(&head.service, "response");
    if let Err(e) = body::head_then_body(encoded, response.into_body(), &mut send, &counter).await {
        debug!(peer = %from, error = %e, "response body not fully sent");
        let _ = send.reset(1u32.into());
    }
}
