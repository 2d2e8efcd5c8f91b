//! The owner's side of a proxied request: checks the caller asked for an
//! instance this node hosts and forwards to it with the pooled client.
//! The caller is a mesh node: the transport only accepts streams on
//! connections authenticated by the mesh CA.

use std::sync::Arc;
use std::time::Duration;

use gossamer_transport::frame::read_frame;
use gossamer_transport::{RecvStream, SendStream};
use http::{Method, Request, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::Proxy;
use super::body;
use super::wire::{self, RequestHead, ResponseHead};

const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the owner answered instead of its service (`x-gossamer-error`):
/// the caller retries elsewhere when nothing reached the service.
pub const UNREACHABLE: &str = "unreachable";
/// Sent to the service, no response came back.
pub const NO_RESPONSE: &str = "no-response";
/// Anything else (bad request, timeout).
pub const OTHER: &str = "other";

async fn reply(send: &mut SendStream, status: StatusCode, reason: &str, message: &str) {
    let head = ResponseHead {
        status: status.as_u16(),
        headers: vec![
            ("x-gossamer-error".into(), reason.as_bytes().to_vec()),
            ("content-type".into(), b"text/plain; charset=utf-8".to_vec()),
        ],
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
    let (request_timeout, connect_timeout) = proxy.config.timeouts(&head.service);
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
    proxy.metrics.active.inc();
    let (request_body, upgrade_recv) = if head.upgrade {
        (body::empty(), Some(recv))
    } else {
        (body::from_quic(recv, counter), None)
    };
    let call = proxy.call_upstream(
        &instance.address,
        instance.port,
        parts,
        request_body,
        head.upgrade,
        connect_timeout,
    );
    let outcome = tokio::time::timeout(request_timeout, call).await;
    proxy.metrics.active.dec();
    let mut response = match outcome {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let reason = if e.is_connect() {
                UNREACHABLE
            } else {
                NO_RESPONSE
            };
            let msg = format!("{}: {e}", instance.id);
            return reply(&mut send, StatusCode::BAD_GATEWAY, reason, &msg).await;
        }
        Err(_) => {
            let msg = format!("{} did not answer within {request_timeout:?}", instance.id);
            return reply(&mut send, StatusCode::GATEWAY_TIMEOUT, OTHER, &msg).await;
        }
    };
    let keep_upgrade = head.upgrade && response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let out = ResponseHead {
        status: response.status().as_u16(),
        headers: wire::headers_to_wire(response.headers(), keep_upgrade),
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
    let counter = proxy.metrics.bytes(&head.service, "response");
    if let Err(e) = body::to_quic(response.into_body(), &mut send, &counter).await {
        debug!(peer = %from, error = %e, "response body not fully sent");
        let _ = send.reset(1u32.into());
    }
}

impl Proxy {
    /// Sends a request to a local instance with the pooled client and
    /// returns its response as is (the upgrade, if any, still pending on it).
    pub(super) async fn call_upstream(
        &self,
        address: &str,
        port: u16,
        parts: &http::request::Parts,
        body: body::ProxyBody,
        upgrade: bool,
        connect_timeout: Duration,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        let h2 = parts.version == Version::HTTP_2;
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
            .expect("valid request parts");
        *req.headers_mut() =
            wire::headers_from_wire(&wire::headers_to_wire(&parts.headers, upgrade));
        if h2 {
            req.headers_mut().remove(http::header::HOST);
        }
        self.client(connect_timeout, h2).request(req).await
    }
}
