//! The web console in a real browser: Debian's headless Chromium, driven
//! over the DevTools protocol by tests/console/cdp.py, against a 5-agent
//! mesh. The page must load without console errors, list the members,
//! show a killed agent down within 2 s of the agent itself, and show a
//! service's request rate rise under load.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use support::{Agent, AgentOptions, DemoService, Pki, poll};

/// The browser, through the driver script.
struct Browser {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Browser {
    fn open(url: &str) -> Result<Self> {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/console/cdp.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["chromium", url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start the browser driver")?;
        let input = child.stdin.take().context("stdin")?;
        let output = BufReader::new(child.stdout.take().context("stdout")?);
        let mut browser = Self {
            child,
            input,
            output,
        };
        let ready = browser.line()?;
        ensure!(ready["ready"] == true, "the page did not load: {ready}");
        Ok(browser)
    }

    fn line(&mut self) -> Result<Value> {
        let mut line = String::new();
        self.output.read_line(&mut line)?;
        ensure!(!line.is_empty(), "the browser driver exited");
        Ok(serde_json::from_str(&line)?)
    }

    fn ask(&mut self, command: &str) -> Result<Value> {
        writeln!(self.input, "{command}")?;
        let answer = self.line()?;
        if let Some(e) = answer.get("error") {
            bail!("{command}: {e}");
        }
        Ok(answer["value"].clone())
    }

    fn eval(&mut self, js: &str) -> Result<Value> {
        self.ask(&format!("eval {js}"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.input, "quit");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn load(proxy: SocketAddr, seconds: u64) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(seconds);
        let mut ok = 0;
        while Instant::now() < until {
            if let Ok((200, _)) = support::via_proxy(proxy, "web", "k", "/") {
                ok += 1;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        ok
    })
}

#[test]
fn the_console_shows_the_mesh_live() -> Result<()> {
    if let Err(why) = support::ensure_installed("chromium", "chromium") {
        eprintln!("SKIP: the console test needs Debian's chromium package: {why}");
        return Ok(());
    }
    if let Err(why) = support::ensure_installed("python3", "python3") {
        eprintln!("SKIP: the browser driver needs the python3 package: {why}");
        return Ok(());
    }
    let pki = Pki::new()?;
    let web = DemoService::start("web-1", None)?;
    let mut agents = support::mesh(&pki, 5, &[])?;
    let (status, body) = agents[1].register(
        "web-1",
        &format!(
            r#"{{"name": "web", "port": {}, "address": "127.0.0.1"}}"#,
            web.addr.port()
        ),
    )?;
    ensure!(status == 200, "register: {body}");
    support::wait_health(
        &agents.iter().collect::<Vec<_>>(),
        "web",
        "web-1",
        Some("passing"),
        Duration::from_secs(30),
    )?;

    let url = format!("http://{}/ui/", agents[0].admin);
    let mut browser = Browser::open(&url)?;
    // The members, with their states.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let alive =
            browser.eval("document.querySelectorAll('#members tr[data-state=alive]').length")?;
        if alive == 5 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the console lists {alive} alive members, not 5"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let names = browser.eval(
        "[...document.querySelectorAll('#members tr')].map(r => r.dataset.member).sort().join(',')",
    )?;
    ensure!(names == "n1,n2,n3,n4,n5", "members listed: {names}");

    // The request rate of `web` rises under load through n1.
    let rps = |b: &mut Browser| -> Result<f64> {
        let v =
            b.eval("(document.querySelector('[data-service-rps=web]') || {}).textContent || ''")?;
        Ok(v.as_str().unwrap_or("").parse().unwrap_or(-1.0))
    };
    let (before, _) = poll(
        "web in the console's services",
        Duration::from_secs(10),
        || {
            let v = rps(&mut browser).map_err(|e| e.to_string())?;
            (v >= 0.0)
                .then_some(v)
                .ok_or_else(|| "no row for web".to_string())
        },
    )?;
    ensure!(before < 1.0, "web shows {before} req/s before any load");
    let traffic = load(agents[0].proxy, 12);
    let (during, _) = poll(
        "the console's req/s of web to rise",
        Duration::from_secs(15),
        || {
            let v = rps(&mut browser).map_err(|e| e.to_string())?;
            (v >= 5.0).then_some(v).ok_or(format!("{v} req/s"))
        },
    )?;
    let edge = browser.eval("document.querySelector('[data-edge=\"n1->web\"]') !== null")?;
    ensure!(edge == true, "the topology has no n1 -> web edge");
    let sent = traffic.join().expect("load thread");
    ensure!(sent > 50, "only {sent} requests answered under load");
    eprintln!(
        "console: web at {before} req/s before the load, {during} during it ({sent} requests)"
    );

    // A killed agent shows as down within 2 s of n1 declaring it down.
    agents[4].kill();
    let killed = Instant::now();
    let (mut api_down, mut ui_down) = (None, None);
    while ui_down.is_none() || api_down.is_none() {
        ensure!(
            killed.elapsed() < Duration::from_secs(60),
            "n5 not shown down: api {api_down:?} ui {ui_down:?}"
        );
        if api_down.is_none() && agents[0].state_of("n5").as_deref() == Some("down") {
            api_down = Some(killed.elapsed());
        }
        if ui_down.is_none()
            && browser.eval("(document.querySelector('#members tr[data-member=n5]') || {dataset: {}}).dataset.state")?
                == "down"
        {
            ui_down = Some(killed.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (api, ui) = (api_down.unwrap(), ui_down.unwrap());
    eprintln!("console: n5 down at n1's API after {api:?}, in the console after {ui:?}");
    ensure!(
        ui <= api + Duration::from_secs(2),
        "the console showed n5 down {ui:?} after the kill, the API {api:?}"
    );
    // The event stream showed it too.
    let events = browser
        .eval("[...document.querySelectorAll('#events li')].map(l => l.textContent).join('\\n')")?;
    ensure!(
        events.as_str().unwrap_or("").contains("member down n5"),
        "the events list lacks n5's death:\n{events}"
    );

    let shot = pki.dir.path().join("console.png");
    browser.ask(&format!("screenshot {}", shot.display()))?;
    let png = std::fs::read(&shot)?;
    ensure!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot of {} bytes",
        png.len()
    );
    if let Ok(keep) = std::env::var("GOSSAMER_CONSOLE_SCREENSHOT") {
        std::fs::copy(&shot, keep)?;
    }
    let errors = browser.ask("errors")?;
    ensure!(errors == serde_json::json!([]), "console errors: {errors}");
    drop(agents);
    Ok(())
}

#[test]
fn console_files_are_served_with_a_strict_policy() -> Result<()> {
    let pki = Pki::new()?;
    let agent = Agent::start(&pki, "n1", AgentOptions::default())?;
    let (status, page) = agent.get("/ui/")?;
    ensure!(
        status == 200 && page.contains("<title>Gossamer console</title>"),
        "{status}"
    );
    for (path, needle) in [("/ui/app.js", "EventSource"), ("/ui/app.css", "--bg")] {
        let (status, body) = agent.get(path)?;
        ensure!(status == 200 && body.contains(needle), "{path}: {status}");
    }
    let (status, _) = agent.get("/ui/nope.js")?;
    ensure!(status == 404);
    let mut stream = std::net::TcpStream::connect(agent.admin)?;
    write!(
        stream,
        "GET /ui/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    std::io::Read::read_to_string(&mut stream, &mut raw)?;
    ensure!(
        raw.contains("content-security-policy: default-src 'self'"),
        "no policy header: {raw}"
    );
    Ok(())
}
