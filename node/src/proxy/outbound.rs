//! The outbound listener: local applications send plain HTTP/1.1 or h2c
//! here; the target service comes from the Host header (`web`, `web.mesh`)
//! or an absolute-form URI (so `HTTP_PROXY` works). This is the glue
//! between the listener and `Proxy::dispatch`: name the service, cut
//! loops, set the forwarding headers, and hash the request's key.

use std::net::SocketAddr;
use std::sync::Arc;

use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tracing::warn;

use super::Proxy;
use super::body::{ProxyBody, Replayable};
use super::error::{ERROR_HEADER, grpc_error, is_grpc, local_response};
use super::hop::{HOPS_HEADER, MAX_HOPS};
use super::policy::{choose_arm, draw};
use super::routes::HashPolicy;
use super::upgrade::is_upgrade;
use crate::balance::rendezvous::hash_key;
use crate::listener::{self, Limits, ListenerMetrics};
use gossamer_membership::catalog::validate_service_name;

/// Serves local applications until `tasks` drain.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: Limits,
    metrics: ListenerMetrics,
    tasks: crate::tasks::Tasks,
) {
    let handler = move |req, peer| handle(proxy.clone(), req, peer);
    listener::serve(listener, "proxy", limits, metrics, tasks, handler).await;
}

/// Why a request names no service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Neither an absolute URI nor a Host header.
    #[error("no target service: set the Host header (web or web.mesh) or use an absolute URI")]
    Missing,
    /// More than one Host header: which one a server would use is anyone's guess.
    #[error("more than one Host header")]
    DuplicateHost,
    /// The host is not a service name; only its start is echoed.
    #[error("{0:?} is not a service name (web or web.mesh)")]
    NotAName(String),
}

/// The service a request is for: the absolute-form URI's (or HTTP/2
/// `:authority`'s) host, else the Host header; a `.mesh` suffix and any
/// port are ignored.
pub fn target_service<B>(req: &Request<B>) -> Result<String, TargetError> {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(TargetError::DuplicateHost);
    }
    let host = match req.uri().host() {
        Some(h) => h,
        None => {
            let h = header
                .ok_or(TargetError::Missing)?
                .to_str()
                .map_err(|_| TargetError::NotAName("(not ASCII)".into()))?;
            h.rsplit_once(':').map_or(h, |(host, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    host
                } else {
                    h
                }
            })
        }
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let name = host.strip_suffix(".mesh").unwrap_or(&host);
    if name.is_empty() {
        return Err(TargetError::Missing);
    }
    if validate_service_name(name).is_err() {
        let shown: String = name.chars().take(64).collect();
        return Err(TargetError::NotAName(shown));
    }
    Ok(name.to_owned())
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

async fn handle(
    proxy: Arc<Proxy>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    if is_grpc(req.headers()) {
        grpc_error(route_request(proxy, req, peer).await)
    } else {
        route_request(proxy, req, peer).await
    }
}

async fn route_request(
    proxy: Arc<Proxy>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let service = match target_service(&req) {
        Ok(s) => s,
        Err(e) => return local_response(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let hops = req
        .headers()
        .get(HOPS_HEADER)
        .and_then(|v| v.to_str().ok()?.parse::<u32>().ok())
        .unwrap_or(0);
    if hops >= MAX_HOPS {
        warn!(%service, hops, "request loop cut: it passed through the mesh {hops} times");
        return local_response(
            StatusCode::LOOP_DETECTED,
            format!(
                "request loop: this request passed through the mesh {hops} times; check that {service:?} does not call itself through its own proxy"
            ),
        );
    }
    let routes = proxy.routes();
    let Some(route) = routes.services.get(&service).cloned() else {
        proxy.count(&service, "none", "5xx");
        return local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unknown service {service:?}"),
        );
    };
    let on_upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // The instance sees the name it was called by: from an absolute URI or
    // HTTP/2's :authority too, whatever protocol it speaks.
    if let Some(authority) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(http::header::HOST, v);
    }
    parts
        .headers
        .insert(HOPS_HEADER, HeaderValue::from(hops + 1));
    if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
        parts.headers.append("x-forwarded-for", v);
    }
    let Some(policy) = routes.policies.get(&service).cloned() else {
        let hash = hash_key(&hash_input(&parts, &route.policy, peer));
        return proxy
            .dispatch(&route, hash, parts, Replayable::new(body), on_upgrade, None)
            .await;
    };
    // A route document is in force: its first matching rule, then an arm
    // of the split by the sticky key.
    let matched = policy.rule_for(&parts);
    let rule = matched.map(|(_, r)| r);
    let rule_label = matched.map_or_else(|| "default".to_owned(), |(i, _)| i.to_string());
    let key = hash_key(&hash_input(
        &parts,
        policy.sticky.as_ref().unwrap_or(&route.policy),
        peer,
    ));
    let arms = policy.arms_for(rule);
    let (target, arm_label) = if arms.is_empty() {
        (route, service.clone())
    } else {
        let Some(i) = choose_arm(arms, key) else {
            return local_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("route {service} rule {rule_label}: no arm with a weight"),
            );
        };
        let arm = &arms[i];
        let target = match &arm.subset {
            None => routes.services.get(&arm.service).cloned(),
            Some(_) => routes.subsets.get(&arm.label).cloned(),
        };
        let Some(target) = target else {
            proxy.count(&arm.service, "none", "5xx");
            return local_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "route {service} rule {rule_label}: no instance of {}",
                    arm.label
                ),
            );
        };
        (target, arm.label.clone())
    };
    proxy.count_route(&service, &rule_label, &arm_label);
    let mut response_edits = None;
    let mut timeout = policy.timeout;
    if let Some(r) = rule {
        if let Some((status, share)) = r.abort
            && draw() < share
        {
            let mut response = local_response(
                status,
                format!("fault injected by route {service} rule {rule_label}"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!(
                "fault injected by route {service} rule {rule_label}"
            )) {
                response.headers_mut().insert(ERROR_HEADER, v);
            }
            return response;
        }
        if let Some((delay, share)) = r.delay
            && draw() < share
        {
            tokio::time::sleep(delay).await;
        }
        r.rewrite(&mut parts);
        if let Some(edits) = &r.request_headers {
            edits.apply(&mut parts.headers);
        }
        response_edits = r.response_headers.clone();
        timeout = r.timeout.or(timeout);
    }
    let _admitted = match policy.max_requests {
        None => None,
        Some(max) => match proxy.admit(&service, max) {
            Some(a) => Some(a),
            None => {
                proxy.count(&service, "none", "overflow");
                let mut response = local_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("overloaded {service}: {max} requests in flight from this agent"),
                );
                if let Ok(v) = HeaderValue::from_str(&format!("overloaded {service}")) {
                    response.headers_mut().insert(ERROR_HEADER, v);
                }
                return response;
            }
        },
    };
    let mut response = proxy
        .dispatch(
            &target,
            key,
            parts,
            Replayable::new(body),
            on_upgrade,
            timeout,
        )
        .await;
    if let Some(edits) = response_edits {
        edits.apply(response.headers_mut());
    }
    response
}
