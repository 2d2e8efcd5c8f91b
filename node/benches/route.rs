//! What a route document costs a request: matching its rules in order and
//! choosing an arm of the split.
//!
//! ```text
//! cargo bench -p gossamer-node --bench route
//! ```
//! 20 rules on paths, methods, headers and query parameters; the measured
//! request matches none of them (every rule is tried) and takes the
//! default 90/10 split, the worst case for a document of that size.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use gossamer_node::balance::rendezvous::hash_key;
use gossamer_node::documents::route::RouteSpec;
use gossamer_node::proxy::policy::{Policy, choose_arm};

fn twenty_rules() -> Policy {
    let mut text = String::from(
        "sticky = \"header:x-user-id\"\nbackends = [{ subset = { version = \"v1\" }, weight = 90 }, { subset = { version = \"v2\" }, weight = 10 }]\n",
    );
    for i in 0..20 {
        let m = match i % 4 {
            0 => format!("match = {{ path = {{ prefix = \"/api/v{i}/\" }} }}"),
            1 => format!(
                "match = {{ path = {{ regex = \"/items/[0-9]+/r{i}\" }}, methods = [\"POST\"] }}"
            ),
            2 => format!("match = {{ headers = [{{ name = \"x-tenant\", exact = \"t{i}\" }}] }}"),
            _ => format!(
                "match = {{ query = [{{ name = \"exp\", exact = \"e{i}\" }}], headers = [{{ name = \"x-canary\", present = true }}] }}"
            ),
        };
        text.push_str(&format!(
            "[[rule]]\n{m}\nbackends = [{{ subset = {{ version = \"v2\" }}, weight = 1 }}]\n"
        ));
    }
    let spec: RouteSpec = toml::from_str(&text).expect("valid document");
    Policy::compile("web", 1, &spec).expect("compiles")
}

fn bench(c: &mut Criterion) {
    let policy = twenty_rules();
    let (parts, ()) = http::Request::builder()
        .method("GET")
        .uri("/catalog/items/42?page=2")
        .header("x-user-id", "user-1234")
        .header("x-tenant", "acme")
        .header("accept", "application/json")
        .body(())
        .expect("valid request")
        .into_parts();
    assert!(
        policy.rule_for(&parts).is_none(),
        "the request must try every rule"
    );
    c.bench_function("route: 20 rules, no match, 90/10 split", |b| {
        b.iter(|| {
            let parts = black_box(&parts);
            let rule = policy.rule_for(parts).map(|(_, r)| r);
            let key = hash_key(parts.headers["x-user-id"].as_bytes());
            black_box(choose_arm(policy.arms_for(rule), key))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
