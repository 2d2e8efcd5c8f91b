//! What an authorization check costs a request at the destination agent.
//!
//! ```text
//! cargo bench -p gossamer-node --bench authz
//! ```
//! 50 rules on callers, paths, methods and headers. The measured request
//! matches only the last one, so every rule is tried, and the most
//! specific match must be found among all of them: the worst case for a
//! document of that size.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use gossamer_node::documents::authz::AuthzSpec;
use gossamer_node::proxy::authz::{Authz, AuthzTable, Caller, Request};
use gossamer_transport::pki::Hosts;

fn fifty_rules() -> AuthzTable {
    let mut text = String::from("default = \"deny\"\n");
    for i in 0..49 {
        let rule = match i % 4 {
            0 => format!("from = {{ services = [\"svc{i}\"] }}\naction = \"allow\""),
            1 => format!(
                "from = {{ nodes = [\"n{i}\"] }}\naction = \"allow\"\nhttp = {{ paths = [{{ prefix = \"/api/v{i}/\" }}] }}"
            ),
            2 => format!(
                "from = \"*\"\naction = \"deny\"\nhttp = {{ paths = [{{ exact = \"/admin/{i}\" }}], methods = [\"DELETE\"] }}"
            ),
            _ => format!(
                "from = {{ services = [\"api\"] }}\naction = \"deny\"\nhttp = {{ headers = [{{ name = \"x-tenant\", exact = \"t{i}\" }}] }}"
            ),
        };
        text.push_str(&format!("[[rule]]\n{rule}\n"));
    }
    text.push_str(
        "[[rule]]\nfrom = { services = [\"api\"] }\naction = \"allow\"\nhttp = { paths = [{ prefix = \"/orders/\" }], methods = [\"GET\"] }\n",
    );
    let value: toml::Value = toml::from_str(&text).expect("valid TOML");
    let spec: AuthzSpec =
        serde_json::from_value(serde_json::to_value(value).expect("JSON")).expect("valid document");
    let mut services = HashMap::new();
    services.insert(
        "db".to_owned(),
        Arc::new(Authz::compile("db", 1, &spec).expect("compiles")),
    );
    AuthzTable {
        mesh_default: None,
        services,
    }
}

fn bench(c: &mut Criterion) {
    let table = fifty_rules();
    let hosts = Hosts::Only(vec!["api".into()]);
    let (parts, ()) = http::Request::builder()
        .method("GET")
        .uri("/orders/42?page=2")
        .header("x-tenant", "acme")
        .header("accept", "application/json")
        .body(())
        .expect("valid request")
        .into_parts();
    let caller = Caller {
        node: "n2",
        hosts: &hosts,
    };
    let request = Request {
        method: &parts.method,
        path: parts.uri.path(),
        headers: &parts.headers,
    };
    let d = table.decide("db", caller, request);
    assert_eq!(
        (d.allowed, d.rule),
        (true, Some(49)),
        "the last rule must decide"
    );
    c.bench_function("authz: 50 rules, the last one decides", |b| {
        b.iter(|| black_box(table.decide("db", black_box(caller), black_box(request))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
