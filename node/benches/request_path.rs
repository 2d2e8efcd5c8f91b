//! The request path's own CPU: what both agents do for one proxied HTTP/1.1
//! request besides I/O, with the functions the proxy calls.
//!
//! ```text
//! cargo bench -p gossamer-node --bench request_path
//! ```
//! Caller (agent A): the target service from `Host`, the forwarding
//! headers, the hash key under the default policy, the instance from the
//! rendezvous table (3 instances), the stream's opening head. Owner (agent
//! B): the head decoded, the instance's request built. Back: the
//! instance's response head (nginx's eight headers) encoded by B, decoded
//! by A into the response the client gets. The request is oha's (`Host`,
//! `user-agent`, `accept`) for `GET /1k`. `whole` is the sum in one loop;
//! each part is also timed alone.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use gossamer_node::balance::rendezvous::{Table, hash_key};
use gossamer_node::proxy::hop;
use gossamer_node::proxy::inbound::request_parts;
use gossamer_node::proxy::outbound::{forward_headers, hash_input, target_service};
use gossamer_node::proxy::routes::HashPolicy;
use gossamer_node::proxy::wire::{self, OutgoingRequest, RequestHead, ResponseHead};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};

/// A request as hyper hands it to the outbound listener.
fn client_request() -> Request<()> {
    Request::get("/1k")
        .header("host", "bench")
        .header("user-agent", "oha/1.16.0")
        .header("accept", "*/*")
        .body(())
        .expect("valid")
}

/// nginx's response head for a static file.
fn instance_response() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in [
        ("server", "nginx/1.22.1"),
        ("date", "Fri, 04 Dec 2026 03:00:00 GMT"),
        ("content-type", "application/octet-stream"),
        ("content-length", "1024"),
        ("last-modified", "Fri, 04 Dec 2026 02:59:00 GMT"),
        ("connection", "keep-alive"),
        ("etag", "\"6930f6a4-400\""),
        ("accept-ranges", "bytes"),
    ] {
        h.append(name, HeaderValue::from_static(value));
    }
    h
}

struct Path {
    peer: SocketAddr,
    policy: HashPolicy,
    table: Table,
    instances: Vec<String>,
}

impl Path {
    fn new() -> Self {
        let names: Vec<(String, u32)> = (0..3).map(|i| (format!("node{i}/bench-{i}"), 1)).collect();
        Self {
            peer: "127.0.0.1:41234".parse().expect("address"),
            policy: HashPolicy::default(),
            table: Table::build(&names),
            instances: (0..3).map(|i| format!("bench-{i}")).collect(),
        }
    }

    /// Agent A, from the parsed request to the bytes that open the stream.
    fn caller(&self, req: Request<()>) -> bytes::Bytes {
        let service = target_service(&req).expect("a target");
        let (mut parts, ()) = req.into_parts();
        forward_headers(&mut parts, 0, self.peer);
        let hash = hash_key(&hash_input(&parts, &self.policy, self.peer));
        let i = self
            .table
            .lookup_usable(hash, |_| true)
            .expect("an instance");
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        OutgoingRequest {
            service: &service,
            instance: &self.instances[i],
            method: parts.method.as_str(),
            path,
            version: hop::version_to_wire(parts.version),
            headers: &parts.headers,
            upgrade: false,
            end_stream: true,
        }
        .encode_opening()
        .expect("encodes")
    }

    /// Agent B, from the stream's head to the request for the instance.
    fn owner(opening: bytes::Bytes) -> Parts {
        // The stream kind byte and the length are read off by the stream's
        // dispatcher and `read_frame`.
        let mut head = RequestHead::decode(opening.slice(5..)).expect("decodes");
        request_parts(&mut head).expect("a request")
    }

    /// B encodes the instance's response head; A turns it into its client's.
    fn answer(headers: &HeaderMap) -> Response<()> {
        let frame = wire::encode_response(200, headers, false, false).expect("encodes");
        let head = ResponseHead::decode(frame.slice(4..)).expect("decodes");
        let status = StatusCode::from_u16(head.status).expect("status");
        let mut response = Response::builder().status(status).body(()).expect("valid");
        *response.headers_mut() = head.headers;
        response
    }
}

fn bench(c: &mut Criterion) {
    let path = Path::new();
    let upstream = instance_response();
    let opening = path.caller(client_request());
    assert_eq!(Path::owner(opening.clone()).uri, "/1k");
    c.bench_function("request path: whole (A, B, B, A)", |b| {
        b.iter(|| {
            let opening = path.caller(black_box(client_request()));
            black_box(Path::owner(opening));
            black_box(Path::answer(black_box(&upstream)))
        })
    });
    c.bench_function("request path: parsed request (baseline)", |b| {
        b.iter(|| black_box(client_request()))
    });
    c.bench_function("request path: caller A, request out", |b| {
        b.iter(|| black_box(path.caller(black_box(client_request()))))
    });
    c.bench_function("request path: owner B, request in", |b| {
        b.iter(|| black_box(Path::owner(black_box(opening.clone()))))
    });
    c.bench_function("request path: response, B out and A in", |b| {
        b.iter(|| black_box(Path::answer(black_box(&upstream))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
