//! Command-line interface (clap). Every agent flag also reads a `GOSSAMER_*`
//! environment variable; the config file fills in what neither sets.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Default admin API address, also used by the CLI subcommands.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:7947";

/// Gossamer: a service mesh with no control plane.
#[derive(Debug, Parser)]
#[command(name = "gossamer", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: join the mesh and serve the admin API.
    Agent(Box<AgentArgs>),
    /// Manage the mesh certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Issue node and operator certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Mesh-wide configuration: signed documents every agent applies.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Show the members a running agent knows.
    Members(MembersArgs),
    /// Watch the requests an agent carries, live (GET /v1/tap).
    Tap(TapArgs),
    /// Golden signals per service and route: req/s, success rate, p50/p90/p99.
    Stat(StatArgs),
    /// The golden signals as a live-updating view.
    Top(TopArgs),
    /// Run a command for each event: members, services, health, config.
    Watch(WatchArgs),
    /// List the mesh's services with their passing/total instances.
    Services(ListArgs),
    /// Show the instances of one service.
    Service(ServiceArgs),
    /// Start a 3-node mesh on loopback, drive traffic, break it, report.
    Demo(DemoArgs),
    /// Send steady traffic through an agent's proxy and report who answered.
    Loadgen(LoadgenArgs),
    /// Run the small demo HTTP service (reports which instance answered).
    DemoService(DemoServiceArgs),
    /// Exit 0 if the local agent answers /health (for container healthchecks).
    Health(AdminArgs),
    /// Ask the local agent to leave the mesh and shut down.
    Leave(AdminArgs),
}

/// `gossamer ca ...`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a new mesh CA: writes DIR/ca.pem and DIR/ca.key.
    Init {
        /// Where to write the CA.
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain of the mesh (in every node's spiffe:// identity).
        #[arg(long, default_value = gossamer_transport::pki::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
}

/// `gossamer cert ...`
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Issue a node certificate (--name) or an operator certificate
    /// (--operator, for signing configuration documents only): writes
    /// OUT/NAME.pem and OUT/NAME.key.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// The node name the certificate is for.
        #[arg(
            long,
            required_unless_present = "operator",
            conflicts_with = "operator"
        )]
        name: Option<String>,
        /// The operator the certificate is for.
        #[arg(long)]
        operator: Option<String>,
        /// A service the node may host (repeatable); '*' allows any. A node
        /// certificate without one lets its node host no service.
        #[arg(long = "service", value_name = "SERVICE", conflicts_with = "operator")]
        services: Vec<String>,
        /// How long a node certificate is valid (e.g. 30d, 12h).
        #[arg(long, default_value = "30d", value_parser = gossamer_membership::duration::parse, conflicts_with = "operator")]
        ttl: std::time::Duration,
        /// Where to write the certificate and key.
        #[arg(long)]
        out: PathBuf,
        /// Trust domain of the mesh.
        #[arg(long, default_value = gossamer_transport::pki::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Revoke certificates: writes the CA's whole revocation list (an X.509
    /// CRL) to CA_DIR/crl.pem; `gossamer config apply` spreads it, and
    /// every agent then refuses the certificates and cuts their
    /// connections.
    Revoke {
        /// Directory holding ca.pem and ca.key (and issued.log).
        #[arg(long)]
        ca_dir: PathBuf,
        /// Revoke every unexpired node certificate issued to this node
        /// (repeatable; read from CA_DIR/issued.log).
        #[arg(long = "name", value_name = "NODE")]
        names: Vec<String>,
        /// Revoke the certificate with this serial number (hex; repeatable).
        #[arg(long = "serial", value_name = "HEX")]
        serials: Vec<String>,
        /// Revoke the certificate in this PEM file (repeatable).
        #[arg(long = "cert", value_name = "FILE")]
        certs: Vec<PathBuf>,
        /// Where to write the CRL (default CA_DIR/crl.pem).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `gossamer config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check, sign and submit documents from TOML or JSON files; prints the
    /// version assigned and a diff against the live document.
    Apply {
        /// Files holding documents (`[[route]]` tables, ...).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        #[command(flatten)]
        /// Who signs.
        signer: SignerArgs,
        #[command(flatten)]
        /// Which agent.
        admin: AdminArgs,
        /// Check, sign and show the diff, but submit nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show one document.
    Get {
        /// Its kind (`route`, ...).
        kind: String,
        /// Its name.
        name: String,
        #[command(flatten)]
        /// Which agent.
        admin: AdminArgs,
        /// Print the agent's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// List the documents an agent holds, and recent refusals.
    List {
        #[command(flatten)]
        /// Which agent.
        admin: AdminArgs,
        /// Only this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Print the agent's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Delete a document: a signed tombstone, so no stale node can bring it
    /// back.
    Delete {
        /// Its kind.
        kind: String,
        /// Its name.
        name: String,
        #[command(flatten)]
        /// Who signs.
        signer: SignerArgs,
        #[command(flatten)]
        /// Which agent.
        admin: AdminArgs,
    },
}

/// The operator certificate and key that sign documents.
#[derive(Debug, Args)]
pub struct SignerArgs {
    /// Operator certificate (PEM), from `gossamer cert issue --operator`.
    #[arg(long, env = "GOSSAMER_OPERATOR_CERT", value_name = "PEM")]
    pub operator_cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, env = "GOSSAMER_OPERATOR_KEY", value_name = "PEM")]
    pub operator_key: PathBuf,
}

/// Flags of `gossamer agent`. All optional: unset ones come from the
/// environment, then the config file, then defaults.
#[derive(Debug, Default, Args)]
pub struct AgentArgs {
    /// TOML config file.
    #[arg(long, env = "GOSSAMER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Node name (default: the name in the certificate, or the host name).
    #[arg(long, env = "GOSSAMER_NAME")]
    pub name: Option<String>,
    /// QUIC/UDP address to bind [default: 0.0.0.0:7946].
    #[arg(long, env = "GOSSAMER_BIND", value_name = "IP:PORT")]
    pub bind: Option<String>,
    /// Address peers should use to reach this node [default: the bind
    /// address, or the address that routes to the first seed].
    #[arg(long, env = "GOSSAMER_ADVERTISE", value_name = "IP:PORT")]
    pub advertise: Option<String>,
    /// Outbound HTTP proxy for local applications [default: 127.0.0.1:7948].
    #[arg(long, env = "GOSSAMER_PROXY", value_name = "IP:PORT")]
    pub proxy: Option<String>,
    /// Admin HTTP API address [default: 127.0.0.1:7947].
    #[arg(long, env = "GOSSAMER_ADMIN", value_name = "IP:PORT")]
    pub admin: Option<String>,
    /// Serve as a gateway: a plain-HTTP ingress listener on this address,
    /// routed by `ingress` documents (HTTPS listeners: `[ingress]` in the
    /// config file).
    #[arg(long, env = "GOSSAMER_INGRESS", value_name = "IP:PORT")]
    pub ingress: Option<String>,
    /// A peer to join through (repeatable; host names resolve).
    #[arg(
        long = "seed",
        env = "GOSSAMER_SEEDS",
        value_delimiter = ',',
        value_name = "HOST:PORT"
    )]
    pub seeds: Vec<String>,
    /// Mesh CA certificate (PEM).
    #[arg(long, env = "GOSSAMER_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This node's certificate (PEM).
    #[arg(long, env = "GOSSAMER_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, env = "GOSSAMER_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Where the agent keeps its state (members, generation).
    #[arg(long, env = "GOSSAMER_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Development mode: make a CA and certificate in the data dir.
    #[arg(long, env = "GOSSAMER_DEV")]
    pub dev: bool,
    /// Log level or filter (overrides RUST_LOG), e.g. `debug` or
    /// `gossamer=debug,info`.
    #[arg(long, env = "GOSSAMER_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log format: `auto` (text on a terminal, JSON otherwise), `text`, `json`.
    #[arg(long, env = "GOSSAMER_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Async worker threads [default: 2]. With 1, every task runs on the
    /// main thread: requests ready at once leave in shared QUIC packets,
    /// the cheapest setting per request on one core.
    #[arg(long, env = "GOSSAMER_THREADS", value_name = "N")]
    pub threads: Option<usize>,
    /// Largest QUIC packet, in bytes, to peers on this host (loopback
    /// addresses) [default: 16384]. 1452 or less sends them Ethernet-sized
    /// packets like every other peer: less memory per connection when many
    /// agents share a host, slower bulk transfers between them.
    #[arg(long, env = "GOSSAMER_LOOPBACK_MTU", value_name = "BYTES")]
    pub loopback_mtu: Option<u32>,
    /// File holding the admin API token required on writes (mandatory when
    /// --admin is not a loopback address).
    #[arg(long, env = "GOSSAMER_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Serve the `/v1/debug/partition` fault-injection routes (tests, drills).
    #[arg(long, env = "GOSSAMER_ENABLE_FAULT_INJECTION")]
    pub enable_fault_injection: bool,
}

/// `--admin` for the client subcommands.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Admin API of the agent to ask.
    #[arg(long, env = "GOSSAMER_ADMIN", default_value = DEFAULT_ADMIN, value_name = "IP:PORT")]
    pub admin: SocketAddr,
    /// File holding the agent's admin token (sent on writes).
    #[arg(long, env = "GOSSAMER_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
}

/// `gossamer tap`.
#[derive(Debug, Args)]
pub struct TapArgs {
    /// Only requests to this service.
    pub service: Option<String>,
    #[command(flatten)]
    /// Which agent.
    pub admin: AdminArgs,
    /// Only paths starting with this.
    #[arg(long)]
    pub path: Option<String>,
    /// Only this method.
    #[arg(long)]
    pub method: Option<String>,
    /// Only this status (503) or class (5xx).
    #[arg(long)]
    pub status: Option<String>,
    /// At most this many requests a second are shown (the rest are counted).
    #[arg(long, default_value_t = 100.0)]
    pub max_rate: f64,
    /// Show these request headers' values (comma-separated); the others are
    /// redacted.
    #[arg(long, value_delimiter = ',')]
    pub headers: Vec<String>,
    /// Print the JSON lines as they come.
    #[arg(long)]
    pub json: bool,
}

/// `gossamer stat`.
#[derive(Debug, Args)]
pub struct StatArgs {
    #[command(flatten)]
    /// Which agent.
    pub admin: AdminArgs,
    /// The window the figures cover (2s to 60s).
    #[arg(long, default_value = "10s")]
    pub window: String,
    /// Ask the agent's peers too and merge what they saw (a mesh-wide view).
    #[arg(long)]
    pub mesh: bool,
    /// With --mesh, ask at most this many peers (at most 64).
    #[arg(long)]
    pub peers: Option<usize>,
    /// Only this service.
    #[arg(long)]
    pub service: Option<String>,
    /// Print the JSON answer.
    #[arg(long)]
    pub json: bool,
}

/// `gossamer top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    /// Which agent.
    pub admin: AdminArgs,
    /// The window the figures cover (2s to 60s).
    #[arg(long, default_value = "10s")]
    pub window: String,
    /// Ask the agent's peers too (a mesh-wide view).
    #[arg(long)]
    pub mesh: bool,
    /// Time between refreshes.
    #[arg(long, default_value = "2s")]
    pub interval: String,
    /// Stop after this many refreshes (default: until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
    /// Only this service.
    #[arg(long)]
    pub service: Option<String>,
}

/// `gossamer watch`.
#[derive(Debug, Args)]
#[command(
    after_help = "The command gets the event as JSON on stdin, and GOSSAMER_EVENT_ID, _TYPE, _ACTION, \
_NODE, _SERVICE, _INSTANCE and _COALESCED in its environment. Example:\n  \
gossamer watch --type service --service web -- ./render-upstreams.sh"
)]
pub struct WatchArgs {
    #[command(flatten)]
    /// Which agent.
    pub admin: AdminArgs,
    /// Only these event types (member, service, health, config, outlier); repeatable or comma-separated.
    #[arg(long = "type", value_delimiter = ',')]
    pub types: Vec<String>,
    /// Only events about this service.
    #[arg(long)]
    pub service: Option<String>,
    /// Kill a run of the command after this long.
    #[arg(long, default_value = "30s")]
    pub timeout: String,
    /// Quiet time that ends a burst of events (events about the same thing in a burst are handled once).
    #[arg(long, default_value = "500ms")]
    pub coalesce: String,
    /// Start after this event id (replays the kept events after it); default: from now on.
    #[arg(long)]
    pub after: Option<u64>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// `gossamer members`.
#[derive(Debug, Args)]
pub struct MembersArgs {
    #[command(flatten)]
    /// Which agent.
    pub admin: AdminArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `gossamer services`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    /// Which agent.
    pub admin: AdminArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `gossamer service NAME`.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// The service.
    pub name: String,
    #[command(flatten)]
    /// Which agent.
    pub admin: AdminArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `gossamer demo-service`.
#[derive(Debug, Args)]
pub struct DemoServiceArgs {
    /// Address to listen on.
    #[arg(
        long,
        env = "DEMO_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "IP:PORT"
    )]
    pub listen: SocketAddr,
    /// The name it answers with (default: the host name).
    #[arg(long, env = "DEMO_NAME")]
    pub name: Option<String>,
}

/// `gossamer demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Leave the mesh running afterwards and print commands to try.
    #[arg(long)]
    pub keep_running: bool,
    /// Distinct keys sent through each agent.
    #[arg(long, default_value_t = 1000)]
    pub keys: usize,
    /// Keep certificates and data here instead of a temp dir.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Show the agents' logs (level or filter, e.g. `info`).
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// `gossamer loadgen`.
#[derive(Debug, Args)]
pub struct LoadgenArgs {
    /// The agent's outbound proxy.
    #[arg(
        long,
        env = "GOSSAMER_PROXY",
        default_value = "127.0.0.1:7948",
        value_name = "IP:PORT"
    )]
    pub proxy: SocketAddr,
    /// Service to call.
    #[arg(long, default_value = "web")]
    pub service: String,
    /// Requests per second.
    #[arg(long, default_value_t = 10)]
    pub rate: u32,
    /// Distinct hash keys to cycle through.
    #[arg(long, default_value_t = 100)]
    pub keys: u32,
    /// Stop after this many seconds (0: run until stopped).
    #[arg(long, default_value_t = 0)]
    pub duration: u64,
    /// Print one JSON summary at the end instead of per-second lines.
    #[arg(long)]
    pub json: bool,
}
