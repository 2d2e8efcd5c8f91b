//! Answers the mesh makes itself rather than a service, and how they are
//! marked so that clients, and the caller node on the owner-to-caller hop,
//! can tell them from a service's own answers.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use super::body::{self, ProxyBody};

/// Marks answers the mesh made itself. To clients its value is `1`; on the
/// owner-to-caller hop it is one of [`UNREACHABLE`], [`NO_RESPONSE`] or
/// [`OTHER`], which tells the caller whether it may try elsewhere.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-gossamer-error");
/// The owner could not reach the instance; nothing was sent to it.
pub const UNREACHABLE: &str = "unreachable";
/// The owner sent the request to the instance; no response came back.
pub const NO_RESPONSE: &str = "no-response";
/// Anything else (bad request, timeout): not to be retried.
pub const OTHER: &str = "other";
/// The owner's authorization policy refused the caller: not to be retried,
/// and the message goes to the client in [`ERROR_HEADER`].
pub const DENIED: &str = "denied";
/// Carries the owner's one-line explanation to the caller, which puts it
/// in its own error answer (removed before any client sees a response).
pub const MESSAGE_HEADER: HeaderName = HeaderName::from_static("x-gossamer-message");

/// Why one attempt to reach an instance failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// The instance could not be reached; nothing was sent.
    #[error("{0}")]
    Connect(String),
    /// Failed after sending, before any response byte.
    #[error("no response: {0}")]
    NoResponse(String),
}

/// The message of an answer the proxy made itself, kept so it can be
/// re-shaped for gRPC callers.
#[derive(Debug, Clone)]
pub struct LocalError(pub String);

/// A response the proxy makes itself (errors), marked so clients can tell.
pub fn local_response(status: StatusCode, message: String) -> Response<ProxyBody> {
    let mut response = Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(ERROR_HEADER, "1")
        .body(body::full(Bytes::from(format!("gossamer: {message}\n"))))
        .expect("valid response");
    response.extensions_mut().insert(LocalError(message));
    response
}

/// Whether a request is gRPC (its content type says so).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Re-shapes an answer the proxy made itself for a gRPC caller: gRPC
/// clients read the status from `grpc-status`, not from the HTTP status,
/// so the error goes there (a trailers-only answer) with its message, as
/// gRPC's HTTP-to-status mapping would have it.
pub fn grpc_error(response: Response<ProxyBody>) -> Response<ProxyBody> {
    let Some(LocalError(message)) = response.extensions().get::<LocalError>().cloned() else {
        return response;
    };
    let code = match response.status().as_u16() {
        400 => 13,       // INTERNAL: the request itself was broken
        403 => 7,        // PERMISSION_DENIED
        408 | 504 => 4,  // DEADLINE_EXCEEDED
        429 => 8,        // RESOURCE_EXHAUSTED
        502..=503 => 14, // UNAVAILABLE
        _ => 2,          // UNKNOWN
    };
    let encoded: String = message
        .bytes()
        .flat_map(|b| {
            if (0x20..0x7f).contains(&b) && b != b'%' {
                vec![b as char]
            } else {
                format!("%{b:02X}").chars().collect()
            }
        })
        .collect();
    let mut out = Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("grpc-status", code.to_string())
        .header(ERROR_HEADER, "1");
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        out = out.header("grpc-message", v);
    }
    out.body(body::empty()).expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_answers_are_marked_and_reshaped_for_grpc() {
        let plain = local_response(StatusCode::SERVICE_UNAVAILABLE, "no web: 100%".into());
        assert_eq!(plain.headers()[ERROR_HEADER], "1");
        let grpc = grpc_error(plain);
        assert_eq!(grpc.status(), StatusCode::OK);
        assert_eq!(grpc.headers()["grpc-status"], "14");
        assert_eq!(grpc.headers()["grpc-message"], "no web: 100%25");
        assert_eq!(grpc.headers()[ERROR_HEADER], "1");
    }
}
