//! `gossamer loadgen`: steady HTTP traffic through an agent's proxy, with a
//! per-second report of outcomes and of which instances answered.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::Request;
use http_body_util::BodyExt;
use serde::Serialize;

use crate::proxy::body;

/// Options of `gossamer loadgen`.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The agent's outbound proxy.
    pub proxy: SocketAddr,
    /// Service to call.
    pub service: String,
    /// Requests per second.
    pub rate: u32,
    /// Distinct hash keys to cycle through.
    pub keys: u32,
    /// Stop after this long (None: run until stopped).
    pub duration: Option<Duration>,
    /// Print one JSON summary at the end instead of per-second lines.
    pub json: bool,
}

/// What a run saw.
#[derive(Debug, Default, Clone, Serialize)]
pub struct LoadReport {
    /// Requests sent.
    pub sent: u64,
    /// 2xx answers.
    pub ok: u64,
    /// Anything else (including transport errors).
    pub failed: u64,
    /// Answers per instance (`x-served-by`).
    pub by_instance: BTreeMap<String, u64>,
}

/// Runs until the duration is over (or forever) and returns the totals.
pub async fn run(options: LoadOptions) -> LoadReport {
    let client = body::http_client();
    let mut total = LoadReport::default();
    let mut second = LoadReport::default();
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(
        1.0 / f64::from(options.rate.max(1)),
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_report = Instant::now();
    let mut n: u64 = 0;
    loop {
        if options.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        tick.tick().await;
        let key = format!("key-{}", n % u64::from(options.keys.max(1)));
        n += 1;
        let req = Request::get(format!("http://{}/", options.proxy))
            .header(http::header::HOST, &options.service)
            .header("x-hash-key", key)
            .body(body::empty())
            .expect("valid request");
        let outcome = tokio::time::timeout(Duration::from_secs(10), client.request(req)).await;
        second.sent += 1;
        match outcome {
            Ok(Ok(resp)) if resp.status().is_success() => {
                let by = resp
                    .headers()
                    .get("x-served-by")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
                    .to_owned();
                let _ = resp.into_body().collect().await;
                second.ok += 1;
                *second.by_instance.entry(by).or_default() += 1;
            }
            Ok(Ok(resp)) => {
                let _ = resp.into_body().collect().await;
                second.failed += 1;
            }
            _ => second.failed += 1,
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            if !options.json {
                let spread: Vec<String> = second
                    .by_instance
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!(
                    "t={:>5.1}s sent={} ok={} failed={} {}",
                    start.elapsed().as_secs_f64(),
                    second.sent,
                    second.ok,
                    second.failed,
                    spread.join(" ")
                );
            }
            merge(&mut total, std::mem::take(&mut second));
            last_report = Instant::now();
        }
    }
    merge(&mut total, second);
    total
}

fn merge(into: &mut LoadReport, from: LoadReport) {
    into.sent += from.sent;
    into.ok += from.ok;
    into.failed += from.failed;
    for (k, v) in from.by_instance {
        *into.by_instance.entry(k).or_default() += v;
    }
}
