//! A real gRPC implementation (Python's grpcio, a grpc-core client and
//! server) through the mesh: unary, server and bidirectional streaming,
//! error statuses with and without messages before them (trailers-only
//! answers), deadlines shorter and longer than the proxy's default request
//! timeout, and a 5 MB message; both through the caller's agent to another
//! node and through the owner's own agent.
//!
//! grpcio is installed by `tests/grpc/python.sh` (a venv under target/ when
//! the system Python lacks it); when that cannot be done the test says so,
//! naming the package, and passes without running.

mod support;

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use support::{Agent, AgentOptions, Pki, wait_health, wait_states};

fn check(python: &str, proxy: std::net::SocketAddr, long: bool) -> Result<String> {
    let mut cmd = Command::new(python);
    cmd.arg(support::grpc_script("grpc_echo.py")).args([
        "check",
        "--target",
        &proxy.to_string(),
        "--authority",
        "echo",
    ]);
    if long {
        cmd.arg("--long");
    }
    let out = cmd.output().context("run the grpcio client")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("grpcio client through {proxy} failed:\n{text}");
    }
    Ok(text)
}

#[test]
fn grpcio_through_the_mesh() -> Result<()> {
    let python = match support::grpc_python() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIPPED grpcio_through_the_mesh: {why}");
            return Ok(());
        }
    };
    let pki = Pki::new()?;
    let n1 = Agent::start(&pki, "n1", AgentOptions::default())?;
    let n2 = Agent::start(
        &pki,
        "n2",
        AgentOptions {
            seeds: vec![n1.seed()],
            ..Default::default()
        },
    )?;
    wait_states(
        &[&n1, &n2],
        &[("n1", "alive"), ("n2", "alive")],
        Duration::from_secs(15),
    )?;
    let server = support::GrpcServer::start(&python)?;
    let (status, text) = n2.register(
        "echo-1",
        &format!(
            r#"{{"name": "echo", "port": {}, "protocol": "grpc", "check": {{"tcp": true, "interval": "1s", "rise": 1}}}}"#,
            server.port
        ),
    )?;
    ensure!(status == 200, "register: {text}");
    wait_health(
        &[&n1, &n2],
        "echo",
        "echo-1",
        Some("passing"),
        Duration::from_secs(10),
    )?;

    // Across the mesh (n1's proxy, QUIC to n2), including a 20 s call with
    // a 25 s deadline that the 15 s default request timeout would cut.
    let remote = check(&python, n1.proxy, true)?;
    println!("through n1 (remote):\n{remote}");
    // Through the owner's own proxy (the local path).
    let local = check(&python, n2.proxy, false)?;
    println!("through n2 (local):\n{local}");
    let errors = n1.metric("gossamer_proxy_ejections_total").unwrap_or(0.0);
    ensure!(errors == 0.0, "gRPC error statuses ejected the instance");
    Ok(())
}
