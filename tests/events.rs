//! The event stream and watch handlers, through real agents: `/v1/events`
//! delivers a member's death and a registration elsewhere, in order, and
//! resumes after a reconnect from its cursor; `gossamer watch` runs a
//! command per event, folds a burst, and kills a handler that hangs;
//! `[[watch]]` handlers in the agent config run too.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use support::{Agent, AgentOptions, Pki, poll};

/// A reader of `GET /v1/events` (HTTP/1.0, so the body is plain lines).
struct Reader {
    stream: TcpStream,
    events: Arc<Mutex<Vec<Value>>>,
}

impl Reader {
    fn open(admin: SocketAddr, query: &str) -> Result<Self> {
        let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(5))?;
        write!(stream, "GET /v1/events?{query} HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let read = stream.try_clone()?;
        std::thread::spawn(move || {
            let mut body = false;
            for line in BufReader::new(read).lines().map_while(Result::ok) {
                if !body {
                    body = line.is_empty();
                    continue;
                }
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Ok(Self { stream, events })
    }

    fn seen(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Waits for an event matching `what`; returns it.
    fn wait(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let (event, _) = poll(what, Duration::from_secs(30), || {
            self.seen()
                .into_iter()
                .find(|e| pred(e))
                .ok_or_else(|| format!("{} events so far: {:?}", self.seen().len(), self.seen()))
        })?;
        Ok(event)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

fn is(e: &Value, kind: &str, action: &str) -> bool {
    e["type"] == kind && e["action"] == action
}

#[test]
fn events_arrive_in_order_and_resume_after_a_reconnect() -> Result<()> {
    let pki = Pki::new()?;
    let dir = pki.dir.path().to_owned();
    // n2 runs a handler from its config for member events.
    let handled = dir.join("handled");
    std::fs::create_dir_all(&handled)?;
    let n2_config = dir.join("n2.toml");
    std::fs::write(
        &n2_config,
        format!(
            "[[watch]]\ntypes = [\"member\"]\ncommand = [\"sh\", \"-c\", \"cat > {}/$GOSSAMER_EVENT_ID-$GOSSAMER_EVENT_ACTION-$GOSSAMER_EVENT_NODE.json\"]\ncoalesce = \"100ms\"\n",
            handled.display()
        ),
    )?;
    let mut n1 = Agent::start(&pki, "n1", AgentOptions::default())?;
    let n2 = Agent::start(
        &pki,
        "n2",
        AgentOptions {
            seeds: vec![n1.seed()],
            config: Some(n2_config),
            ..Default::default()
        },
    )?;
    let n3 = Agent::start(
        &pki,
        "n3",
        AgentOptions {
            seeds: vec![n1.seed()],
            ..Default::default()
        },
    )?;
    support::wait_states(
        &[&n2, &n3],
        &[("n1", "alive"), ("n2", "alive"), ("n3", "alive")],
        Duration::from_secs(30),
    )?;

    let reader = Reader::open(n3.admin, "type=member,service")?;
    // Give the stream a moment to be served before anything happens.
    std::thread::sleep(Duration::from_millis(300));
    n1.kill();
    let down = reader.wait("n3 streams n1 down", |e| {
        is(e, "member", "down") && e["node"] == "n1"
    })?;
    // n3 saw n1 go: now a registration on n2.
    let (status, body) = n2.register(
        "late-1",
        r#"{"name": "late", "port": 9, "address": "127.0.0.1"}"#,
    )?;
    ensure!(status == 200, "register: {status} {body}");
    let registered = reader.wait("n3 streams the registration on n2", |e| {
        is(e, "service", "registered") && e["service"] == "late" && e["node"] == "n2"
    })?;
    let id = |e: &Value| e["id"].as_u64().unwrap_or(0);
    ensure!(
        id(&down) < id(&registered),
        "out of order: {down} then {registered}"
    );
    let all = reader.seen();
    let ids: Vec<u64> = all.iter().map(id).collect();
    ensure!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids not increasing: {ids:?}"
    );
    let order: Vec<usize> = [&down, &registered]
        .iter()
        .map(|e| all.iter().position(|x| x == *e).unwrap())
        .collect();
    ensure!(order[0] < order[1], "delivered out of order: {all:?}");
    drop(reader);

    // Reconnect from the cursor of the down event: what came after it (the
    // registration, and a deregistration made while disconnected), nothing
    // before it.
    let (status, _) = n2.deregister("late-1")?;
    ensure!(status == 200);
    std::thread::sleep(Duration::from_secs(1));
    let resumed = Reader::open(n3.admin, &format!("after={}&type=service", id(&down)))?;
    resumed.wait("the resumed stream replays the deregistration", |e| {
        is(e, "service", "deregistered") && e["service"] == "late"
    })?;
    let replay = resumed.seen();
    ensure!(
        replay.first() == Some(&registered),
        "the resumed stream should start with the registration: {replay:?}"
    );
    ensure!(
        replay
            .iter()
            .all(|e| id(e) > id(&down) && e["type"] == "service"),
        "the resumed stream repeats old events or others: {replay:?}"
    );

    // Server-sent events carry ids for EventSource, and Last-Event-ID resumes.
    let mut sse = TcpStream::connect(n3.admin)?;
    sse.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        sse,
        "GET /v1/events?type=service HTTP/1.0\r\nAccept: text/event-stream\r\nLast-Event-ID: {}\r\n\r\n",
        id(&down)
    )?;
    let mut text = String::new();
    let mut lines = BufReader::new(sse).lines();
    while !text.contains("deregistered") {
        match lines.next() {
            Some(Ok(l)) => text.push_str(&format!("{l}\n")),
            _ => break,
        }
    }
    ensure!(
        text.contains("text/event-stream")
            && text.contains(&format!("id: {}\nevent: service\ndata: ", id(&registered))),
        "SSE stream: {text}"
    );

    // n2's [[watch]] handler wrote n1's down event to a file.
    let (file, _) = poll(
        "n2's handler to write n1's down event",
        Duration::from_secs(20),
        || {
            std::fs::read_dir(&handled)
                .map_err(|e| e.to_string())?
                .flatten()
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().ends_with("-down-n1.json"))
                .ok_or_else(|| "no file yet".to_string())
        },
    )?;
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&file)?)?;
    ensure!(
        is(&written, "member", "down") && written["node"] == "n1",
        "{written}"
    );

    // Bad requests change nothing and say why.
    let (status, body) = n3.get("/v1/events?type=nope")?;
    ensure!(
        status == 400 && body.contains("not an event type"),
        "{status} {body}"
    );
    let (status, _) = n3.get("/v1/events?after=x")?;
    ensure!(status == 400);
    Ok(())
}

/// `gossamer watch` against `admin`, its stderr to a file.
fn watch(admin: SocketAddr, log: &Path, args: &[&str]) -> Result<std::process::Child> {
    let mut all = vec!["watch".to_owned(), "--admin".into(), admin.to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    std::process::Command::new(support::binary())
        .args(&all)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .context("start gossamer watch")
}

#[test]
fn watch_runs_a_command_per_event_folds_bursts_and_kills_hung_handlers() -> Result<()> {
    let pki = Pki::new()?;
    let dir = pki.dir.path().to_owned();
    let operator = pki.issue_operator("ops")?;
    let n1 = Agent::start(&pki, "n1", AgentOptions::default())?;
    let out = dir.join("out");
    std::fs::create_dir_all(&out)?;
    let script = format!(
        "cat > {}/$GOSSAMER_EVENT_ID.json; echo \"$GOSSAMER_EVENT_TYPE $GOSSAMER_EVENT_ACTION $GOSSAMER_EVENT_COALESCED\" > {}/$GOSSAMER_EVENT_ID.env",
        out.display(),
        out.display()
    );
    let mut writer = watch(
        n1.admin,
        &dir.join("watch.log"),
        &["--coalesce", "1500ms", "--", "sh", "-c", &script],
    )?;
    let mut hung = watch(
        n1.admin,
        &dir.join("hung.log"),
        &[
            "--type",
            "service",
            "--timeout",
            "1s",
            "--coalesce",
            "100ms",
            "--",
            "sleep",
            "30",
        ],
    )?;
    std::thread::sleep(Duration::from_secs(1));

    // One event: a registration.
    let (status, _) = n1.register(
        "one",
        r#"{"name": "solo", "port": 9, "address": "127.0.0.1"}"#,
    )?;
    ensure!(status == 200);
    let files = || -> Vec<Value> {
        let mut v: Vec<Value> = std::fs::read_dir(&out)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| serde_json::from_str(&std::fs::read_to_string(e.path()).ok()?).ok())
            .collect();
        v.sort_by_key(|e| e["id"].as_u64());
        v
    };
    poll(
        "a file for the registration",
        Duration::from_secs(20),
        || {
            files()
                .iter()
                .any(|e| is(e, "service", "registered") && e["service"] == "solo")
                .then_some(())
                .ok_or(format!("{:?}", files()))
        },
    )?;

    // A burst: the same document applied three times in quick succession
    // is handled once, as its last version, standing for the others.
    let doc = dir.join("route.toml");
    for version in 1..=3 {
        std::fs::write(
            &doc,
            format!(
                "[[route]]\nname = \"web\"\ncircuit_breaker = {{ max_requests = {} }}\n",
                50 + version
            ),
        )?;
        let applied = support::config_apply(&n1, &doc, &operator);
        ensure!(
            applied.status.success(),
            "config apply: {}",
            String::from_utf8_lossy(&applied.stderr)
        );
    }
    poll("the burst to be handled", Duration::from_secs(20), || {
        let runs: Vec<Value> = files()
            .into_iter()
            .filter(|e| e["type"] == "config" && e["document"] == "route/web")
            .collect();
        (!runs.is_empty())
            .then_some(runs)
            .ok_or_else(|| "not yet".to_string())
    })?;
    std::thread::sleep(Duration::from_secs(2)); // nothing more should come
    let route_runs: Vec<Value> = files()
        .into_iter()
        .filter(|e| e["type"] == "config" && e["document"] == "route/web")
        .collect();
    ensure!(
        route_runs.len() == 1,
        "the burst ran the command {} times: {route_runs:?}",
        route_runs.len()
    );
    let last = &route_runs[0];
    let env = std::fs::read_to_string(out.join(format!("{}.env", last["id"])))?;
    let folded: usize = env.split_whitespace().nth(2).unwrap_or("0").parse()?;
    ensure!(env.starts_with("config applied "), "{env}");
    ensure!(folded >= 2, "the burst was not coalesced: {env}");
    let (status, body) = n1.get("/v1/config/route/web")?;
    ensure!(
        status == 200 && body.contains(&format!("\"version\": {}", last["version"])),
        "handled {last}, held {body}"
    );

    // The hung handler was killed at its timeout and said so.
    let (report, _) = poll(
        "the hung handler to be reported",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(dir.join("hung.log")).unwrap_or_default();
            text.contains("ran past 1s and was killed")
                .then_some(text.clone())
                .ok_or(text)
        },
    )?;
    ensure!(report.contains("(service registered)"), "{report}");
    // ... and handled the next event all the same.
    let (status, _) = n1.deregister("one")?;
    ensure!(status == 200);
    poll(
        "the next event after a timeout to be handled",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(dir.join("hung.log")).unwrap_or_default();
            (text.matches("was killed").count() >= 2)
                .then_some(())
                .ok_or(text)
        },
    )?;

    // A command that fails is reported too.
    let failing_log = dir.join("failing.log");
    let mut failing = watch(
        n1.admin,
        &failing_log,
        &["--type", "service", "--", "false"],
    )?;
    std::thread::sleep(Duration::from_secs(1));
    n1.register(
        "two",
        r#"{"name": "solo", "port": 9, "address": "127.0.0.1"}"#,
    )?;
    poll(
        "the failing handler to be reported",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(&failing_log).unwrap_or_default();
            text.contains("the command failed: exit status: 1")
                .then_some(())
                .ok_or(text)
        },
    )?;
    for child in [&mut writer, &mut hung, &mut failing] {
        let _ = child.kill();
        let _ = child.wait();
    }
    // Without a command, watch refuses to start.
    let out = support::gossamer(&["watch", "--admin", &n1.admin.to_string()]);
    ensure!(!out.status.success());
    Ok(())
}
