//! The CLI side of the admin API.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;

use crate::config::AdminToken;
use crate::proxy::body;

/// Why the agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection or no answer.
    #[error(
        "cannot reach the agent's admin API at {addr}: {reason} (is `gossamer agent` running? set --admin)"
    )]
    Unreachable {
        /// Where.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The agent answered with an error.
    #[error("agent answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: StatusCode,
        /// Response body.
        body: String,
    },
}

/// Sends one request to the admin API and returns the body of a 2xx answer.
/// Writes are sent as JSON with the token, if one is given.
pub async fn call(
    admin: SocketAddr,
    token: Option<&AdminToken>,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Bytes, ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable {
        addr: admin,
        reason,
    };
    let client = body::http_client();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"));
    if body.is_some() || !matches!(req.method_ref(), Some(&Method::GET)) {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    if let Some(token) = token {
        req = req.header(http::header::AUTHORIZATION, token.header());
    }
    let req = req
        .body(body::full(body.unwrap_or_default()))
        .map_err(|e| unreachable(e.to_string()))?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| unreachable("no answer within 10 s".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    if !status.is_success() {
        return Err(ClientError::Status {
            status,
            body: String::from_utf8_lossy(&bytes).trim().to_owned(),
        });
    }
    Ok(bytes)
}

/// `GET path` on the admin API, handing each line of the streamed answer
/// to `line` as it arrives, until the agent ends the stream.
pub async fn stream_lines(
    admin: SocketAddr,
    token: Option<&AdminToken>,
    path: &str,
    line: impl FnMut(&str),
) -> Result<(), ClientError> {
    stream_lines_after_head(admin, token, path, |_| {}, line).await
}

/// [`stream_lines`], telling `head` the answer's headers first.
pub async fn stream_lines_after_head(
    admin: SocketAddr,
    token: Option<&AdminToken>,
    path: &str,
    head: impl FnOnce(&http::HeaderMap),
    mut line: impl FnMut(&str),
) -> Result<(), ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable {
        addr: admin,
        reason,
    };
    let client = body::http_client();
    let mut req = Request::builder().uri(format!("http://{admin}{path}"));
    if let Some(token) = token {
        req = req.header(http::header::AUTHORIZATION, token.header());
    }
    let req = req
        .body(body::empty())
        .map_err(|e| unreachable(e.to_string()))?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| unreachable("no answer within 10 s".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let status = response.status();
    if status.is_success() {
        head(response.headers());
    }
    let mut body = response.into_body();
    if !status.is_success() {
        let bytes = body
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        return Err(ClientError::Status {
            status,
            body: String::from_utf8_lossy(&bytes).trim().to_owned(),
        });
    }
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| unreachable(e.to_string()))?;
        if let Some(data) = frame.data_ref() {
            pending.extend_from_slice(data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let text: Vec<u8> = pending.drain(..=end).collect();
                line(String::from_utf8_lossy(&text).trim_end());
            }
        }
    }
    Ok(())
}
