//! The admin HTTP API on loopback: `/v1/...`, `/health`, `/ready`,
//! `/metrics`. The CLI subcommands are thin clients of it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use crate::catalog::registry::{AgentListeners, ServiceSpec};
use crate::catalog::{CatalogHandle, RegisterError, view};
use crate::config::AdminToken;
use crate::listener::{self, Limits, ListenerMetrics};
use crate::members::Snapshot;
use crate::metrics::Metrics;
use crate::observe::access::Logged;
use crate::proxy::routes::HashPolicy;
use gossamer_transport::Transport;
use gossamer_transport::pki::Hosts;

/// Largest request body the admin API reads.
const MAX_BODY: usize = 1 << 20;

/// Shared state of the admin handlers.
#[derive(Debug)]
pub struct AdminState {
    /// Membership as last published.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// Metrics registry.
    pub metrics: Metrics,
    /// Whether seeds were configured (affects readiness: alone is a valid
    /// start only for the first node of a mesh, which has no seeds or is
    /// one of them).
    pub has_seeds: bool,
    /// Notified when `POST /v1/leave` asks the agent to stop.
    pub leave: Arc<Notify>,
    /// The catalog task.
    pub catalog: CatalogHandle,
    /// The transport (for fault injection).
    pub transport: Transport,
    /// Whether `/v1/debug/*` is served.
    pub fault_injection: bool,
    /// The data plane (for `/v1/route`).
    pub proxy: Arc<crate::proxy::Proxy>,
    /// Required on writes when set.
    pub token: Option<AdminToken>,
    /// Listeners no registration may point at.
    pub listeners: AgentListeners,
    /// Upstream listeners.
    pub upstreams: Arc<crate::upstreams::Upstreams>,
    /// Configuration documents.
    pub documents: Arc<crate::documents::Documents>,
    /// Requests to the mesh task (document notices).
    pub commands: tokio::sync::mpsc::Sender<crate::members::Command>,
}

/// One row of `GET /v1/members`.
#[derive(Debug, Serialize)]
pub struct MemberJson {
    /// Node name.
    pub name: String,
    /// QUIC address.
    pub addr: String,
    /// alive | suspect | down | left | revoked.
    pub state: &'static str,
    /// Why, when the state needs explaining (revoked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// SWIM incarnation.
    pub incarnation: u16,
    /// Generation (renewed on restart or rejoin).
    pub generation: u64,
    /// Whether this row is the answering agent.
    #[serde(rename = "self")]
    pub is_self: bool,
}

/// Serves the admin API until `tasks` drain.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    limits: Limits,
    metrics: ListenerMetrics,
    tasks: crate::tasks::Tasks,
) {
    let handler = move |req: Request<Incoming>, _peer| {
        let state = state.clone();
        async move {
            if req.method() == Method::GET && req.uri().path() == "/v1/tap" {
                return tap(&state, &req);
            }
            if req.method() == Method::GET && req.uri().path() == "/v1/events" {
                return events(&state, &req);
            }
            route(&state, req, limits.header_read_timeout)
                .await
                .map(Either::Left)
        }
    };
    let handler = listener::handler(move |req, peer| {
        let response = handler(req, peer);
        async move {
            response
                .await
                .map(|body| Logged::plain(body.boxed_unsync()))
        }
    });
    listener::serve(listener, "admin", limits, metrics, tasks, handler).await;
}

type Body = Full<Bytes>;

/// `GET /v1/tap?service=&path=&method=&status=&max_rate=&headers=`: the
/// requests this agent carries, as NDJSON while they happen. With an admin
/// token configured, it is required here too (the stream shows traffic).
fn tap(
    state: &AdminState,
    req: &Request<Incoming>,
) -> Response<Either<Body, crate::observe::tap::Stream>> {
    if let Some(token) = &state.token
        && !token.accepts(
            req.headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        )
    {
        return error(
            StatusCode::UNAUTHORIZED,
            "the tap needs the admin token: send Authorization: Bearer TOKEN",
        )
        .map(Either::Left);
    }
    match crate::observe::tap::Filter::parse(req.uri().query().unwrap_or("")) {
        Err(e) => error(StatusCode::BAD_REQUEST, e).map(Either::Left),
        Ok(filter) => Response::builder()
            .header(header::CONTENT_TYPE, "application/x-ndjson")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Either::Right(crate::observe::tap::watch(
                state.proxy.tap(),
                filter,
            )))
            .expect("valid response"),
    }
}

/// `GET /v1/events?after=ID&type=member,service&service=NAME&format=sse`:
/// the agent's events as they happen, after those still kept past `after`
/// (or SSE's `Last-Event-ID`). NDJSON, or server-sent events when asked
/// for by `format=sse` or `Accept: text/event-stream`.
fn events(
    state: &AdminState,
    req: &Request<Incoming>,
) -> Response<Either<Body, crate::observe::tap::Stream>> {
    use crate::events::{Filter, Format, Kind};
    let query = req.uri().query().unwrap_or("");
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let after = match query_param(query, "after").or_else(|| header("last-event-id")) {
        None => None,
        Some(text) => match text.trim().parse::<u64>() {
            Ok(id) => Some(id),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "after: an event id (a whole number)",
                )
                .map(Either::Left);
            }
        },
    };
    let kinds = match query_param(query, "type") {
        None => Ok(Vec::new()),
        Some(list) => list
            .split(',')
            .filter(|t| !t.is_empty())
            .map(Kind::parse)
            .collect::<Result<Vec<_>, _>>(),
    };
    let kinds = match kinds {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("type: {e}")).map(Either::Left),
    };
    let sse = match query_param(query, "format").as_deref() {
        Some("sse") => true,
        Some("ndjson") => false,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("format: sse or ndjson, not {other:?}"),
            )
            .map(Either::Left);
        }
        None => header("accept").is_some_and(|a| a.contains("text/event-stream")),
    };
    let filter = Filter {
        kinds,
        service: query_param(query, "service"),
    };
    let (format, content_type) = if sse {
        (Format::Sse, "text/event-stream")
    } else {
        (Format::Ndjson, "application/x-ndjson")
    };
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-gossamer-latest-event", state.proxy.events.latest())
        .body(Either::Right(crate::events::stream(
            state.proxy.events.clone(),
            after,
            filter,
            format,
        )))
        .expect("valid response")
}

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

/// Refuses a write that lacks the token or is not JSON. Requiring JSON on
/// every write also keeps web pages out: a browser cannot send
/// `application/json` to another origin without a preflight we never allow.
fn check_write(state: &AdminState, req: &Request<Incoming>) -> Option<Response<Body>> {
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return None;
    }
    if let Some(token) = &state.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        if !token.accepts(given) {
            return Some(error(
                StatusCode::UNAUTHORIZED,
                "writes need the admin token: send Authorization: Bearer TOKEN (the CLI reads it from --admin-token-file)",
            ));
        }
    }
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    (!json).then(|| {
        error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "writes take JSON only: send Content-Type: application/json",
        )
    })
}

async fn route(
    state: &AdminState,
    req: Request<Incoming>,
    body_timeout: Duration,
) -> Response<Body> {
    if let Some(refused) = check_write(state, &req) {
        return refused;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let read = http_body_util::Limited::new(req.into_body(), MAX_BODY).collect();
    let body = match tokio::time::timeout(body_timeout, read).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => return error(StatusCode::PAYLOAD_TOO_LARGE, "request body over 1 MiB"),
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!("request body not received within {body_timeout:?}"),
            );
        }
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["health"]) => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        (&Method::GET, ["ready"]) => ready(state),
        (&Method::GET, ["metrics"]) => Response::builder()
            .header(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(state.metrics.render().into()))
            .expect("valid response"),
        (&Method::GET, ["ui"]) => Response::builder()
            .status(StatusCode::PERMANENT_REDIRECT)
            .header(header::LOCATION, "/ui/")
            .body(Full::new(Bytes::new()))
            .expect("valid response"),
        (&Method::GET, ["ui", name]) => match crate::console::asset(name) {
            Some((content_type, body)) => Response::builder()
                .header(header::CONTENT_TYPE, content_type)
                .header(header::CACHE_CONTROL, "no-cache")
                .header(
                    "content-security-policy",
                    crate::console::CONTENT_SECURITY_POLICY,
                )
                .header("x-content-type-options", "nosniff")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .expect("valid response"),
            None => error(
                StatusCode::NOT_FOUND,
                format!("no such console file: {name}"),
            ),
        },
        (&Method::GET, ["v1", "members"]) => {
            json(StatusCode::OK, &members(&state.snapshot.borrow()))
        }
        (&Method::GET, ["v1", "agent"]) => agent(&state.snapshot.borrow(), &state.transport),
        (&Method::POST, ["v1", "leave"]) => {
            state.leave.notify_one();
            json(StatusCode::OK, &serde_json::json!({"leaving": true}))
        }
        (&Method::GET, ["v1", "catalog"]) => catalog(state),
        (&Method::POST, ["v1", "config"]) => apply_document(state, &body).await,
        (&Method::GET, ["v1", "config"]) => config_list(state, &query),
        (&Method::GET, ["v1", "config", kind, name]) => config_get(state, kind, name),
        (&Method::GET, ["v1", "route"]) => route_of(state, &query),
        (&Method::GET, ["v1", "stats"]) => stats(state, &query).await,
        (&Method::GET, ["v1", "authz", "check"]) => authz_check(state, &query),
        (&Method::GET, ["v1", "services", name]) => service(state, name),
        (&Method::GET, ["v1", "agent", "services"]) => local_services(state),
        (&Method::PUT, ["v1", "agent", "services", id]) => register(state, id, &body).await,
        (&Method::GET, ["v1", "agent", "upstreams"]) => upstreams_list(state),
        (&Method::PUT, ["v1", "agent", "upstreams", service]) => {
            upstream_put(state, service, &body).await
        }
        (&Method::DELETE, ["v1", "agent", "upstreams", service]) => {
            match state.upstreams.delete(service).await {
                Ok(()) => json(StatusCode::OK, &serde_json::json!({"service": service})),
                Err(e) => upstream_error(e),
            }
        }
        (&Method::DELETE, ["v1", "agent", "services", id]) => {
            match state.catalog.deregister((*id).to_owned()).await {
                Ok(version) => json(
                    StatusCode::OK,
                    &serde_json::json!({"id": id, "version": version}),
                ),
                Err(e) => register_error(e),
            }
        }
        (_, ["v1", "debug", "partition"]) if state.fault_injection => {
            partition(state, &method, &body)
        }
        (_, ["v1", "debug", ..]) => error(
            StatusCode::NOT_FOUND,
            "fault injection is disabled (start the agent with --enable-fault-injection)",
        ),
        (
            _,
            ["health" | "ready" | "metrics"]
            | ["v1", "members" | "agent" | "leave" | "catalog" | "config"]
            | ["v1", "config", _, _],
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        ),
        _ => {
            let _ = query;
            error(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {method} {path}"),
            )
        }
    }
}

/// The agent's listeners a registration may not point at, the upstream
/// listeners running now included.
fn own_listeners(state: &AdminState) -> AgentListeners {
    let mut own = state.listeners.clone();
    own.0.extend(
        state
            .upstreams
            .list()
            .into_iter()
            .map(|(u, _)| ("upstream", u.listen)),
    );
    own
}

async fn register(state: &AdminState, id: &str, body: &[u8]) -> Response<Body> {
    let value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body: not JSON ({e})")),
    };
    let spec = match ServiceSpec::from_json(Some(id), &value)
        .and_then(|s| HashPolicy::parse(&s.hash_policy).map(|_| s))
        .and_then(|s| own_listeners(state).check(&s).map(|()| s))
    {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match state.catalog.register(spec).await {
        Ok(version) => json(
            StatusCode::OK,
            &serde_json::json!({"id": id, "version": version}),
        ),
        Err(e) => register_error(e),
    }
}

fn upstream_row(spec: &crate::upstreams::UpstreamSpec, from_config: bool) -> serde_json::Value {
    serde_json::json!({
        "service": spec.service,
        "listen": spec.listen.to_string(),
        "hash": spec.hash,
        "source": if from_config { "config" } else { "api" },
    })
}

fn upstreams_list(state: &AdminState) -> Response<Body> {
    let rows: Vec<serde_json::Value> = state
        .upstreams
        .list()
        .iter()
        .map(|(s, c)| upstream_row(s, *c))
        .collect();
    json(StatusCode::OK, &rows)
}

async fn upstream_put(state: &AdminState, service: &str, body: &[u8]) -> Response<Body> {
    let value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body: not JSON ({e})")),
    };
    let spec = match crate::upstreams::UpstreamSpec::from_json(Some(service), &value) {
        Ok(s) => s,
        Err(e) => return upstream_error(e),
    };
    match state.upstreams.put(spec).await {
        Ok(spec) => json(StatusCode::OK, &upstream_row(&spec, false)),
        Err(e) => upstream_error(e),
    }
}

fn upstream_error(e: crate::upstreams::UpstreamError) -> Response<Body> {
    use crate::upstreams::UpstreamError as E;
    let status = match &e {
        E::Invalid(_) | E::Bind { .. } | E::TooMany => StatusCode::BAD_REQUEST,
        E::ConfigOwned(_) => StatusCode::CONFLICT,
        E::UnknownService(_) | E::NotFound(_) => StatusCode::NOT_FOUND,
    };
    error(status, e.to_string())
}

/// One document's status, as `GET /v1/config` shows it.
fn document_row(h: &crate::documents::Held) -> serde_json::Value {
    let env = &h.envelope;
    serde_json::json!({
        "kind": env.kind,
        "name": env.name,
        "version": h.stamp.version,
        "digest": h.stamp.digest_hex(),
        "signer": h.signer,
        "applied_at_ms": h.applied_at_ms,
        "source": h.source,
        "status": if env.deleted { "deleted" } else { "active" },
    })
}

async fn apply_document(state: &AdminState, body: &[u8]) -> Response<Body> {
    use crate::documents::envelope::{DocError, Envelope, EnvelopeJson};
    use crate::documents::{Outcome, Source};
    let parsed: EnvelopeJson = match serde_json::from_slice(body) {
        Ok(j) => j,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body: not a document envelope ({e})"),
            );
        }
    };
    let env = match Envelope::from_json(&parsed) {
        Ok(env) => env,
        Err(e) => {
            let env = Envelope {
                kind: parsed.kind.clone(),
                name: parsed.name.clone(),
                version: parsed.version,
                deleted: parsed.deleted,
                body: String::new(),
                scheme: 0,
                signer_cert: Vec::new(),
                signature: Vec::new(),
            };
            state.documents.refuse(&env, Source::Api, &e);
            return error(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let key = (env.kind.clone(), env.name.clone());
    match state.documents.apply(env, Source::Api) {
        Ok(Outcome::Applied { stamp, previous }) => {
            let held = state.documents.get(&key.0, &key.1);
            let _ = state
                .commands
                .send(crate::members::Command::PublishDoc(key.clone(), stamp))
                .await;
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "kind": key.0,
                    "name": key.1,
                    "version": stamp.version,
                    "digest": stamp.digest_hex(),
                    "signer": held.map(|h| h.signer),
                    "previous_version": previous.map(|p| p.stamp.version),
                }),
            )
        }
        Ok(Outcome::Kept(_)) => error(StatusCode::CONFLICT, "a newer version is in force"),
        Err(e @ DocError::Stale { .. }) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e @ DocError::Full(_)) => error(StatusCode::INSUFFICIENT_STORAGE, e.to_string()),
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

fn config_list(state: &AdminState, query: &str) -> Response<Body> {
    let kind = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("kind="))
        .filter(|k| !k.is_empty());
    let docs: Vec<serde_json::Value> = state
        .documents
        .all()
        .iter()
        .filter(|h| kind.is_none_or(|k| h.envelope.kind == k))
        .map(document_row)
        .collect();
    let snapshot = state.snapshot.borrow().clone();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "documents": docs,
            "synced": snapshot.docs_synced,
            "wanted": snapshot.docs_wanted,
            "refused": state.documents.refusals(),
        }),
    )
}

fn config_get(state: &AdminState, kind: &str, name: &str) -> Response<Body> {
    match state.documents.get(kind, name) {
        Some(h) => {
            let mut row = document_row(&h);
            row["envelope"] = serde_json::to_value(h.envelope.to_json()).unwrap_or_default();
            json(StatusCode::OK, &row)
        }
        None => error(StatusCode::NOT_FOUND, format!("no document {kind} {name}")),
    }
}

fn register_error(e: RegisterError) -> Response<Body> {
    let status = match &e {
        RegisterError::NotFound(_) => StatusCode::NOT_FOUND,
        RegisterError::ConfigOwned(_) | RegisterError::TooMany => StatusCode::CONFLICT,
        RegisterError::Persist(_) => StatusCode::INTERNAL_SERVER_ERROR,
        RegisterError::Closed => StatusCode::SERVICE_UNAVAILABLE,
        RegisterError::NotInCertificate { .. } => StatusCode::FORBIDDEN,
    };
    error(status, e.to_string())
}

fn catalog(state: &AdminState) -> Response<Body> {
    let catalog = state.catalog.shared.catalog.borrow().clone();
    let members = state.snapshot.borrow().clone();
    let nodes: std::collections::BTreeMap<&str, serde_json::Value> = catalog
        .entries()
        .map(|e| {
            (
                e.node.as_str(),
                serde_json::json!({
                    "version": e.version,
                    "services": e.services.len(),
                    "available": members.is_available(&e.node),
                }),
            )
        })
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({ "services": view::services(&catalog, &members), "nodes": nodes }),
    )
}

/// The first value of `name` in a query string, percent-decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

/// A request as a query string describes it: `method`, `path` and any
/// number of `header=NAME:VALUE`.
fn described_request(query: &str) -> Option<http::request::Parts> {
    let mut req = http::Request::builder()
        .method(query_param(query, "method").as_deref().unwrap_or("GET"))
        .uri(query_param(query, "path").unwrap_or_else(|| "/".into()));
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix("header=")
            && let Some((name, value)) = percent_decode(v).split_once(':')
        {
            req = req.header(name.trim(), value.trim());
        }
    }
    Some(req.body(()).ok()?.into_parts().0)
}

/// Peers asked at most for a mesh-wide view, unless `peers=` says fewer.
const MAX_STATS_PEERS: usize = 64;
/// Peers asked at once.
const STATS_FAN_OUT: usize = 16;

/// `GET /v1/stats?window=10s&mesh=true&peers=N&service=NAME&by_node=true`: requests,
/// req/s, success rate and p50/p90/p99 per service (each way through this
/// agent) and per route arm, over the window (up to 60 s). With
/// `mesh=true` the active peers (at most `peers`, default and cap 64,
/// chosen at random) are asked too and their histograms merged; peers that
/// do not answer within 2 s are listed under `unanswered`. With `by_node`
/// the rows are each agent's, with its name, instead of merged.
async fn stats(state: &AdminState, query: &str) -> Response<Body> {
    use crate::observe::stats;
    let window = match query_param(query, "window") {
        None => Duration::from_secs(10),
        Some(text) => match gossamer_membership::duration::parse(&text) {
            Ok(d) if d >= stats::SLOT && d <= stats::MAX_WINDOW => d,
            Ok(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("window: from {:?} to {:?}", stats::SLOT, stats::MAX_WINDOW),
                );
            }
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("window: {e}")),
        },
    };
    let mesh = match query_param(query, "mesh").as_deref() {
        None | Some("false" | "0") => false,
        Some("true" | "1" | "") => true,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("mesh: true or false, not {other:?}"),
            );
        }
    };
    let max_peers = match query_param(query, "peers").map(|p| p.parse::<usize>()) {
        None => MAX_STATS_PEERS,
        Some(Ok(n)) => n.min(MAX_STATS_PEERS),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "peers: a whole number"),
    };
    let by_node = matches!(
        query_param(query, "by_node").as_deref(),
        Some("true" | "1" | "")
    );
    let service = query_param(query, "service");
    let local = state.snapshot.borrow().local.name.clone();
    let (mut rows, mut seconds) = state.proxy.stats().window(window);
    let mut per_node = vec![(local.clone(), rows.clone())];
    let mut answered = vec![local];
    let mut unanswered = Vec::new();
    if mesh {
        let mut peers: Vec<_> = state
            .snapshot
            .borrow()
            .members
            .iter()
            .filter(|m| m.state.is_active())
            .map(|m| (m.id.name.clone(), m.id.addr))
            .collect();
        if peers.len() > max_peers {
            use rand::seq::SliceRandom;
            peers.shuffle(&mut rand::rng());
            peers.truncate(max_peers);
        }
        let transport = state.transport.clone();
        let mut asks = tokio::task::JoinSet::new();
        let mut pending = peers.into_iter();
        let mut start = |asks: &mut tokio::task::JoinSet<_>| {
            if let Some((name, addr)) = pending.next() {
                let transport = transport.clone();
                asks.spawn(async move {
                    let got = stats::ask(&transport, &name, addr, window).await;
                    (name, got)
                });
            }
        };
        for _ in 0..STATS_FAN_OUT {
            start(&mut asks);
        }
        while let Some(joined) = asks.join_next().await {
            start(&mut asks);
            let Ok((name, got)) = joined else { continue };
            match got {
                Ok((theirs, secs)) => {
                    if by_node {
                        per_node.push((name.clone(), theirs.clone()));
                    }
                    stats::merge(&mut rows, theirs);
                    seconds = seconds.max(secs);
                    answered.push(name);
                }
                Err(e) => unanswered.push(serde_json::json!({"node": name, "error": e})),
            }
        }
    }
    let wanted = |r: &&stats::Row| service.as_ref().is_none_or(|s| *s == r.service);
    let summaries: Vec<_> = if by_node {
        per_node
            .iter()
            .flat_map(|(node, rows)| {
                rows.iter().filter(wanted).map(move |r| stats::Summary {
                    node: Some(node.clone()),
                    ..stats::Summary::of(r, seconds)
                })
            })
            .collect()
    } else {
        rows.iter()
            .filter(wanted)
            .map(|r| stats::Summary::of(r, seconds))
            .collect()
    };
    answered.sort();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "window_seconds": seconds,
            "nodes": answered,
            "unanswered": unanswered,
            "rows": summaries,
        }),
    )
}

/// `GET /v1/authz/check?from=NODE&to=SERVICE&path=&method=&services=a,b`:
/// what this agent would decide for such a call to its instance of `to`,
/// and which rule decided. The caller's services are `services` if given,
/// else what its certificate names (known for this node and for peers it
/// is connected to), else none.
fn authz_check(state: &AdminState, query: &str) -> Response<Body> {
    let (Some(from), Some(to)) = (query_param(query, "from"), query_param(query, "to")) else {
        return error(
            StatusCode::BAD_REQUEST,
            "from and to: required, as /v1/authz/check?from=NODE&to=SERVICE&path=/x&method=GET",
        );
    };
    let Some(parts) = described_request(query) else {
        return error(StatusCode::BAD_REQUEST, "method, path or header: not valid");
    };
    let (hosts, known_by) = match query_param(query, "services") {
        Some(list) => (
            Hosts::Only(
                list.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
            "the query",
        ),
        None if from == state.transport.name() => {
            (state.transport.hosts(), "this node's certificate")
        }
        None => match state.transport.peer_hosts(&from) {
            Some(h) => ((*h).clone(), "its certificate, on the open connection"),
            None => (Hosts::Only(Vec::new()), "nothing (no connection to it now)"),
        },
    };
    let table = state.proxy.authz();
    let request = crate::proxy::authz::Request {
        method: &parts.method,
        path: parts.uri.path(),
        headers: &parts.headers,
    };
    let caller = crate::proxy::authz::Caller {
        node: &from,
        hosts: &hosts,
    };
    let d = table.decide(&to, caller, request);
    let doc = table.services.get(&to);
    json(
        StatusCode::OK,
        &serde_json::json!({
            "from": from,
            "caller_services": hosts.to_string(),
            "caller_services_from": known_by,
            "to": to,
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "allowed": d.allowed,
            "decision": d.decision,
            "rule": d.rule_label(),
            "authz_version": doc.map(|a| a.version),
            "mesh_default": table.mesh_default.map(|m| m.as_str()),
            "why": if d.governed {
                format!("{} by authz {to} {}", d.decision, d.rule_label())
            } else {
                "no authz document applies: allowed".to_owned()
            },
        }),
    )
}

fn route_of(state: &AdminState, query: &str) -> Response<Body> {
    let param = |name: &str| query_param(query, name);
    let Some(service) = param("service") else {
        return error(
            StatusCode::BAD_REQUEST,
            "service: required, as /v1/route?service=NAME&key=KEY",
        );
    };
    let key = param("key").unwrap_or_default();
    let routes = state.proxy.routes();
    let Some(mut route) = routes.services.get(&service).cloned() else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no service named {service:?} in the catalog"),
        );
    };
    let hash = crate::balance::rendezvous::hash_key(key.as_bytes());
    // Under a route document: which rule the described request matches
    // and which arm its key takes, as the proxy would decide.
    let mut explained = serde_json::json!({});
    if let Some(policy) = routes.policies.get(&service) {
        let Some(parts) = described_request(query) else {
            return error(StatusCode::BAD_REQUEST, "method, path or header: not valid");
        };
        let matched = policy.rule_for(&parts);
        let arms = policy.arms_for(matched.map(|(_, r)| r));
        let rule = matched.map_or_else(|| "default".to_owned(), |(i, _)| i.to_string());
        explained = serde_json::json!({"route_version": policy.version, "rule": rule});
        if !arms.is_empty() {
            let Some(i) = crate::proxy::policy::choose_arm(arms, hash) else {
                return error(StatusCode::SERVICE_UNAVAILABLE, "no arm with a weight");
            };
            let arm = &arms[i];
            explained["arm"] = arm.label.clone().into();
            let target = match &arm.subset {
                None => routes.services.get(&arm.service).cloned(),
                Some(_) => routes.subsets.get(&arm.label).cloned(),
            };
            let Some(target) = target else {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("route {service} rule {rule}: no instance of {}", arm.label),
                );
            };
            route = target;
        }
    }
    let first = route
        .table()
        .lookup(hash)
        .map(|i| route.backends[i].key.clone());
    match state.proxy.pick(&route, hash, &[]) {
        Some(i) => {
            let b = &route.backends[i];
            let mut answer = serde_json::json!({
                "service": service, "key": key, "instance": b.id, "node": &*b.node,
                "address": b.address, "port": b.port, "local": b.local,
                "failover": first.as_deref() != Some(&*b.key),
            });
            if let (Some(a), Some(e)) = (answer.as_object_mut(), explained.as_object()) {
                a.extend(e.clone());
            }
            json(StatusCode::OK, &answer)
        }
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no healthy instance of {service:?}"),
        ),
    }
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                if let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn service(state: &AdminState, name: &str) -> Response<Body> {
    let catalog = state.catalog.shared.catalog.borrow().clone();
    let members = state.snapshot.borrow().clone();
    match view::services(&catalog, &members).remove(name) {
        Some(instances) => json(StatusCode::OK, &instances),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no service named {name:?} in the catalog"),
        ),
    }
}

fn local_services(state: &AdminState) -> Response<Body> {
    let local = state.catalog.shared.local.borrow().clone();
    json(
        StatusCode::OK,
        &serde_json::json!({"version": local.version, "services": local.services.iter().map(|s| serde_json::json!({
        "id": s.id, "name": s.name, "address": s.address, "port": s.port, "tags": s.tags,
        "version": s.version, "weight": s.weight, "hash_policy": s.hash_policy, "protocol": s.protocol.as_str(), "health": s.health.as_str(),
    })).collect::<Vec<_>>()}),
    )
}

fn partition(state: &AdminState, method: &Method, body: &[u8]) -> Response<Body> {
    match *method {
        Method::POST => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Partition {
                peers: Vec<String>,
            }
            let req: Partition = match serde_json::from_slice(body) {
                Ok(r) => r,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("peers: expected {{\"peers\": [\"n4\", ...]}} ({e})"),
                    );
                }
            };
            if let Some(bad) = req
                .peers
                .iter()
                .find(|p| gossamer_membership::identity::validate_name(p).is_err())
            {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("peers: {bad:?} is not a node name"),
                );
            }
            tracing::warn!(peers = ?req.peers, "fault injection: cutting traffic");
            state.transport.block(req.peers);
            json(
                StatusCode::OK,
                &serde_json::json!({"blocked": state.transport.blocked()}),
            )
        }
        Method::DELETE => {
            tracing::warn!("fault injection: healing all partitions");
            state.transport.unblock_all();
            json(
                StatusCode::OK,
                &serde_json::json!({"blocked": state.transport.blocked()}),
            )
        }
        Method::GET => json(
            StatusCode::OK,
            &serde_json::json!({"blocked": state.transport.blocked()}),
        ),
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed here"),
        ),
    }
}

fn ready(state: &AdminState) -> Response<Body> {
    let s = state.snapshot.borrow().clone();
    let alone_ok = !state.has_seeds || s.self_seed;
    // A node that joined must also hold the mesh's configuration: ready
    // means it applies the same policy as everyone else.
    let docs_ok = s.docs_synced || !s.joined;
    let ok = !s.left && (s.joined || alone_ok) && docs_ok;
    let reason = if s.left {
        "left the mesh"
    } else if ok {
        "ready"
    } else if !docs_ok {
        "joined, still fetching the mesh's configuration documents"
    } else {
        "not joined yet: no seed or saved member has answered"
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = serde_json::json!({"ready": ok, "reason": reason, "active_members": s.active});
    if let Some(warning) = cert_warning(state.transport.cert_not_after()) {
        body["warnings"] = serde_json::json!([warning]);
    }
    json(status, &body)
}

/// When this node's certificate expires within 7 days (or has), what to
/// say about it.
pub fn cert_warning(not_after: std::time::SystemTime) -> Option<String> {
    let at = gossamer_transport::pki::humane_utc(not_after);
    match not_after.duration_since(std::time::SystemTime::now()) {
        Err(_) => Some(format!("this node's certificate expired at {at}")),
        Ok(left) if left < CERT_WARNING => Some(format!(
            "this node's certificate expires in {}h (at {at}): issue a new one",
            left.as_secs() / 3600
        )),
        Ok(_) => None,
    }
}

/// How long before its certificate expires an agent starts warning.
pub const CERT_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

/// The member table, this node first.
pub fn members(s: &Snapshot) -> Vec<MemberJson> {
    let local = MemberJson {
        name: s.local.name.clone(),
        addr: s.local.addr.to_string(),
        state: if s.left { "left" } else { "alive" },
        reason: None,
        incarnation: s.local_incarnation,
        generation: s.local.generation,
        is_self: true,
    };
    std::iter::once(local)
        .chain(s.members.iter().map(|m| MemberJson {
            name: m.id.name.clone(),
            addr: m.id.addr.to_string(),
            state: if s.revoked.contains_key(&m.id.name) {
                "revoked"
            } else {
                m.state.as_str()
            },
            reason: s.revoked.get(&m.id.name).map(|serial| {
                format!(
                    "certificate serial {serial} is revoked (SWIM says {})",
                    m.state.as_str()
                )
            }),
            incarnation: m.incarnation,
            generation: m.id.generation,
            is_self: false,
        }))
        .collect()
}

fn agent(s: &Snapshot, transport: &Transport) -> Response<Body> {
    let identity = transport.identity();
    let cert = crate::certs::Summary::of(&identity);
    json(
        StatusCode::OK,
        &serde_json::json!({
            "name": s.local.name,
            "addr": s.local.addr.to_string(),
            "generation": s.local.generation,
            "version": env!("CARGO_PKG_VERSION"),
            "certificate": {
                "serial": cert.serial,
                "valid_until": cert.valid_until,
                "hosts": identity.hosts.to_string(),
            },
        }),
    )
}
