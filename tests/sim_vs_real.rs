//! The simulator against real agents: 24 `gossamer agent` processes on
//! loopback and `gossamer-sim` at 24 nodes run the same three experiments,
//! and the test prints both sides' figures side by side:
//!
//! 1. `kill -9` of one agent: seconds until each observer lists it `down`
//!    (median and last observer, mean over kills);
//! 2. a service registration through one agent's admin API: seconds until
//!    every other agent holds the new catalog entry;
//! 3. a 20 s partition into two halves (with registrations on both sides),
//!    then the heal: seconds until every agent holds every other one active
//!    at its current generation and every catalog is the same.
//!
//! The simulator side is [`gossamer_sim::compare`] with the agent's default
//! SWIM timing, 0.1 ms one-way latency and no loss. The test fails when a
//! simulated figure is more than 20 % away from the real one, after printing
//! the whole table.
//!
//! Every agent is polled on its own thread every 25 ms. An arrival is
//! bracketed by the start of the last request that did not see it and the
//! end of the first that did; an event (kill, registration, heal) by the
//! moments just before and after the action. A real figure is the middle of
//! the bracket `[arrival low - event high, arrival high - event low]`, and
//! the table shows its mean half-width: that is the measurement's
//! resolution, nothing is subtracted from it.
//!
//! Heavy (24 agents, about five minutes), so ignored; run it with a release
//! build, on a machine doing little else:
//!
//! ```text
//! cargo test --release -p gossamer-node --test sim_vs_real -- --ignored --nocapture
//! ```

mod support;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use gossamer_membership::SwimConfig;
use gossamer_sim::compare::{Figures, Samples};
use gossamer_sim::scenario::{Options, SEEDS, Scenario};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use support::{Agent, AgentOptions, Pki, Ports, poll};

/// Agents, and simulated nodes.
const N: usize = 24;
/// How often each agent is polled.
const POLL: Duration = Duration::from_millis(25);
/// Real kills and catalog changes (each).
const KILLS: usize = 5;
const CHANGES: usize = 10;
/// Real partitions.
const PARTITIONS: usize = 8;
/// How long each partition lasts.
const SPLIT: Duration = Duration::from_secs(20);
/// The simulator repeats each experiment more often: it costs nothing.
const SIM_REPEAT: usize = 40;
const SIM_PARTITIONS: usize = 40;
/// Largest accepted |simulated / real - 1|.
const TOLERANCE: f64 = 0.20;
/// Quiet time between experiments, as in the simulator.
const SETTLE: Duration = Duration::from_secs(2);
/// Agreement must hold this long before a heal is considered settled.
const STABLE: Duration = Duration::from_secs(3);

/// One look at an agent: when the request went out, when the answer was
/// in, and what it said.
#[derive(Debug, Clone)]
struct Look<T> {
    sent: Instant,
    answered: Instant,
    seen: T,
}

/// An instant known to lie in `[lo, hi]`.
#[derive(Debug, Clone, Copy)]
struct Bracket {
    lo: Instant,
    hi: Instant,
}

impl Bracket {
    /// Runs `action` and brackets it.
    fn around<T>(action: impl FnOnce() -> T) -> (T, Self) {
        let lo = Instant::now();
        let out = action();
        (
            out,
            Self {
                lo,
                hi: Instant::now(),
            },
        )
    }

    /// Seconds from `event` to this instant: (middle, half-width).
    fn after(&self, event: Bracket) -> (f64, f64) {
        let low = self.lo.saturating_duration_since(event.hi).as_secs_f64();
        let high = self.hi.saturating_duration_since(event.lo).as_secs_f64();
        ((low + high) / 2.0, (high - low) / 2.0)
    }
}

/// Polls every agent of `agents` on its own thread every [`POLL`] with
/// `look` (failed looks are skipped). An agent's thread stops once a look
/// satisfies `finished`; everything stops once `done` holds for the
/// latest look of every agent (checked every 20 ms), or fails after
/// `deadline` naming `what`. Returns every look, per agent.
fn watch<T: Clone + Send + std::fmt::Debug>(
    what: &str,
    agents: &[&Agent],
    deadline: Duration,
    look: impl Fn(&Agent) -> Option<T> + Sync,
    finished: impl Fn(&T) -> bool + Sync,
    mut done: impl FnMut(&[Option<T>]) -> bool,
) -> Result<Vec<Vec<Look<T>>>> {
    let looks: Vec<Mutex<Vec<Look<T>>>> = agents.iter().map(|_| Mutex::new(Vec::new())).collect();
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let outcome = std::thread::scope(|scope| {
        for (agent, out) in agents.iter().zip(&looks) {
            let (look, finished, stop) = (&look, &finished, &stop);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    if let Some(seen) = look(agent) {
                        let answered = Instant::now();
                        let end = finished(&seen);
                        out.lock().unwrap().push(Look {
                            sent,
                            answered,
                            seen,
                        });
                        if end {
                            return;
                        }
                    }
                    std::thread::sleep((sent + POLL).saturating_duration_since(Instant::now()));
                }
            });
        }
        let result = loop {
            let latest: Vec<Option<T>> = looks
                .iter()
                .map(|l| l.lock().unwrap().last().map(|l| l.seen.clone()))
                .collect();
            if done(&latest) {
                break Ok(());
            }
            if start.elapsed() > deadline {
                break Err(anyhow::anyhow!(
                    "timed out after {deadline:?} waiting for {what}; latest looks: {latest:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        stop.store(true, Ordering::Relaxed);
        result
    });
    outcome?;
    Ok(looks.into_iter().map(|l| l.into_inner().unwrap()).collect())
}

/// When `looks` first satisfied `ok`, for good: between the start of the
/// last look that did not (or `since`) and the end of the next one.
fn settled<T>(looks: &[Look<T>], since: Instant, ok: impl Fn(&T) -> bool) -> Option<Bracket> {
    let last_bad = looks.iter().rposition(|l| !ok(&l.seen));
    let first_good = last_bad.map_or(0, |i| i + 1);
    let hi = looks.get(first_good)?.answered;
    let lo = last_bad.map_or(since, |i| looks[i].sent);
    Some(Bracket { lo, hi })
}

/// One agent's member table: name -> (state, generation), and its own
/// generation.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Members {
    own_generation: u64,
    rows: BTreeMap<String, (String, u64)>,
}

fn members(agent: &Agent) -> Option<Members> {
    let (status, body) = agent.get("/v1/members").ok()?;
    if status != 200 {
        return None;
    }
    let rows: Vec<Value> = serde_json::from_str(&body).ok()?;
    let mut own_generation = 0;
    let mut table = BTreeMap::new();
    for r in rows {
        let name = r["name"].as_str()?.to_owned();
        let generation = r["generation"].as_u64()?;
        if r["self"].as_bool() == Some(true) {
            own_generation = generation;
        } else {
            table.insert(name, (r["state"].as_str()?.to_owned(), generation));
        }
    }
    Some(Members {
        own_generation,
        rows: table,
    })
}

/// Whether `m` (the table of `own`) holds every other agent of `truth`
/// (name -> current generation) at that generation, alive (or, unless
/// `strict`, suspect: active, as the simulator counts it).
fn view_right(own: &str, m: &Members, truth: &BTreeMap<String, u64>, strict: bool) -> bool {
    truth
        .iter()
        .filter(|(n, _)| n.as_str() != own)
        .all(|(n, g)| {
            m.rows.get(n).is_some_and(|(state, generation)| {
                generation == g && (state == "alive" || (!strict && state == "suspect"))
            })
        })
}

/// Each agent's own generation, as it reports itself.
fn generations(agents: &[Agent]) -> Result<BTreeMap<String, u64>> {
    agents
        .iter()
        .map(|a| {
            let m = members(a).with_context(|| format!("{}: no member table", a.name))?;
            Ok((a.name.clone(), m.own_generation))
        })
        .collect()
}

/// Polls until every agent holds every other alive at its current
/// generation.
fn wait_all_alive(agents: &[Agent], deadline: Duration) -> Result<Duration> {
    let (_, took) = poll("every view right", deadline, || {
        let truth = generations(agents).map_err(|e| e.to_string())?;
        for a in agents {
            let m = members(a).ok_or(format!("{}: no member table", a.name))?;
            if !view_right(&a.name, &m, &truth, true) {
                return Err(format!("{} holds {:?}", a.name, m.rows));
            }
        }
        Ok(())
    })?;
    Ok(took)
}

struct Mesh {
    pki: Pki,
    agents: Vec<Agent>,
    ports: Vec<Ports>,
    seeds: Vec<String>,
}

impl Mesh {
    /// `n0` first, `n1` and `n2` through it, the rest through those three
    /// seeds (as the simulator joins), each on explicit free ports.
    fn start() -> Result<Self> {
        let pki = Pki::new()?;
        let mut mesh = Self {
            pki,
            agents: Vec::new(),
            ports: Vec::new(),
            seeds: Vec::new(),
        };
        for i in 0..N {
            let ports = Ports::free()?;
            let seeds = if i == 0 {
                Vec::new()
            } else {
                mesh.seeds.clone()
            };
            let agent = mesh.spawn(i, ports, seeds)?;
            if i < SEEDS {
                mesh.seeds.push(agent.seed());
            }
            mesh.agents.push(agent);
            mesh.ports.push(ports);
        }
        Ok(mesh)
    }

    fn spawn(&self, i: usize, ports: Ports, seeds: Vec<String>) -> Result<Agent> {
        let name = format!("n{i}");
        Agent::start(
            &self.pki,
            &name,
            AgentOptions {
                seeds,
                extra: vec!["--enable-fault-injection".into()],
                data_dir: Some(self.pki.data_dir(&name)),
                ports: Some(ports),
                ..Default::default()
            },
        )
    }

    /// Restarts agent `i` (killed before) on its ports and data dir.
    fn restart(&mut self, i: usize) -> Result<()> {
        self.agents[i] = self.spawn(i, self.ports[i], self.seeds.clone())?;
        Ok(())
    }

    fn all(&self) -> Vec<&Agent> {
        self.agents.iter().collect()
    }
}

/// Kills a random non-seed agent; returns each observer's seconds to
/// `down` (middles) and their half-widths.
fn kill(mesh: &mut Mesh, rng: &mut StdRng) -> Result<(Vec<f64>, Vec<f64>)> {
    let v = rng.random_range(SEEDS..N);
    let victim = mesh.agents[v].name.clone();
    let ((), killed) = Bracket::around(|| mesh.agents[v].kill());
    let observers: Vec<&Agent> = mesh.agents.iter().filter(|a| a.name != victim).collect();
    let is_down = |s: &Option<String>| s.as_deref() == Some("down");
    let looks = watch(
        &format!("{victim} down everywhere"),
        &observers,
        Duration::from_secs(60),
        |a| {
            let m = members(a)?;
            Some(m.rows.get(&victim).map(|(s, _)| s.clone()))
        },
        is_down,
        |latest| latest.iter().all(|s| s.as_ref().is_some_and(is_down)),
    )?;
    let mut times = Vec::new();
    let mut widths = Vec::new();
    for (a, l) in observers.iter().zip(&looks) {
        let at = settled(l, killed.hi, is_down)
            .with_context(|| format!("{} never listed {victim} down", a.name))?;
        let (t, w) = at.after(killed);
        times.push(t);
        widths.push(w);
    }
    mesh.restart(v)?;
    wait_all_alive(&mesh.agents, Duration::from_secs(60))
        .with_context(|| format!("after restarting {victim}"))?;
    Ok((times, widths))
}

/// A registration on agent `owner`; returns each other agent's seconds to
/// hold it, and the half-widths.
fn change(mesh: &Mesh, owner: usize, round: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let o = &mesh.agents[owner];
    let body = format!(r#"{{"name": "compare", "port": {}}}"#, 9000 + round);
    let (answer, registered) = Bracket::around(|| o.register(&format!("cmp-{round}"), &body));
    let (status, answer) = answer?;
    ensure!(
        status == 200,
        "registration on {}: {status} {answer}",
        o.name
    );
    let version = serde_json::from_str::<Value>(&answer)?["version"]
        .as_u64()
        .context("no version in the registration's answer")?;
    let others: Vec<&Agent> = mesh.agents.iter().filter(|a| a.name != o.name).collect();
    let holds = |v: &u64| *v >= version;
    let looks = watch(
        &format!("{} version {version} everywhere", o.name),
        &others,
        Duration::from_secs(30),
        |a| {
            let versions = a.node_versions()?;
            Some(
                versions
                    .into_iter()
                    .find(|(n, _)| *n == o.name)
                    .map_or(0, |(_, v)| v),
            )
        },
        holds,
        |latest| latest.iter().all(|v| v.as_ref().is_some_and(holds)),
    )?;
    let mut times = Vec::new();
    let mut widths = Vec::new();
    for (a, l) in others.iter().zip(&looks) {
        let at = settled(l, registered.hi, holds)
            .with_context(|| format!("{} never held the change", a.name))?;
        let (t, w) = at.after(registered);
        times.push(t);
        widths.push(w);
    }
    Ok((times, widths))
}

/// What one agent showed after a heal.
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    members: Members,
    catalog: Vec<(String, u64)>,
}

/// Every agent posts (or deletes) its block list at once; brackets the
/// moment the last one took effect.
fn set_partition(mesh: &Mesh, blocks: &[Option<Vec<String>>]) -> Result<Bracket> {
    let results: Vec<Result<(u16, Bracket)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = mesh
            .agents
            .iter()
            .zip(blocks)
            .map(|(a, b)| {
                scope.spawn(move || {
                    let peers: Option<Vec<&str>> =
                        b.as_ref().map(|v| v.iter().map(String::as_str).collect());
                    let (status, at) = Bracket::around(|| a.partition(peers.as_deref()));
                    Ok((status?, at))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut last: Option<Bracket> = None;
    for (a, r) in mesh.agents.iter().zip(results) {
        let (status, at) = r?;
        ensure!(
            status == 200,
            "{}: /v1/debug/partition answered {status}",
            a.name
        );
        last = Some(match last {
            None => at,
            Some(l) => Bracket {
                lo: l.lo.max(at.lo),
                hi: l.hi.max(at.hi),
            },
        });
    }
    last.context("no agents")
}

/// Seconds from the heal to (full agreement, membership agreement, every
/// view alive-only right), with the half-width of the first.
struct Heal {
    full: f64,
    members: f64,
    strict: f64,
    width: f64,
}

fn partition(mesh: &Mesh, rng: &mut StdRng, round: usize) -> Result<Heal> {
    let mut order: Vec<usize> = (0..N).collect();
    order.shuffle(rng);
    let sides = [order[..N / 2].to_vec(), order[N / 2..].to_vec()];
    let names = |side: &[usize]| -> Vec<String> {
        side.iter().map(|&i| mesh.agents[i].name.clone()).collect()
    };
    let blocks: Vec<Option<Vec<String>>> = (0..N)
        .map(|i| {
            let other = if sides[0].contains(&i) { 1 } else { 0 };
            Some(names(&sides[other]))
        })
        .collect();
    let split = set_partition(mesh, &blocks)?;
    for q in 1..=3u32 {
        std::thread::sleep((split.hi + SPLIT * q / 4).saturating_duration_since(Instant::now()));
        for (s, side) in sides.iter().enumerate() {
            let owner = &mesh.agents[side[rng.random_range(0..side.len())]];
            let id = format!("split-{round}-{q}-{s}");
            let (status, body) = owner.register(&id, r#"{"name": "split-side", "port": 7000}"#)?;
            ensure!(
                status == 200,
                "registration on {}: {status} {body}",
                owner.name
            );
        }
    }
    std::thread::sleep((split.hi + SPLIT).saturating_duration_since(Instant::now()));
    let healed = set_partition(mesh, &vec![None; N])?;
    let all = mesh.all();
    let look = |a: &Agent| {
        Some(State {
            members: members(a)?,
            catalog: a.node_versions()?,
        })
    };
    // Agreement is every view right against every agent's own generation,
    // and one catalog everywhere; it must hold for STABLE.
    let agree = |latest: &[Option<State>]| -> bool {
        let Some(states) = latest
            .iter()
            .map(Option::as_ref)
            .collect::<Option<Vec<&State>>>()
        else {
            return false;
        };
        let truth: BTreeMap<String, u64> = mesh
            .agents
            .iter()
            .zip(&states)
            .map(|(a, s)| (a.name.clone(), s.members.own_generation))
            .collect();
        mesh.agents
            .iter()
            .zip(&states)
            .all(|(a, s)| view_right(&a.name, &s.members, &truth, false))
            && states.iter().all(|s| s.catalog == states[0].catalog)
    };
    let mut since: Option<Instant> = None;
    let looks = watch(
        "agreement after the heal",
        &all,
        Duration::from_secs(180),
        look,
        |_| false,
        |latest| {
            if agree(latest) {
                since.get_or_insert_with(Instant::now).elapsed() >= STABLE
            } else {
                since = None;
                false
            }
        },
    )?;
    // The final looks are the truth every earlier look is measured against.
    let finals: Vec<&State> = looks
        .iter()
        .map(|l| l.last().map(|l| &l.seen).context("an agent never answered"))
        .collect::<Result<_>>()?;
    let truth: BTreeMap<String, u64> = mesh
        .agents
        .iter()
        .zip(&finals)
        .map(|(a, s)| (a.name.clone(), s.members.own_generation))
        .collect();
    let catalog = &finals[0].catalog;
    let when = |ok: &dyn Fn(&str, &State) -> bool| -> Result<(f64, f64)> {
        let mut last: Option<Bracket> = None;
        for (a, l) in mesh.agents.iter().zip(&looks) {
            let at = settled(l, healed.lo, |s| ok(&a.name, s))
                .with_context(|| format!("{} never agreed", a.name))?;
            last = Some(last.map_or(at, |b| Bracket {
                lo: b.lo.max(at.lo),
                hi: b.hi.max(at.hi),
            }));
        }
        Ok(last.context("no agents")?.after(healed))
    };
    let (full, width) =
        when(&|n, s| view_right(n, &s.members, &truth, false) && s.catalog == *catalog)?;
    let (members_only, _) = when(&|n, s| view_right(n, &s.members, &truth, false))?;
    let (strict, _) =
        when(&|n, s| view_right(n, &s.members, &truth, true) && s.catalog == *catalog)?;
    Ok(Heal {
        full,
        members: members_only,
        strict,
        width,
    })
}

fn simulate() -> Result<Figures> {
    let opts = Options {
        scenario: Scenario::Compare,
        nodes: N,
        seed: 1,
        loss: None,
        latency: Duration::from_micros(100),
        duration: Duration::from_secs(60),
        swim: SwimConfig::default(),
        kill: None,
        split: SPLIT,
        join_window: Duration::from_secs(2),
        form_limit: Duration::from_secs(120),
        settle_limit: Duration::from_secs(300),
        progress: false,
    };
    let c = gossamer_sim::compare::run(&opts, SIM_REPEAT, SIM_PARTITIONS)?;
    print!("{}", c.render());
    Ok(c.figures)
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

#[test]
#[ignore = "starts 24 agents for about five minutes; run by hand (see the file header)"]
fn simulator_agrees_with_real_agents() -> Result<()> {
    let simulated = simulate()?;
    let load_before = load();
    let started = Instant::now();
    let mut mesh = Mesh::start()?;
    wait_all_alive(&mesh.agents, Duration::from_secs(120))?;
    println!(
        "real: {N} agents started and agreed in {:.1} s (load average {load_before})",
        started.elapsed().as_secs_f64()
    );
    let mut rng = StdRng::seed_from_u64(1);
    let pause = |rng: &mut StdRng| {
        std::thread::sleep(SETTLE + Duration::from_millis(rng.random_range(0..1000)));
    };
    pause(&mut rng);

    let mut samples = Samples::default();
    let mut widths = [Vec::new(), Vec::new(), Vec::new()];
    for k in 0..KILLS {
        let (times, w) = kill(&mut mesh, &mut rng)?;
        println!(
            "real kill {k}: down after {:.3}..{:.3} s (median {:.3})",
            times.iter().copied().fold(f64::INFINITY, f64::min),
            times.iter().copied().fold(0.0, f64::max),
            gossamer_sim::metrics::percentile(&sorted(times.clone()), 0.5).unwrap_or(0.0)
        );
        samples.kills.push(sorted(times));
        widths[0].extend(w);
        pause(&mut rng);
    }
    for c in 0..CHANGES {
        let owner = rng.random_range(0..N);
        let (times, w) = change(&mesh, owner, c)?;
        println!(
            "real change {c} on n{owner}: at every node after {:.3} s",
            times.iter().copied().fold(0.0, f64::max)
        );
        samples.changes.push(sorted(times));
        widths[1].extend(w);
        pause(&mut rng);
    }
    let mut strict = Vec::new();
    for p in 0..PARTITIONS {
        let h = partition(&mesh, &mut rng, p)?;
        println!(
            "real partition {p}: membership agreed {:.3} s after the heal, with catalogs {:.3} s (±{:.3}), every view alive-only {:.3} s",
            h.members, h.full, h.width, h.strict
        );
        samples.heals.push(h.full);
        samples.heals_membership.push(h.members);
        strict.push(h.strict);
        widths[2].push(h.width);
        pause(&mut rng);
    }
    let real = samples.figures();
    println!(
        "real: {} kills, {} changes, {} partitions in {:.0} s; load average {} before, {} after; polling every {POLL:?}",
        real.kills,
        real.changes,
        real.partitions,
        started.elapsed().as_secs_f64(),
        load_before,
        load()
    );
    println!(
        "resolution (mean half-width of the brackets): down ±{:.3} s, catalog ±{:.3} s, heal ±{:.3} s; heal with every view alive (not suspect): {:.3} s mean",
        mean(&widths[0]),
        mean(&widths[1]),
        mean(&widths[2]),
        mean(&strict)
    );

    println!();
    println!(
        "| figure | real (s) | simulated (s) | simulated / real | within ±{:.0} % |",
        TOLERANCE * 100.0
    );
    println!("|---|---|---|---|---|");
    let mut outside = Vec::new();
    for (r, s) in real.rows().iter().zip(simulated.rows()) {
        let (Some(rv), Some(sv)) = (r.value, s.value) else {
            bail!(
                "{}: no value (real {:?}, simulated {:?})",
                r.name,
                r.value,
                s.value
            );
        };
        let ratio = sv / rv;
        let ok = (ratio - 1.0).abs() <= TOLERANCE;
        let verdict = match (r.checked, ok) {
            (false, _) => "(not checked)",
            (true, true) => "yes",
            (true, false) => "NO",
        };
        println!(
            "| {} | {rv:.3} | {sv:.3} | {ratio:.2} | {verdict} |",
            r.name
        );
        if r.checked && !ok {
            outside.push(format!(
                "{}: real {rv:.3} s, simulated {sv:.3} s ({:+.0} %)",
                r.name,
                (ratio - 1.0) * 100.0
            ));
        }
    }
    ensure!(
        outside.is_empty(),
        "simulated figures more than {:.0} % from the real ones:\n  {}",
        TOLERANCE * 100.0,
        outside.join("\n  ")
    );
    Ok(())
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}
