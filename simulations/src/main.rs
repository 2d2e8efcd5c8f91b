//! `gossamer-sim`: run one scenario and print its summary.
//!
//! stdout carries only the summary table, which is the same for the same
//! seed; the progress bar and the wall-clock time go to stderr.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use gossamer_membership::SwimConfig;
use gossamer_membership::links::LinkPolicy;
use gossamer_sim::cpu::Costs;
use gossamer_sim::formation::FormationOptions;
use gossamer_sim::scenario::{Options, Scenario};
use gossamer_sim::sim::HostConfig;

/// Deterministic simulations of the Gossamer membership core on virtual
/// time.
#[derive(Debug, Parser)]
#[command(name = "gossamer-sim", version)]
struct Args {
    /// What to simulate.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Nodes.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Seed of every random choice; the same seed gives the same output.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Probability that a datagram is lost, 0 to 1 (`loss` sweeps 0 to 0.2
    /// unless this is given).
    #[arg(long)]
    loss: Option<f64>,
    /// Mean one-way latency in milliseconds.
    #[arg(long, default_value_t = 1.0)]
    latency: f64,
    /// Length of the measured phase in seconds of virtual time (for
    /// `join`, the whole run).
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Directory for summary.json, CSV files and SVG plots.
    #[arg(long)]
    out: Option<PathBuf>,
    /// SWIM timing file (TOML or JSON, the agent's `swim` settings, e.g.
    /// `probe_period = "1s"`); defaults otherwise.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Nodes to crash (`crash`); default 1 % of the nodes, at least 1.
    #[arg(long)]
    kill: Option<usize>,
    /// Partition length in seconds (`partition`).
    #[arg(long, default_value_t = 20.0)]
    split: f64,
    /// Non-seed nodes start at random instants within this many seconds.
    #[arg(long, default_value_t = 2.0)]
    join_window: f64,
    /// Give up waiting for the cluster to form after this many seconds
    /// (`formation`: after the last start).
    #[arg(long, default_value_t = 300.0)]
    form_limit: f64,
    /// `partition` goes on past the phase until every node agrees, for at
    /// most this many seconds after the heal.
    #[arg(long, default_value_t = 600.0)]
    settle_limit: f64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Kills and catalog changes, each (`compare`).
    #[arg(long, default_value_t = 20)]
    repeat: usize,
    /// Partitions (`compare`).
    #[arg(long, default_value_t = 5)]
    partitions: usize,
    #[command(flatten)]
    host: HostArgs,
}

/// Machines, CPU costs and connections. Without `--machines` each node
/// has a machine of its own with unlimited CPU and is always connected
/// (`formation` defaults to one machine).
#[derive(Debug, clap::Args)]
struct HostArgs {
    /// Place the nodes on this many machines (round-robin), with finite
    /// CPU and the connection model.
    #[arg(long)]
    machines: Option<usize>,
    /// Cores per machine.
    #[arg(long, default_value_t = 2)]
    cores: u32,
    /// Cost file (TOML, microseconds), as printed by
    /// `cargo run --release -p gossamer-transport --example handshake_cost`;
    /// the flags below override it.
    #[arg(long)]
    costs: Option<PathBuf>,
    /// CPU per side of a full handshake, in microseconds.
    #[arg(long)]
    cost_handshake_full: Option<f64>,
    /// CPU per side of a resumed handshake, in microseconds.
    #[arg(long)]
    cost_handshake_resumed: Option<f64>,
    /// CPU to send a datagram, in microseconds.
    #[arg(long)]
    cost_datagram_send: Option<f64>,
    /// CPU to receive a datagram, in microseconds.
    #[arg(long)]
    cost_datagram_recv: Option<f64>,
    /// CPU per stream message sent or received, in microseconds.
    #[arg(long)]
    cost_stream_message: Option<f64>,
    /// CPU per member of a member sync payload, in microseconds.
    #[arg(long)]
    cost_sync_member: Option<f64>,
    /// CPU per timer wake-up, in microseconds.
    #[arg(long)]
    cost_timer: Option<f64>,
    /// CPU to start a process (exec, runtime, keys, listeners), in
    /// microseconds.
    #[arg(long)]
    cost_process_start: Option<f64>,
    /// The agent's own CPU per input handled (on top of the transport's),
    /// in microseconds.
    #[arg(long)]
    cost_agent_input: Option<f64>,
    /// The agent's own CPU per stream message sent or received (on top of
    /// the transport's), in microseconds.
    #[arg(long)]
    cost_agent_stream: Option<f64>,
    /// CPU a running process spends every second whatever its traffic, in
    /// microseconds.
    #[arg(long)]
    cost_background: Option<f64>,
    /// CPU a running process spends every second per member it holds
    /// active, in microseconds.
    #[arg(long)]
    cost_member: Option<f64>,
    /// Close a link after this many idle seconds (the agent's policy;
    /// default: the agent's).
    #[arg(long, default_value_t = LinkPolicy::default().idle.as_secs_f64())]
    link_idle: f64,
    /// Above this many links, close the least recently used idle ones
    /// (default: the agent's).
    #[arg(long, default_value_t = LinkPolicy::default().max_links)]
    max_links: usize,
    /// `formation`: nodes started per second.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// `formation`: seconds to wait after forming before the quiet window
    /// (`bench/scale.py --settle`).
    #[arg(long, default_value_t = 15.0)]
    settle: f64,
    /// `formation`: seconds of quiet cluster measured after forming and
    /// settling (`bench/scale.py --idle`).
    #[arg(long, default_value_t = 30.0)]
    idle: f64,
}

impl HostArgs {
    fn costs(&self) -> anyhow::Result<Costs> {
        let mut c = match &self.costs {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => Costs::default(),
        };
        let overrides = [
            (self.cost_handshake_full, &mut c.handshake_full_us),
            (self.cost_handshake_resumed, &mut c.handshake_resumed_us),
            (self.cost_datagram_send, &mut c.datagram_send_us),
            (self.cost_datagram_recv, &mut c.datagram_recv_us),
            (self.cost_stream_message, &mut c.stream_message_us),
            (self.cost_sync_member, &mut c.sync_member_us),
            (self.cost_timer, &mut c.timer_us),
            (self.cost_process_start, &mut c.process_start_us),
            (self.cost_agent_input, &mut c.agent_input_us),
            (self.cost_agent_stream, &mut c.agent_stream_us),
            (self.cost_background, &mut c.background_us_per_s),
            (self.cost_member, &mut c.member_us_per_s),
        ];
        for (flag, field) in overrides {
            if let Some(v) = flag {
                *field = v;
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// The host model, if asked for (or `default_machines` given).
    fn host(&self, default_machines: Option<usize>) -> anyhow::Result<Option<HostConfig>> {
        let Some(machines) = self.machines.or(default_machines) else {
            return Ok(None);
        };
        anyhow::ensure!(machines >= 1, "--machines must be at least 1");
        anyhow::ensure!(self.cores >= 1, "--cores must be at least 1");
        let mut host = HostConfig::new(machines, self.cores);
        host.costs = self.costs()?;
        host.links = LinkPolicy {
            idle: seconds(self.link_idle, "link-idle")?,
            max_links: self.max_links,
        };
        Ok(Some(host))
    }
}

fn seconds(v: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v).with_context(|| format!("--{flag}: {v} is not a duration"))
}

fn load_swim(path: &Path) -> anyhow::Result<SwimConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let config: SwimConfig = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
    } else {
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
    };
    config
        .validate()
        .with_context(|| format!("checking {}", path.display()))?;
    Ok(config)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let swim = match &args.config {
        Some(p) => load_swim(p)?,
        None => SwimConfig::default(),
    };
    let opts = Options {
        scenario: args.scenario,
        nodes: args.nodes,
        seed: args.seed,
        loss: args.loss,
        latency: seconds(args.latency / 1000.0, "latency")?,
        duration: seconds(args.duration, "duration")?,
        swim,
        kill: args.kill,
        split: seconds(args.split, "split")?,
        join_window: seconds(args.join_window, "join-window")?,
        form_limit: seconds(args.form_limit, "form-limit")?,
        settle_limit: seconds(args.settle_limit, "settle-limit")?,
        progress: !args.quiet,
    };
    // Wall-clock time of the run, reported on stderr only.
    #[allow(clippy::disallowed_methods)]
    let started = Instant::now();
    if opts.scenario == Scenario::Formation {
        let host = args
            .host
            .host(Some(1))?
            .context("formation needs a machine")?;
        let f = FormationOptions {
            nodes: opts.nodes,
            seed: opts.seed,
            latency: opts.latency,
            rate: args.host.rate,
            swim: opts.swim.clone(),
            host,
            limit: opts.form_limit,
            settle: seconds(args.host.settle, "settle")?,
            idle: seconds(args.host.idle, "idle")?,
            progress: opts.progress,
        };
        let report = gossamer_sim::formation::run(&f)?;
        print!("{}", report.render());
        if let Some(dir) = &args.out {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let path = dir.join("formation.json");
            let mut json = serde_json::to_string_pretty(&report)?;
            json.push('\n');
            std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        eprintln!("wall time: {:.1} s", started.elapsed().as_secs_f64());
        return Ok(());
    }
    if opts.scenario == Scenario::Compare {
        let comparison = gossamer_sim::compare::run(&opts, args.repeat, args.partitions)?;
        print!("{}", comparison.render());
        if let Some(dir) = &args.out {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let path = dir.join("compare.json");
            let mut json = serde_json::to_string_pretty(&comparison)?;
            json.push('\n');
            std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        eprintln!("wall time: {:.1} s", started.elapsed().as_secs_f64());
        return Ok(());
    }
    let host = args.host.host(None)?;
    let report = gossamer_sim::scenario::run_on(&opts, host.as_ref())?;
    let wall = started.elapsed();
    print!("{}", report.render());
    if let Some(dir) = &args.out {
        for path in gossamer_sim::output::write_all(&report, dir)? {
            eprintln!("wrote {}", path.display());
        }
    }
    eprintln!("wall time: {:.1} s", wall.as_secs_f64());
    Ok(())
}
