//! `gossamer`: parse, validate, bind, run, wait for a signal, drain.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use gossamer_node::cli::{
    AgentArgs, CaCommand, CertCommand, Cli, Command, ListArgs, MembersArgs, ServiceArgs, StatArgs,
    TopArgs, WatchArgs,
};
use gossamer_node::config::{AdminToken, AgentConfig};
use gossamer_node::{agent, ca, client, identity, logging};
use http::Method;

/// Exit code for bad usage or configuration (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Agent(args) => run_agent(&args),
        Command::Ca(CaCommand::Init { dir, trust_domain }) => report(ca::init(&dir, &trust_domain)),
        Command::Cert(CertCommand::Issue {
            ca_dir,
            name,
            operator,
            services,
            ttl,
            out,
            trust_domain,
        }) => report(ca::issue(
            &ca_dir,
            name.as_deref(),
            operator.as_deref(),
            &services,
            ttl,
            &out,
            &trust_domain,
        )),
        Command::Cert(CertCommand::Revoke {
            ca_dir,
            names,
            serials,
            certs,
            out,
        }) => report(ca::revoke(
            &ca_dir,
            &names,
            &serials,
            &certs,
            out.as_deref(),
        )),
        Command::Config(command) => report(
            runtime().and_then(|rt| rt.block_on(gossamer_node::documents::cli::run(command))),
        ),
        Command::Members(args) => report(runtime().and_then(|rt| rt.block_on(members(args)))),
        Command::Tap(args) => report(runtime().and_then(|rt| rt.block_on(tap(args)))),
        Command::Stat(args) => report(runtime().and_then(|rt| rt.block_on(stat(args)))),
        Command::Top(args) => report(runtime().and_then(|rt| rt.block_on(top(args)))),
        Command::Watch(args) => report(runtime().and_then(|rt| rt.block_on(watch(args)))),
        Command::Services(args) => report(runtime().and_then(|rt| rt.block_on(services(args)))),
        Command::Service(args) => report(runtime().and_then(|rt| rt.block_on(service(args)))),
        Command::Demo(args) => {
            logging::init(
                Some(args.log_level.as_deref().unwrap_or("off")),
                gossamer_node::config::LogFormat::Text,
            );
            let options = gossamer_node::demo::run::DemoOptions {
                keys: args.keys.max(1),
                keep_running: args.keep_running,
                dir: args.dir,
            };
            match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => report(
                    rt.block_on(gossamer_node::demo::run::run(options, shutdown_signal()))
                        .map_err(Into::into),
                ),
                Err(e) => report(Err(e.into())),
            }
        }
        Command::Loadgen(args) => {
            let options = gossamer_node::demo::loadgen::LoadOptions {
                proxy: args.proxy,
                service: args.service,
                rate: args.rate,
                keys: args.keys,
                duration: (args.duration > 0)
                    .then(|| std::time::Duration::from_secs(args.duration)),
                json: args.json,
            };
            report(runtime().map(|rt| {
                let totals = rt.block_on(gossamer_node::demo::loadgen::run(options.clone()));
                if options.json {
                    println!("{}", serde_json::to_string(&totals).expect("serializable"));
                } else {
                    println!(
                        "total sent={} ok={} failed={}",
                        totals.sent, totals.ok, totals.failed
                    );
                }
            }))
        }
        Command::DemoService(args) => {
            logging::init(None, gossamer_node::config::LogFormat::Auto);
            let name = args.name.unwrap_or_else(identity::host_name);
            report(runtime().and_then(|rt| {
                rt.block_on(gossamer_node::demo::service::run(args.listen, name))
                    .with_context(|| format!("demo service on {}", args.listen))
            }))
        }
        Command::Health(args) => report(runtime().and_then(|rt| {
            rt.block_on(client::call(args.admin, None, Method::GET, "/health", None))
                .map(|_| println!("ok"))
                .map_err(Into::into)
        })),
        Command::Leave(args) => report(runtime().and_then(|rt| {
            let token = admin_token(&args)?;
            rt.block_on(client::call(
                args.admin,
                token.as_ref(),
                Method::POST,
                "/v1/leave",
                None,
            ))
            .map(|_| println!("the agent is leaving the mesh"))
            .map_err(Into::into)
        })),
    }
}

/// `gossamer tap`: the requests an agent carries, one line each.
async fn tap(args: gossamer_node::cli::TapArgs) -> anyhow::Result<()> {
    let mut query = vec![format!("max_rate={}", args.max_rate)];
    let mut add = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            let escaped: String = v
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            query.push(format!("{k}={escaped}"));
        }
    };
    add("service", &args.service);
    add("path", &args.path);
    add("method", &args.method);
    add("status", &args.status);
    if !args.headers.is_empty() {
        add("headers", &Some(args.headers.join(",")));
    }
    let token = admin_token(&args.admin)?;
    let path = format!("/v1/tap?{}", query.join("&"));
    client::stream_lines(args.admin.admin, token.as_ref(), &path, |line| {
        if args.json {
            println!("{line}");
            return;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            return;
        };
        if v.get("tap").is_some() {
            eprintln!(
                "watching (at most {} requests a second; Ctrl-C to stop)",
                v["max_rate"]
            );
            return;
        }
        if let Some(n) = v.get("dropped") {
            eprintln!("({n} requests not shown: over the rate)");
            return;
        }
        let text = |k: &str| v[k].as_str().unwrap_or("-").to_owned();
        let flags: Vec<&str> = v["flags"]
            .as_array()
            .map(|a| a.iter().filter_map(|f| f.as_str()).collect())
            .unwrap_or_default();
        println!(
            "{} {:<8} {} {} {}{} -> {} {} {:.1}ms{}{}",
            text("start").get(11..23).unwrap_or(""),
            text("listener"),
            text("client"),
            text("method"),
            text("authority"),
            text("path"),
            text("instance"),
            v["status"],
            v["duration_ms"].as_f64().unwrap_or(0.0),
            if flags.is_empty() {
                String::new()
            } else {
                format!(" [{}]", flags.join(","))
            },
            v["retries"]
                .as_u64()
                .filter(|r| *r > 0)
                .map(|r| format!(" retries={r}"))
                .unwrap_or_default(),
        );
    })
    .await?;
    Ok(())
}

/// The token named by `--admin-token-file`, if any.
fn admin_token(args: &gossamer_node::cli::AdminArgs) -> anyhow::Result<Option<AdminToken>> {
    args.admin_token_file
        .as_deref()
        .map(AdminToken::load)
        .transpose()
        .map_err(anyhow::Error::msg)
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gossamer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run_agent(args: &AgentArgs) -> ExitCode {
    gossamer_node::memory::purge_at_once();
    let config = match AgentConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gossamer: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    logging::init(config.log_level.as_deref(), config.log_format);
    // One thread gets a current-thread runtime rather than a pool of one
    // worker: a task that writes to a QUIC stream wakes the connection's
    // driver, and a pool runs the woken task next (its LIFO slot), so the
    // driver sent a packet per request. Here it runs after the tasks
    // already queued, and the requests ready together share packets
    // (docs/benchmarks.md, "One thread, one runtime").
    let threads = args.threads.unwrap_or(2).clamp(1, 64);
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gossamer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let sockets = agent::Sockets::bind(&config).await?;
        agent::run(config, sockets, shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gossamer: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the agent runs until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("gossamer: second signal, exiting now");
        std::process::exit(130);
    });
}

async fn members(args: MembersArgs) -> anyhow::Result<()> {
    let body = client::call(args.admin.admin, None, Method::GET, "/v1/members", None).await?;
    if args.json {
        print!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&body).context("bad answer")?;
    println!(
        "{:<24} {:<24} {:<8} {:>11} {:>15}",
        "NAME", "ADDRESS", "STATE", "INCARNATION", "GENERATION"
    );
    for r in rows {
        let self_mark = if r["self"].as_bool() == Some(true) {
            " (self)"
        } else {
            ""
        };
        println!(
            "{:<24} {:<24} {:<8} {:>11} {:>15}",
            format!("{}{self_mark}", r["name"].as_str().unwrap_or("?")),
            r["addr"].as_str().unwrap_or("?"),
            r["state"].as_str().unwrap_or("?"),
            r["incarnation"].to_string(),
            r["generation"].to_string(),
        );
    }
    Ok(())
}

fn stats_path(
    window: &str,
    mesh: bool,
    peers: Option<usize>,
    service: Option<&str>,
) -> anyhow::Result<String> {
    let d = gossamer_membership::duration::parse(window)
        .map_err(|e| anyhow::anyhow!("--window: {e}"))?;
    let mut path = format!(
        "/v1/stats?window={}&mesh={mesh}",
        gossamer_membership::duration::format(d)
    );
    if let Some(n) = peers {
        path.push_str(&format!("&peers={n}"));
    }
    if let Some(s) = service {
        anyhow::ensure!(
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "--service: {s:?} is not a service name"
        );
        path.push_str(&format!("&service={s}"));
    }
    Ok(path)
}

/// The `/v1/stats` answer as a table.
fn stats_table(answer: &serde_json::Value) -> String {
    use std::fmt::Write;
    let ms = |v: &serde_json::Value| {
        v.as_f64().map_or_else(
            || "-".to_owned(),
            |ms| {
                if ms < 10.0 {
                    format!("{ms:.2}ms")
                } else {
                    format!("{ms:.0}ms")
                }
            },
        )
    };
    let mut out = String::new();
    let nodes = answer["nodes"].as_array().map_or(0, Vec::len);
    let _ = write!(
        out,
        "window {:.1}s, {} node{}",
        answer["window_seconds"].as_f64().unwrap_or(0.0),
        nodes,
        if nodes == 1 { "" } else { "s" }
    );
    if let Some(missing) = answer["unanswered"].as_array().filter(|m| !m.is_empty()) {
        let names: Vec<_> = missing.iter().filter_map(|m| m["node"].as_str()).collect();
        let _ = write!(
            out,
            " ({} did not answer: {})",
            names.len(),
            names.join(", ")
        );
    }
    out.push('\n');
    let rows = answer["rows"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if rows.is_empty() {
        out.push_str("no requests in the window\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<24} {:<16} {:<9} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9}",
        "SERVICE", "ROUTE", "DIRECTION", "REQUESTS", "RPS", "SUCCESS", "P50", "P90", "P99"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<24} {:<16} {:<9} {:>9} {:>9.1} {:>7.2}% {:>9} {:>9} {:>9}",
            r["service"].as_str().unwrap_or("?"),
            r["route"].as_str().unwrap_or("-"),
            r["direction"].as_str().unwrap_or("?"),
            r["requests"].as_u64().unwrap_or(0),
            r["rps"].as_f64().unwrap_or(0.0),
            r["success_rate"].as_f64().unwrap_or(0.0) * 100.0,
            ms(&r["p50_ms"]),
            ms(&r["p90_ms"]),
            ms(&r["p99_ms"]),
        );
    }
    out
}

async fn stat(args: StatArgs) -> anyhow::Result<()> {
    let path = stats_path(&args.window, args.mesh, args.peers, args.service.as_deref())?;
    let body = client::call(args.admin.admin, None, Method::GET, &path, None).await?;
    if args.json {
        print!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let answer: serde_json::Value = serde_json::from_slice(&body).context("bad answer")?;
    print!("{}", stats_table(&answer));
    Ok(())
}

async fn top(args: TopArgs) -> anyhow::Result<()> {
    let path = stats_path(&args.window, args.mesh, None, args.service.as_deref())?;
    let every = gossamer_membership::duration::parse(&args.interval)
        .map_err(|e| anyhow::anyhow!("--interval: {e}"))?
        .max(std::time::Duration::from_millis(200));
    let mut ticks = tokio::time::interval(every);
    let mut shown = 0u64;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let body = client::call(args.admin.admin, None, Method::GET, &path, None).await?;
        let answer: serde_json::Value = serde_json::from_slice(&body).context("bad answer")?;
        // Clear the screen and draw from the top left.
        print!(
            "\x1b[2J\x1b[Hgossamer top: {} every {} (Ctrl-C to quit)\n{}",
            args.admin.admin,
            gossamer_membership::duration::format(every),
            stats_table(&answer)
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        shown += 1;
        if args.count.is_some_and(|n| shown >= n) {
            return Ok(());
        }
    }
}

async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    use gossamer_node::events::watch::{Outcome, WatchConfig};
    let parse = |flag: &str, text: &str| {
        gossamer_membership::duration::parse(text).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
    };
    let config = WatchConfig {
        types: args.types.clone(),
        service: args.service.clone(),
        command: args.command.clone(),
        timeout: parse("timeout", &args.timeout)?,
        coalesce: parse("coalesce", &args.coalesce)?,
    };
    let mut handler = config
        .handler(0)
        .map_err(|e| anyhow::anyhow!(e.replace("watch[0].", "--").replace("--types", "--type")))?;
    handler.name = args.command.join(" ");
    handler.inherit_output = true;
    let mut query = String::new();
    if !args.types.is_empty() {
        query.push_str(&format!("&type={}", args.types.join(",")));
    }
    if let Some(s) = &args.service {
        anyhow::ensure!(
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "--service: {s:?} is not a service name"
        );
        query.push_str(&format!("&service={s}"));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(65_536);
    let runner = handler.clone();
    tokio::spawn(async move {
        runner
            .run(rx, |event, folded, outcome| {
                let what = format!(
                    "event {} ({} {}{})",
                    event.id,
                    event.kind.as_str(),
                    event.action,
                    if folded > 1 {
                        format!(", {folded} coalesced")
                    } else {
                        String::new()
                    }
                );
                match outcome {
                    Outcome::Ok => {}
                    Outcome::Failed(why) => {
                        eprintln!("gossamer watch: {what}: the command failed: {why}")
                    }
                    Outcome::TimedOut => eprintln!(
                        "gossamer watch: {what}: the command ran past {} and was killed",
                        gossamer_membership::duration::format(runner.timeout)
                    ),
                    Outcome::NotStarted(why) => {
                        eprintln!("gossamer watch: {what}: the command could not start: {why}")
                    }
                }
            })
            .await;
    });
    eprintln!("watching {} (Ctrl-C to stop)", args.admin.admin);
    let mut cursor = args.after;
    let mut backoff = std::time::Duration::from_millis(500);
    loop {
        let path = match cursor {
            Some(id) => format!("/v1/events?after={id}{query}"),
            None => format!("/v1/events?format=ndjson{query}"),
        };
        let mut started_at = None;
        let stream = client::stream_lines_after_head(
            args.admin.admin,
            None,
            &path,
            |head| {
                started_at = head
                    .get("x-gossamer-latest-event")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            },
            |line| {
                if line.is_empty() {
                    return; // keep-alive
                }
                match serde_json::from_str::<gossamer_node::events::Event>(line) {
                    Ok(event) => {
                        if event.kind == gossamer_node::events::Kind::Gap {
                            eprintln!(
                                "gossamer watch: {}",
                                event.reason.as_deref().unwrap_or("some events were missed")
                            );
                        } else {
                            cursor = Some(event.id);
                            if tx.try_send(std::sync::Arc::new(event)).is_err() {
                                eprintln!(
                                    "gossamer watch: the command falls behind; an event was dropped"
                                );
                            }
                        }
                    }
                    Err(e) => eprintln!("gossamer watch: unreadable event ({e}): {line}"),
                }
            },
        );
        let ended = tokio::select! {
            ended = stream => ended,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        // Resume after the last event seen, or from when this stream began.
        cursor = cursor.or(started_at);
        match ended {
            Ok(()) => eprintln!("gossamer watch: the event stream ended; reconnecting"),
            Err(e) => eprintln!("gossamer watch: {e}; reconnecting in {backoff:?}"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
}

async fn services(args: ListArgs) -> anyhow::Result<()> {
    let body = client::call(args.admin.admin, None, Method::GET, "/v1/catalog", None).await?;
    if args.json {
        print!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let catalog: serde_json::Value = serde_json::from_slice(&body).context("bad answer")?;
    let empty = serde_json::Map::new();
    let services = catalog["services"].as_object().unwrap_or(&empty);
    if services.is_empty() {
        println!("no services registered in the mesh");
        return Ok(());
    }
    println!(
        "{:<32} {:>8} {:>8} {:>12}",
        "SERVICE", "PASSING", "TOTAL", "UNAVAILABLE"
    );
    for (name, instances) in services {
        let list = instances.as_array().map(Vec::as_slice).unwrap_or_default();
        let count = |h: &str| list.iter().filter(|i| i["health"] == h).count();
        println!(
            "{:<32} {:>8} {:>8} {:>12}",
            name,
            count("passing"),
            list.len(),
            count("unavailable")
        );
    }
    Ok(())
}

async fn service(args: ServiceArgs) -> anyhow::Result<()> {
    let path = format!("/v1/services/{}", args.name);
    let body = client::call(args.admin.admin, None, Method::GET, &path, None).await?;
    if args.json {
        print!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let instances: Vec<serde_json::Value> = serde_json::from_slice(&body).context("bad answer")?;
    println!(
        "{:<24} {:<20} {:<28} {:<12} {:>6} {:<10}",
        "ID", "NODE", "ADDRESS", "HEALTH", "WEIGHT", "VERSION"
    );
    for i in instances {
        println!(
            "{:<24} {:<20} {:<28} {:<12} {:>6} {:<10}",
            i["id"].as_str().unwrap_or("?"),
            i["node"].as_str().unwrap_or("?"),
            format!("{}:{}", i["address"].as_str().unwrap_or("?"), i["port"]),
            i["health"].as_str().unwrap_or("?"),
            i["weight"].to_string(),
            i["version"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}
