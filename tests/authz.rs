//! Authorization between services through real agents: three nodes, each
//! hosting one service its certificate names (n1 web, n2 api, n3 db), and
//! `authz` documents deciding who may call db. Every decision is made by
//! n3, the agent that hosts db, for remote and local callers alike.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use support::{
    Agent, AgentOptions, DemoService, Pki, config_apply, wait_doc_version, wait_health, wait_states,
};

/// `METHOD path` for db through `proxy`: (status, x-gossamer-error).
fn call(proxy: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&proxy, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: db\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status: u16 = response.split(' ').nth(1).context("no status")?.parse()?;
    let error = response
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-gossamer-error")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    Ok((status, error))
}

/// Applies `toml` at `agent` and waits until all `agents` hold that
/// version of `authz NAME`; returns the time that took.
fn apply(agents: &[&Agent], pki: &Pki, name: &str, toml: &str) -> Result<Duration> {
    let file = pki
        .dir
        .path()
        .join(format!("authz-{}.toml", name.replace('*', "mesh")));
    std::fs::write(&file, toml)?;
    let operator = pki.issue_operator("alice")?;
    let started = Instant::now();
    let out = config_apply(agents[0], &file, &operator);
    ensure!(
        out.status.success(),
        "config apply: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let path = format!("/v1/config/authz/{name}");
    let (_, body) = agents[0].get(&path)?;
    let version = serde_json::from_str::<Value>(&body)?["version"]
        .as_u64()
        .context("no version")?;
    wait_doc_version(agents, "authz", name, version)?;
    Ok(started.elapsed())
}

fn expect(proxy: SocketAddr, method: &str, path: &str, want: (u16, &str)) -> Result<()> {
    let got = call(proxy, method, path)?;
    ensure!(
        got.0 == want.0 && got.1 == want.1,
        "{method} {path} via {proxy}: got {got:?}, want {want:?}"
    );
    Ok(())
}

#[test]
fn authz_documents_decide_who_may_call_a_service() -> Result<()> {
    let pki = Pki::new()?;
    let mut agents = Vec::new();
    let mut services = Vec::new();
    for (i, service) in ["web", "api", "db"].iter().enumerate() {
        let name = format!("n{}", i + 1);
        let (cert, key) = pki.issue_hosting(&name, &[service])?;
        let seeds = agents
            .first()
            .map(|a: &Agent| vec![a.seed()])
            .unwrap_or_default();
        let agent = Agent::start_with(
            &pki,
            &name,
            &pki.ca(),
            &cert,
            &key,
            AgentOptions {
                seeds,
                ..Default::default()
            },
        )?;
        let svc = DemoService::start(service, None)?;
        let (status, body) = agent.register(
            service,
            &format!(r#"{{"name": "{service}", "port": {}}}"#, svc.addr.port()),
        )?;
        ensure!(status == 200, "{body}");
        agents.push(agent);
        services.push(svc);
    }
    let refs: Vec<&Agent> = agents.iter().collect();
    wait_states(
        &refs,
        &[("n1", "alive"), ("n2", "alive"), ("n3", "alive")],
        Duration::from_secs(15),
    )?;
    wait_health(&refs, "db", "db", Some("passing"), Duration::from_secs(10))?;
    let (web, api, db) = (agents[0].proxy, agents[1].proxy, agents[2].proxy);

    // No document: everyone may call db.
    for proxy in [web, api, db] {
        expect(proxy, "GET", "/", (200, ""))?;
    }

    // Default deny; api may call; web only GET /public/…; and a deny for
    // api's /admin that overrides its allow.
    let took = apply(
        &refs,
        &pki,
        "db",
        r#"
[[authz]]
name = "db"
default = "deny"
[[authz.rule]]
from = { services = ["api"] }
action = "allow"
[[authz.rule]]
from = { services = ["web"] }
action = "allow"
http = { paths = [{ prefix = "/public/" }], methods = ["GET"] }
[[authz.rule]]
from = { services = ["api"] }
action = "deny"
http = { paths = [{ prefix = "/admin" }] }
"#,
    )?;
    eprintln!("authz db in force on all 3 agents {took:?} after apply");
    expect(api, "GET", "/", (200, ""))?;
    expect(api, "POST", "/orders", (200, ""))?;
    expect(
        api,
        "GET",
        "/admin/users",
        (403, "denied by authz db rule 2"),
    )?;
    expect(web, "GET", "/public/logo", (200, ""))?;
    expect(
        web,
        "POST",
        "/public/logo",
        (403, "denied by authz db default"),
    )?;
    expect(web, "GET", "/private", (403, "denied by authz db default"))?;
    // db calling itself is checked too: its node hosts db, which no rule
    // names.
    expect(db, "GET", "/", (403, "denied by authz db default"))?;
    // A denied request never reaches db.
    let (_, stats) = support::http(services[2].addr, "GET", "/admin/stats", None)?;
    let before: Value = serde_json::from_str(&stats)?;
    expect(web, "GET", "/private", (403, "denied by authz db default"))?;
    let (_, stats) = support::http(services[2].addr, "GET", "/admin/stats", None)?;
    let after: Value = serde_json::from_str(&stats)?;
    ensure!(
        before["requests"] == after["requests"],
        "db was reached: {before} {after}"
    );
    // The decision is counted at n3 by rule.
    let denied = agents[2]
        .metric(r#"gossamer_authz_decisions_total{service="db",rule="rule 2",decision="deny"}"#)
        .unwrap_or(0.0);
    ensure!(denied >= 1.0, "rule 2's denial not counted");
    // The explain API names the rule.
    let (_, body) = agents[2].get("/v1/authz/check?from=n2&to=db&path=/admin/x&method=GET")?;
    let v: Value = serde_json::from_str(&body)?;
    ensure!(v["decision"] == "deny" && v["rule"] == "rule 2", "{body}");
    ensure!(v["caller_services"] == "api", "{body}");

    // A policy change takes effect everywhere within 2 s, and a request
    // both versions allow never fails meanwhile.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let failures = std::thread::scope(|s| -> Result<usize> {
        let traffic = s.spawn(|| {
            let mut failed = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match call(api, "GET", "/orders") {
                    Ok((200, _)) => {}
                    other => {
                        eprintln!("failed while the policy changed: {other:?}");
                        failed += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            failed
        });
        let took = apply(
            &refs,
            &pki,
            "db",
            r#"
[[authz]]
name = "db"
default = "deny"
[[authz.rule]]
from = { services = ["api", "web"] }
action = "allow"
"#,
        );
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let failed = traffic.join().expect("no panic");
        let took = took?;
        eprintln!("new authz db in force on all 3 agents {took:?} after apply");
        ensure!(took < Duration::from_secs(2), "took {took:?}");
        Ok(failed)
    })?;
    ensure!(
        failures == 0,
        "{failures} requests failed while the policy changed"
    );
    expect(web, "POST", "/private", (200, ""))?;

    // Audit: the mesh-wide default applies where the service's document
    // sets none; audit lets the request through but counts it.
    apply(
        &refs,
        &pki,
        "db",
        "[[authz]]\nname = \"db\"\n[[authz.rule]]\nfrom = { services = [\"api\"] }\naction = \"allow\"\n",
    )?;
    apply(
        &refs,
        &pki,
        "*",
        "[[authz]]\nname = \"*\"\ndefault = \"audit\"\n",
    )?;
    expect(web, "GET", "/", (200, ""))?;
    let audited = agents[2]
        .metric(r#"gossamer_authz_decisions_total{service="db",rule="default",decision="audit"}"#)
        .unwrap_or(0.0);
    ensure!(audited >= 1.0, "the audit was not counted");
    ensure!(
        agents[2]
            .log()
            .contains("authz audit: this request would be denied"),
        "the audit was not logged"
    );
    apply(
        &refs,
        &pki,
        "*",
        "[[authz]]\nname = \"*\"\ndefault = \"deny\"\n",
    )?;
    expect(web, "GET", "/", (403, "denied by authz db default"))?;
    expect(api, "GET", "/", (200, ""))?;
    // The agents' own health checks are never subject to it.
    std::thread::sleep(Duration::from_secs(2));
    wait_health(&refs, "db", "db", Some("passing"), Duration::from_secs(5))?;
    Ok(())
}
