//! A small HTTP service for demos, tests and the docker-compose cluster:
//! it says which instance answered, and has endpoints to exercise a mesh
//! (slow answers, failures, large bodies, streaming, upgrades).
//!
//! | route | answer |
//! |---|---|
//! | `GET /health` | 200, or the status set with `POST /admin/health?status=N` |
//! | `GET /slow?ms=N` | waits N ms, then answers |
//! | `GET /fail` | 500 |
//! | `POST /admin/fault?status=N&delay_ms=M` | from now on, every request below waits M ms, then gets N (0: its normal answer) |
//! | `GET /admin/stats` | `{"requests", "in_flight", "max_in_flight"}` of the requests below |
//! | `POST /admin/stats/reset` | zeroes those counts |
//! | `POST /upload` | reads the body, answers `{"bytes": N}` |
//! | `GET /download?bytes=N` | streams N bytes |
//! | `POST /echo` | streams the request body back, then trailers `grpc-status: 0` |
//! | `Upgrade:` requests | 101, then echoes raw bytes |
//! | anything else | `{"instance", "method", "path", "headers"}` |
//!
//! Counts and faults apply to every request except `/health` and
//! `/admin/...`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::observe::access::Logged;
use crate::proxy::body::{self, BoxError, ProxyBody};

#[derive(Debug, Default)]
struct State {
    name: String,
    health: AtomicU16,
    /// Status every counted request gets (0: its normal answer).
    fault_status: AtomicU16,
    /// Wait before answering a counted request.
    fault_delay_ms: AtomicU64,
    requests: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

/// A counted request in flight, until dropped (also when the caller goes
/// away mid-request).
struct Counted<'a>(&'a State);

impl<'a> Counted<'a> {
    fn new(state: &'a State) -> Self {
        state.requests.fetch_add(1, Ordering::Relaxed);
        let now = state.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        state.max_in_flight.fetch_max(now, Ordering::AcqRel);
        Self(state)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves the demo service on `listener` until `stop` flips (then every
/// open connection is dropped too, like a crashed process).
pub async fn serve_until(
    listener: TcpListener,
    name: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let state = Arc::new(State {
        name,
        health: AtomicU16::new(200),
        ..State::default()
    });
    let handler = crate::listener::handler(move |req, _peer| {
        let answer = handle(state.clone(), req);
        async move {
            let Ok(response) = answer.await;
            response.map(Logged::plain)
        }
    });
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let Ok((stream, peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let conn = crate::listener::serve_connection(stream, peer, handler);
            tokio::select! {
                _ = conn => {}
                _ = stop.changed() => {}
            }
        });
    }
}

/// Serves the demo service on `listener` forever.
pub async fn serve(listener: TcpListener, name: String) {
    let (_keep, stop) = tokio::sync::watch::channel(false);
    serve_until(listener, name, stop).await;
}

/// Binds and serves (for `gossamer demo-service`).
pub async fn run(listen: SocketAddr, name: String) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    tracing::info!(%listen, %name, "demo service listening");
    serve(listener, name).await;
    Ok(())
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k == key).then(|| v.parse().ok())?
    })
}

fn text(status: StatusCode, name: &str, body: String) -> Response<ProxyBody> {
    Response::builder()
        .status(status)
        .header("x-served-by", name)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body::full(body))
        .expect("valid")
}

async fn handle(
    state: Arc<State>,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let name = state.name.clone();
    if req.headers().contains_key(http::header::UPGRADE) {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(io) = on.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(io));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let proto = req.headers()[http::header::UPGRADE].clone();
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::UPGRADE, proto)
            .header(http::header::CONNECTION, "upgrade")
            .header("x-served-by", name)
            .body(body::empty())
            .expect("valid"));
    }
    let path = req.uri().path().to_owned();
    let _counted = if path == "/health" || path.starts_with("/admin/") {
        None
    } else {
        let counted = Counted::new(&state);
        let delay = state.fault_delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let status = state.fault_status.load(Ordering::Relaxed);
        if let Some(status) = StatusCode::from_u16(status).ok().filter(|_| status != 0) {
            return Ok(text(
                status,
                &name,
                format!(
                    "{{\"instance\": \"{name}\", \"fault\": {}}}\n",
                    status.as_u16()
                ),
            ));
        }
        Some(counted)
    };
    let response = match (req.method().as_str(), path.as_str()) {
        (_, "/health") => {
            let code = state.health.load(Ordering::Relaxed);
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
            text(
                status,
                &name,
                format!("{{\"instance\": \"{name}\", \"health\": {code}}}\n"),
            )
        }
        ("POST", "/admin/health") => {
            let code = query(&req, "status").unwrap_or(200) as u16;
            state.health.store(code, Ordering::Relaxed);
            text(StatusCode::OK, &name, format!("{{\"health\": {code}}}\n"))
        }
        ("POST", "/admin/fault") => {
            let status = query(&req, "status").unwrap_or(0).min(599) as u16;
            let delay = query(&req, "delay_ms").unwrap_or(0).min(600_000);
            state.fault_status.store(status, Ordering::Relaxed);
            state.fault_delay_ms.store(delay, Ordering::Relaxed);
            text(
                StatusCode::OK,
                &name,
                format!("{{\"status\": {status}, \"delay_ms\": {delay}}}\n"),
            )
        }
        ("GET", "/admin/stats") => text(
            StatusCode::OK,
            &name,
            format!(
                "{{\"requests\": {}, \"in_flight\": {}, \"max_in_flight\": {}}}\n",
                state.requests.load(Ordering::Relaxed),
                state.in_flight.load(Ordering::Relaxed),
                state.max_in_flight.load(Ordering::Relaxed)
            ),
        ),
        ("POST", "/admin/stats/reset") => {
            state.requests.store(0, Ordering::Relaxed);
            state
                .max_in_flight
                .store(state.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
            text(StatusCode::OK, &name, "{\"reset\": true}\n".into())
        }
        (_, "/fail") => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &name,
            format!("{{\"instance\": \"{name}\", \"error\": \"asked to fail\"}}\n"),
        ),
        (_, "/slow") => {
            let ms = query(&req, "ms").unwrap_or(1000).min(600_000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            text(
                StatusCode::OK,
                &name,
                format!("{{\"instance\": \"{name}\", \"slept_ms\": {ms}}}\n"),
            )
        }
        ("POST", "/upload") => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => break,
                }
            }
            text(
                StatusCode::OK,
                &name,
                format!("{{\"instance\": \"{name}\", \"bytes\": {n}}}\n"),
            )
        }
        ("GET", "/download") => {
            let total = query(&req, "bytes").unwrap_or(1024).min(1 << 34);
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                let mut left = total;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if tx.send(Ok(Frame::data(chunk.slice(..n)))).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            });
            Response::builder()
                .header("x-served-by", &name)
                .header(http::header::CONTENT_LENGTH, total)
                .body(channel_body(rx))
                .expect("valid")
        }
        ("POST", "/echo") => {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
            let mut body = req.into_body();
            tokio::spawn(async move {
                while let Some(frame) = body.frame().await {
                    let Ok(frame) = frame else { return };
                    if let Ok(data) = frame.into_data()
                        && tx.send(Ok(Frame::data(data))).await.is_err()
                    {
                        return;
                    }
                }
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().expect("valid"));
                let _ = tx.send(Ok(Frame::trailers(trailers))).await;
            });
            Response::builder()
                .header("x-served-by", &name)
                .header(http::header::CONTENT_TYPE, "application/grpc")
                // HTTP/1.1 sends trailers only when the head announces them.
                .header(http::header::TRAILER, "grpc-status")
                .body(channel_body(rx))
                .expect("valid")
        }
        _ => {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into(),
                    )
                })
                .collect();
            let body = serde_json::json!({
                "instance": name,
                "method": req.method().as_str(),
                "path": path,
                "headers": headers,
            });
            text(StatusCode::OK, &name, format!("{body}\n"))
        }
    };
    Ok(response)
}

fn channel_body(rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>) -> ProxyBody {
    body::from_channel(rx)
}
