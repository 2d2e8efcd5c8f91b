//! The owner's side of a proxied request: checks the caller asked for an
//! instance this node hosts and forwards it, in the protocol the instance
//! speaks, with the pooled client. The caller is a mesh node: the
//! transport only accepts streams on connections authenticated by the
//! mesh CA.

use std::sync::Arc;
use std::time::Duration;

use gossamer_membership::catalog::Protocol;
use gossamer_transport::frame::read_frame;
use gossamer_transport::{RecvStream, SendStream};
use http::{HeaderValue, Method, Request, StatusCode, Version};
use hyper::body::Body;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use tracing::debug;

use super::body;
use super::outbound::AttemptError;
use super::wire::{self, RequestHead, ResponseHead};
use super::{ERROR_HEADER, Proxy};

const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the owner answered instead of its service (`x-gossamer-error`):
/// the caller retries elsewhere when nothing reached the service.
pub const UNREACHABLE: &str = "unreachable";
/// Sent to the service, no response came back.
pub const NO_RESPONSE: &str = "no-response";
/// Anything else (bad request, timeout).
pub const OTHER: &str = "other";
/// Carries the owner's one-line explanation to the caller, which puts it
/// in its own error answer (removed before any client sees a response).
pub const MESSAGE_HEADER: &str = "x-gossamer-message";

async fn reply(send: &mut SendStream, status: StatusCode, reason: &str, message: &str) {
    let mut headers = vec![
        (ERROR_HEADER.into(), reason.as_bytes().to_vec()),
        ("content-type".into(), b"text/plain; charset=utf-8".to_vec()),
    ];
    if HeaderValue::from_str(message).is_ok() {
        headers.push((MESSAGE_HEADER.into(), message.as_bytes().to_vec()));
    }
    let head = ResponseHead {
        status: status.as_u16(),
        headers,
        end_stream: false,
    };
    if let Ok(encoded) = wire::encode_head(&head) {
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

/// Serves one proxy stream (the kind byte already read).
pub async fn serve(from: String, mut send: SendStream, mut recv: RecvStream, proxy: Arc<Proxy>) {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_frame(&mut recv, wire::MAX_HEAD)).await
    {
        Ok(Ok(Some(frame))) => match wire::decode_head::<RequestHead>(&frame) {
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
    let local = proxy.catalog.local.borrow().clone();
    let Some(instance) = local
        .services
        .iter()
        .find(|s| s.id == head.instance && s.name == head.service)
        .cloned()
    else {
        let msg = format!(
            "no instance {:?} of {:?} on this node",
            head.instance, head.service
        );
        return reply(
            &mut send,
            StatusCode::SERVICE_UNAVAILABLE,
            UNREACHABLE,
            &msg,
        )
        .await;
    };
    let Ok(method) = Method::from_bytes(head.method.as_bytes()) else {
        return reply(&mut send, StatusCode::BAD_REQUEST, OTHER, "bad method").await;
    };
    let counter = proxy.metrics.bytes(&head.service, "request");
    let mut parts = Request::builder()
        .method(method)
        .uri(&head.path)
        .version(if head.version == 2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        })
        .body(())
        .map(|r| r.into_parts().0);
    let Ok(parts) = parts.as_mut() else {
        return reply(
            &mut send,
            StatusCode::BAD_REQUEST,
            OTHER,
            "bad request line",
        )
        .await;
    };
    parts.headers = wire::headers_from_wire(&head.headers);
    let timeouts = proxy.config.timeouts(&head.service, &parts.headers);
    let (request_timeout, connect_timeout) = (timeouts.request, timeouts.connect);
    let active = Raised::new(&proxy.metrics.active);
    let (request_body, upgrade_recv) = if head.upgrade {
        (body::empty(), Some(recv))
    } else if head.end_stream {
        let _ = recv.stop(0u32.into());
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
        parts,
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
            return reply(&mut send, StatusCode::BAD_GATEWAY, reason, &msg).await;
        }
        Err(_) => {
            let msg = format!("{key} did not answer within {request_timeout:?}");
            return reply(&mut send, StatusCode::GATEWAY_TIMEOUT, OTHER, &msg).await;
        }
    };
    let keep_upgrade = head.upgrade && response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let end_stream = !keep_upgrade && response.body().is_end_stream();
    let out = ResponseHead {
        status: response.status().as_u16(),
        headers: wire::headers_to_wire(response.headers(), keep_upgrade),
        end_stream,
    };
    let Ok(encoded) = wire::encode_head(&out) else {
        return reply(
            &mut send,
            StatusCode::BAD_GATEWAY,
            OTHER,
            "response head too large",
        )
        .await;
    };
    if send.write_all(&encoded).await.is_err() {
        return;
    }
    if keep_upgrade {
        let Some(mut recv) = upgrade_recv else { return };
        match hyper::upgrade::on(&mut response).await {
            Ok(io) => {
                let (mut read, mut write) = tokio::io::split(TokioIo::new(io));
                let up = async {
                    let _ = tokio::io::copy(&mut recv, &mut write).await;
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut write).await;
                };
                let down = async {
                    let _ = tokio::io::copy(&mut read, &mut send).await;
                    let _ = send.finish();
                };
                tokio::join!(up, down);
            }
            Err(e) => debug!(peer = %from, error = %e, "upstream upgrade failed"),
        }
        return;
    }
    if end_stream {
        let _ = send.finish();
        return;
    }
    let counter = proxy.metrics.bytes(&head.service, "response");
    if let Err(e) = body::to_quic(response.into_body(), &mut send, &counter).await {
        debug!(peer = %from, error = %e, "response body not fully sent");
        let _ = send.reset(1u32.into());
    }
}

/// A local instance to call.
#[derive(Debug, Clone, Copy)]
pub(super) struct Upstream<'a> {
    /// `node/id`, for messages.
    pub instance: &'a str,
    /// Where it listens.
    pub address: &'a str,
    /// Its port.
    pub port: u16,
    /// What it speaks.
    pub protocol: Protocol,
}

impl Proxy {
    /// Sends a request to a local instance with the pooled client, in the
    /// instance's protocol whatever the caller spoke, and returns its
    /// response as is (the upgrade, if any, still pending on it). Errors
    /// name the instance, its protocol and the cause.
    pub(super) async fn call_upstream(
        &self,
        upstream: &Upstream<'_>,
        parts: &http::request::Parts,
        body: body::ProxyBody,
        upgrade: bool,
        connect_timeout: Duration,
    ) -> Result<http::Response<hyper::body::Incoming>, AttemptError> {
        let Upstream {
            instance,
            address,
            port,
            protocol,
        } = *upstream;
        let h2 = protocol.is_h2();
        if upgrade && h2 {
            return Err(AttemptError::Connect(format!(
                "{instance} speaks {}: an HTTP/1.1 upgrade (WebSocket) cannot reach it",
                protocol.as_str()
            )));
        }
        let host = if address.contains(':') {
            format!("[{address}]")
        } else {
            address.to_owned()
        };
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut req = Request::builder()
            .method(parts.method.clone())
            .uri(format!("http://{host}:{port}{path}"))
            .version(if h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            })
            .body(body)
            .map_err(|e| AttemptError::Connect(format!("{instance}: bad request: {e}")))?;
        *req.headers_mut() =
            wire::headers_from_wire(&wire::headers_to_wire(&parts.headers, upgrade));
        if h2 {
            req.headers_mut().remove(http::header::HOST);
        }
        self.client(connect_timeout, h2)
            .request(req)
            .await
            .map_err(|e| {
                let cause = std::error::Error::source(&e)
                    .map(|s| format!("{e}: {s}"))
                    .unwrap_or_else(|| e.to_string());
                let what = format!(
                    "{instance} at {address}:{port} (protocol {})",
                    protocol.as_str()
                );
                if e.is_connect() {
                    AttemptError::Connect(format!("cannot connect to {what}: {cause}"))
                } else if h2 {
                    AttemptError::NoResponse(format!(
                        "{what}: {cause} (does it speak HTTP/2 without TLS? register it with protocol \"http1\" if not)"
                    ))
                } else {
                    AttemptError::NoResponse(format!("{what}: {cause}"))
                }
            })
    }
}
