//! The CLI side of the admin API.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::AdminToken;

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
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
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
        .body(Full::new(body.unwrap_or_default().into()))
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
