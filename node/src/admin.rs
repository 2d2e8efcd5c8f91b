//! The admin HTTP API on loopback: `/v1/...`, `/health`, `/ready`,
//! `/metrics`. The CLI subcommands are thin clients of it.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tracing::debug;

use crate::agent::swim::Snapshot;
use crate::metrics::Metrics;

/// Largest request body the admin API reads.
const MAX_BODY: usize = 1 << 20;

/// Shared state of the admin handlers.
#[derive(Debug)]
pub struct AdminState {
    /// Membership as last published.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// Metrics registry.
    pub metrics: Metrics,
    /// Whether seeds were configured (affects readiness).
    pub has_seeds: bool,
    /// Set when one of the seeds turned out to be this node: then being
    /// alone is a valid start (the first node of a mesh), not a failure.
    pub self_seed: Arc<AtomicBool>,
    /// Notified when `POST /v1/leave` asks the agent to stop.
    pub leave: Arc<Notify>,
}

/// One row of `GET /v1/members`.
#[derive(Debug, Serialize)]
pub struct MemberJson {
    /// Node name.
    pub name: String,
    /// QUIC address.
    pub addr: String,
    /// alive | suspect | down | left.
    pub state: &'static str,
    /// SWIM incarnation.
    pub incarnation: u16,
    /// Generation (renewed on restart or rejoin).
    pub generation: u64,
    /// Whether this row is the answering agent.
    #[serde(rename = "self")]
    pub is_self: bool,
}

/// Serves the admin API until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "admin connection error");
            }
        });
    }
}

type Body = Full<Bytes>;

/// A JSON response.
pub fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(value).expect("serializable");
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body.into()))
        .expect("valid response")
}

/// A JSON error `{"error": msg}`.
pub fn error(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    json(status, &serde_json::json!({ "error": msg.into() }))
}

async fn route(state: &AdminState, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // Bodies are not used yet by any route, but are drained (capped) so
    // keep-alive connections stay usable.
    let _ = http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await;
    match (&method, path.as_str()) {
        (&Method::GET, "/health") => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        (&Method::GET, "/ready") => ready(state),
        (&Method::GET, "/metrics") => Response::builder()
            .header(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(state.metrics.render().into()))
            .expect("valid response"),
        (&Method::GET, "/v1/members") => json(StatusCode::OK, &members(&state.snapshot.borrow())),
        (&Method::GET, "/v1/agent") => agent(&state.snapshot.borrow()),
        (&Method::POST, "/v1/leave") => {
            state.leave.notify_one();
            json(StatusCode::OK, &serde_json::json!({"leaving": true}))
        }
        (_, "/health" | "/ready" | "/metrics" | "/v1/members" | "/v1/agent" | "/v1/leave") => {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}"),
            )
        }
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

fn ready(state: &AdminState) -> Response<Body> {
    let s = state.snapshot.borrow().clone();
    let alone_ok = !state.has_seeds || state.self_seed.load(Ordering::Relaxed);
    let ok = !s.left && (s.joined || alone_ok);
    let reason = if s.left {
        "left the mesh"
    } else if ok {
        "ready"
    } else {
        "not joined yet: no seed or saved member has answered"
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(
        status,
        &serde_json::json!({"ready": ok, "reason": reason, "active_members": s.active}),
    )
}

/// The member table, this node first.
pub fn members(s: &Snapshot) -> Vec<MemberJson> {
    let local = MemberJson {
        name: s.local.name.clone(),
        addr: s.local.addr.to_string(),
        state: if s.left { "left" } else { "alive" },
        incarnation: s.local_incarnation,
        generation: s.local.generation,
        is_self: true,
    };
    std::iter::once(local)
        .chain(s.members.iter().map(|m| MemberJson {
            name: m.id.name.clone(),
            addr: m.id.addr.to_string(),
            state: m.state.as_str(),
            incarnation: m.incarnation,
            generation: m.id.generation,
            is_self: false,
        }))
        .collect()
}

fn agent(s: &Snapshot) -> Response<Body> {
    json(
        StatusCode::OK,
        &serde_json::json!({
            "name": s.local.name,
            "addr": s.local.addr.to_string(),
            "generation": s.local.generation,
            "version": env!("CARGO_PKG_VERSION"),
        }),
    )
}
