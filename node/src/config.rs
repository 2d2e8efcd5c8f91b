//! Agent configuration: flags > environment > file > defaults, parsed and
//! checked before anything binds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use gossamer_membership::identity::validate_name;
use gossamer_membership::{LinkPolicy, SwimConfig};
use serde::Deserialize;

use crate::catalog::CatalogConfig;
use crate::catalog::registry::ServiceSpec;
use crate::cli::AgentArgs;
use crate::listener::LimitsConfig;
use crate::proxy::ProxyConfig;
use crate::proxy::routes::HashPolicy;

/// The agent's settings, validated.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Node name, when set explicitly (otherwise taken from the certificate).
    pub name: Option<String>,
    /// UDP bind address.
    pub bind: SocketAddr,
    /// Address to advertise, if set.
    pub advertise: Option<SocketAddr>,
    /// Admin API address.
    pub admin: SocketAddr,
    /// Seeds as given (host:port), resolved at join time.
    pub seeds: Vec<String>,
    /// Where certificates come from.
    pub tls: TlsSource,
    /// State directory.
    pub data_dir: PathBuf,
    /// SWIM timing.
    pub swim: SwimConfig,
    /// Log filter.
    pub log_level: Option<String>,
    /// Log format.
    pub log_format: LogFormat,
    /// Services from `[[service]]` blocks.
    pub services: Vec<ServiceSpec>,
    /// Upstream listeners from `[[upstream]]` blocks.
    pub upstreams: Vec<crate::upstreams::UpstreamSpec>,
    /// Catalog timing.
    pub catalog: CatalogConfig,
    /// Whether `/v1/debug/*` fault injection is served.
    pub fault_injection: bool,
    /// Data-plane settings, with the outbound listener's address.
    pub proxy: ProxyConfig,
    /// Connection limits of the proxy and admin listeners.
    pub limits: LimitsConfig,
    /// Gateway listeners and their limits.
    pub ingress: crate::gateway::IngressConfig,
    /// Access logs.
    pub access_log: crate::observe::access::AccessLogConfig,
    /// Distributed traces.
    pub tracing: crate::observe::trace::TraceConfig,
    /// Watch handlers run for the agent's lifetime.
    pub watches: Vec<crate::events::watch::Handler>,
    /// How many connections to peers are kept open, and for how long.
    pub peer_links: LinkPolicy,
    /// The largest QUIC packet sent to peers on this host.
    pub loopback_mtu: u16,
    /// The admin API's bearer token for writes, read from
    /// `admin_token_file`; required when the admin listener is not on
    /// loopback.
    pub admin_token: Option<AdminToken>,
}

/// A secret the admin API requires on writes (`Authorization: Bearer`).
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// Reads a token file: its first line, trimmed; at least 16 characters
    /// of visible ASCII.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("admin_token_file: {}: {e}", path.display()))?;
        let token = text.lines().next().unwrap_or("").trim();
        if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "admin_token_file: {}: the token must be at least 16 visible ASCII characters on the first line (for example `head -c 32 /dev/urandom | base64`)",
                path.display()
            ));
        }
        Ok(Self(token.to_owned()))
    }

    /// Whether an `Authorization` header value carries this token; the
    /// comparison takes the same time wherever the first difference is.
    pub fn accepts(&self, header: Option<&[u8]>) -> bool {
        let Some(given) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        let want = self.0.as_bytes();
        given.len() == want.len()
            && given
                .iter()
                .zip(want)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// The header value a client sends.
    pub fn header(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

/// Where the node's identity comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// Files issued by `gossamer ca init` / `gossamer cert issue`.
    Files {
        /// CA certificate.
        ca: PathBuf,
        /// Node certificate.
        cert: PathBuf,
        /// Node key.
        key: PathBuf,
    },
    /// `--dev`: a CA and certificate generated in the data dir.
    Dev,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Text on a terminal, JSON lines otherwise.
    Auto,
    /// Human-readable text.
    Text,
    /// JSON lines.
    Json,
}

/// A configuration problem; printed as one line, exit code 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// QUIC needs 1,200 bytes; UDP carries at most 65,527 (over IPv6).
fn loopback_mtu(bytes: Option<u32>) -> Result<u16, ConfigError> {
    let Some(bytes) = bytes else {
        return Ok(gossamer_transport::TransportConfig::default().loopback_mtu);
    };
    match u16::try_from(bytes) {
        Ok(mtu @ 1200..=65527) => Ok(mtu),
        _ => err(format!(
            "loopback_mtu: {bytes} is outside 1200..=65527 (QUIC needs 1,200 bytes; a UDP payload holds at most 65,527)"
        )),
    }
}

/// The TOML file. Unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    name: Option<String>,
    bind: Option<String>,
    advertise: Option<String>,
    admin: Option<String>,
    seeds: Option<Vec<String>>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    dev: Option<bool>,
    log_level: Option<String>,
    log_format: Option<String>,
    swim: Option<SwimConfig>,
    catalog: Option<CatalogConfig>,
    proxy: Option<ProxyConfig>,
    limits: Option<LimitsConfig>,
    ingress: Option<crate::gateway::IngressConfig>,
    access_log: Option<crate::observe::access::AccessLogConfig>,
    tracing: Option<crate::observe::trace::TraceConfig>,
    watch: Option<Vec<crate::events::watch::WatchConfig>>,
    peer_links: Option<LinkPolicy>,
    loopback_mtu: Option<u32>,
    admin_token_file: Option<PathBuf>,
    service: Option<Vec<toml::Value>>,
    upstream: Option<Vec<toml::Value>>,
    enable_fault_injection: Option<bool>,
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .or_else(|e| err(format!("config file {}: {e}", path.display())))?;
        toml::from_str(&text).or_else(|e| {
            let msg = e.message().to_owned();
            let line = e
                .span()
                .map(|s| text[..s.start].lines().count().max(1))
                .map(|l| format!(" (line {l})"))
                .unwrap_or_default();
            err(format!("config file {}{line}: {msg}", path.display()))
        })
    }
}

fn addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().or_else(|_| {
        err(format!(
            "{key}: {value:?} is not an IP:PORT address (for example 127.0.0.1:7946)"
        ))
    })
}

impl AgentConfig {
    /// Merges flags/env (already combined by clap) over the file over defaults.
    pub fn from_args(args: &AgentArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let name = args.name.clone().or(file.name);
        if let Some(n) = &name {
            validate_name(n).or_else(|e| err(format!("name: {e}")))?;
        }
        let bind = addr(
            "bind",
            args.bind
                .as_deref()
                .or(file.bind.as_deref())
                .unwrap_or("0.0.0.0:7946"),
        )?;
        let advertise = match args.advertise.as_deref().or(file.advertise.as_deref()) {
            Some(a) => {
                let a = addr("advertise", a)?;
                if a.ip().is_unspecified() || a.port() == 0 {
                    return err(format!(
                        "advertise: {a} cannot be reached by peers; give a concrete IP and port"
                    ));
                }
                Some(a)
            }
            None => None,
        };
        let admin = addr(
            "admin",
            args.admin
                .as_deref()
                .or(file.admin.as_deref())
                .unwrap_or(crate::cli::DEFAULT_ADMIN),
        )?;
        let seeds = if args.seeds.is_empty() {
            file.seeds.unwrap_or_default()
        } else {
            args.seeds.clone()
        };
        for seed in &seeds {
            check_seed(seed)?;
        }
        let dev = args.dev || file.dev.unwrap_or(false);
        let ca = args.ca.clone().or(file.ca);
        let cert = args.cert.clone().or(file.cert);
        let key = args.key.clone().or(file.key);
        let tls = match (dev, ca, cert, key) {
            (_, Some(ca), Some(cert), Some(key)) => TlsSource::Files { ca, cert, key },
            (true, None, None, None) => TlsSource::Dev,
            (true, ..) => {
                return err("dev: give all of ca, cert and key, or none of them with --dev");
            }
            (false, ca, cert, _) => {
                let missing = if ca.is_none() {
                    "ca"
                } else if cert.is_none() {
                    "cert"
                } else {
                    "key"
                };
                return err(format!(
                    "{missing}: not set; give --ca, --cert and --key (see `gossamer ca init` and `gossamer cert issue`), or use --dev"
                ));
            }
        };
        let data_dir = match args.data_dir.clone().or(file.data_dir) {
            Some(d) => d,
            None if dev => std::env::temp_dir().join(format!(
                "gossamer-dev-{}",
                name.as_deref().unwrap_or("agent")
            )),
            None => {
                return err("data_dir: not set; give --data-dir DIR (state kept across restarts)");
            }
        };
        let swim = file.swim.unwrap_or_default();
        swim.validate().or_else(|e| err(e.to_string()))?;
        let log_format = match args
            .log_format
            .as_deref()
            .or(file.log_format.as_deref())
            .unwrap_or("auto")
        {
            "auto" => LogFormat::Auto,
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return err(format!(
                    "log_format: {other:?} is not one of auto, text, json"
                ));
            }
        };
        let mut services: Vec<ServiceSpec> = Vec::new();
        for (i, block) in file.service.unwrap_or_default().iter().enumerate() {
            let json =
                serde_json::to_value(block).or_else(|e| err(format!("service[{i}]: {e}")))?;
            let spec = ServiceSpec::from_json(None, &json)
                .and_then(|spec| HashPolicy::parse(&spec.hash_policy).map(|_| spec))
                .or_else(|e| err(format!("service[{i}].{}: {}", e.field, e.problem)))?;
            if services.iter().any(|s| s.id == spec.id) {
                return err(format!(
                    "service[{i}].id: {:?} is used twice; give each block a unique id",
                    spec.id
                ));
            }
            services.push(spec);
        }
        let mut upstreams: Vec<crate::upstreams::UpstreamSpec> = Vec::new();
        for (i, block) in file.upstream.unwrap_or_default().iter().enumerate() {
            let json =
                serde_json::to_value(block).or_else(|e| err(format!("upstream[{i}]: {e}")))?;
            let spec = crate::upstreams::UpstreamSpec::from_json(None, &json)
                .or_else(|e| err(format!("upstream[{i}].{e}")))?;
            if let Some(other) = upstreams
                .iter()
                .find(|u| u.service == spec.service || u.listen == spec.listen)
            {
                return err(format!(
                    "upstream[{i}]: {} on {} clashes with the upstream for {} on {}: one listener per service and per address",
                    spec.service, spec.listen, other.service, other.listen
                ));
            }
            upstreams.push(spec);
        }
        let catalog = file.catalog.unwrap_or_default();
        if catalog.anti_entropy_interval.is_zero() {
            return err("catalog.anti_entropy_interval: must be positive");
        }
        let mut proxy = file.proxy.unwrap_or_default();
        if let Some(flag) = &args.proxy {
            proxy.listen = addr("proxy", flag)?;
        }
        proxy.validate().or_else(err)?;
        let limits = file.limits.unwrap_or_default();
        limits.validate().or_else(err)?;
        let mut ingress = file.ingress.unwrap_or_default();
        if let Some(flag) = &args.ingress {
            let listen = addr("ingress", flag)?;
            // The file may declare the same plain listener; one that
            // serves TLS or redirects there is a different listener.
            match ingress.listeners.iter().find(|l| l.listen == listen) {
                Some(l) if !l.tls.is_empty() || l.redirect_https_port.is_some() => {
                    return err(format!(
                        "ingress: --ingress {listen} is plain HTTP, but the config file's \
                         [[ingress.listener]] on {listen} {}; give them different addresses",
                        if l.tls.is_empty() {
                            "redirects to HTTPS"
                        } else {
                            "serves TLS"
                        }
                    ));
                }
                Some(_) => {}
                None => ingress
                    .listeners
                    .push(crate::gateway::config::ListenerConfig {
                        listen,
                        tls: Vec::new(),
                        redirect_https_port: None,
                    }),
            }
        }
        ingress.validate().or_else(err)?;
        let access_log = file.access_log.unwrap_or_default();
        access_log.validate().or_else(err)?;
        let tracing = file.tracing.unwrap_or_default();
        tracing.validate().or_else(err)?;
        let watches = file
            .watch
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, w)| w.handler(i))
            .collect::<Result<Vec<_>, _>>()
            .or_else(err)?;
        let peer_links = file.peer_links.unwrap_or_default();
        peer_links.validate().or_else(err)?;
        let loopback_mtu = loopback_mtu(args.loopback_mtu.or(file.loopback_mtu))?;
        let admin_token = match args
            .admin_token_file
            .as_ref()
            .or(file.admin_token_file.as_ref())
        {
            Some(path) => Some(AdminToken::load(path).or_else(err)?),
            None if !admin.ip().is_loopback() => {
                return err(format!(
                    "admin_token_file: required when the admin API listens on {admin}, which is not loopback (give --admin-token-file FILE)"
                ));
            }
            None => None,
        };
        let fault_injection =
            args.enable_fault_injection || file.enable_fault_injection.unwrap_or(false);
        let log_level = args.log_level.clone().or(file.log_level);
        if let Some(filter) = &log_level {
            tracing_subscriber::EnvFilter::try_new(filter)
                .or_else(|e| err(format!("log_level: {filter:?}: {e}")))?;
        }
        Ok(Self {
            name,
            bind,
            advertise,
            admin,
            seeds,
            tls,
            data_dir,
            swim,
            log_level,
            log_format,
            services,
            upstreams,
            catalog,
            fault_injection,
            proxy,
            limits,
            ingress,
            access_log,
            tracing,
            watches,
            peer_links,
            loopback_mtu,
            admin_token,
        })
    }
}

fn check_seed(seed: &str) -> Result<(), ConfigError> {
    let bad = || {
        err(format!(
            "seed: {seed:?} is not HOST:PORT (for example 10.0.0.5:7946 or node1:7946)"
        ))
    };
    if seed.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = seed.rsplit_once(':') else {
        return bad();
    };
    if host.is_empty() || port.parse::<u16>().is_err() || host.contains(['/', ' ']) {
        return bad();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> AgentArgs {
        AgentArgs {
            dev: true,
            ..Default::default()
        }
    }

    #[test]
    fn defaults() {
        let c = AgentConfig::from_args(&args()).unwrap();
        assert_eq!(c.bind, "0.0.0.0:7946".parse().unwrap());
        assert_eq!(c.admin, "127.0.0.1:7947".parse().unwrap());
        assert!(matches!(c.tls, TlsSource::Dev));
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.toml");
        std::fs::write(
            &path,
            "name = \"filename\"\nbind = \"127.0.0.1:1000\"\nseeds = [\"a:1\"]\n[swim]\nprobe_period = \"2s\"\n",
        )
        .unwrap();
        let mut a = args();
        a.config = Some(path);
        a.bind = Some("127.0.0.1:2000".into());
        let c = AgentConfig::from_args(&a).unwrap();
        assert_eq!(c.name.as_deref(), Some("filename"));
        assert_eq!(c.bind.port(), 2000);
        assert_eq!(c.seeds, vec!["a:1".to_string()]);
        assert_eq!(c.swim.probe_period, std::time::Duration::from_secs(2));
    }

    #[test]
    fn ingress_flag_joins_a_plain_listener_and_refuses_a_tls_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.toml");
        let mut a = args();
        a.config = Some(path.clone());
        a.ingress = Some("127.0.0.1:8080".into());
        std::fs::write(&path, "[[ingress.listener]]\nlisten = \"127.0.0.1:8080\"\n").unwrap();
        let c = AgentConfig::from_args(&a).unwrap();
        assert_eq!(c.ingress.listeners.len(), 1);
        for (listener, says) in [
            (
                "tls = [{ cert = \"c.pem\", key = \"k.pem\" }]",
                "serves TLS",
            ),
            ("redirect_https_port = 8443", "redirects to HTTPS"),
        ] {
            std::fs::write(
                &path,
                format!("[[ingress.listener]]\nlisten = \"127.0.0.1:8080\"\n{listener}\n"),
            )
            .unwrap();
            let e = AgentConfig::from_args(&a).unwrap_err().0;
            assert!(
                e.contains("--ingress 127.0.0.1:8080") && e.contains(says),
                "{e}"
            );
        }
    }

    #[test]
    fn service_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.toml");
        std::fs::write(
            &path,
            "[[service]]\nname = \"web\"\nport = 8080\ncheck = { http = \"/health\", interval = \"1s\" }\n\n[[service]]\nid = \"web-2\"\nname = \"web\"\nport = 8081\n",
        )
        .unwrap();
        let mut a = args();
        a.config = Some(path.clone());
        let c = AgentConfig::from_args(&a).unwrap();
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.services[0].id, "web");
        std::fs::write(&path, "[[service]]\nname = \"web\"\nport = 0\n").unwrap();
        let e = AgentConfig::from_args(&a).unwrap_err().0;
        assert!(e.starts_with("service[0].port"), "{e}");
        std::fs::write(
            &path,
            "[[service]]\nname = \"web\"\nport = 1\n[[service]]\nname = \"web\"\nport = 2\n",
        )
        .unwrap();
        let e = AgentConfig::from_args(&a).unwrap_err().0;
        assert!(e.starts_with("service[1].id"), "{e}");
    }

    #[test]
    fn proxy_settings_are_typed_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.toml");
        std::fs::write(
            &path,
            "[proxy]\nlisten = \"127.0.0.1:9000\"\n[proxy.service.web]\nrequest_timeout = \"250ms\"\n",
        )
        .unwrap();
        let mut a = args();
        a.config = Some(path.clone());
        let c = AgentConfig::from_args(&a).unwrap();
        assert_eq!(c.proxy.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(
            c.proxy.service["web"].request_timeout,
            Some(std::time::Duration::from_millis(250))
        );
        a.proxy = Some("127.0.0.1:9001".into());
        let c = AgentConfig::from_args(&a).unwrap();
        assert_eq!(c.proxy.listen.port(), 9001, "the flag wins");
        a.proxy = Some("nowhere".into());
        let e = AgentConfig::from_args(&a).unwrap_err().0;
        assert!(e.starts_with("proxy: "), "{e}");

        let a = AgentArgs {
            config: Some(path.clone()),
            ..args()
        };
        for (text, key) in [
            (
                "[proxy.service.web]\nrequest_timeout = \"soon\"\n",
                "proxy.service.web.request_timeout: ",
            ),
            (
                "[proxy.service.web]\nconnect_timeout = \"0s\"\n",
                "proxy.service.web.connect_timeout: must be positive",
            ),
            ("[proxy]\nlisten = \"nowhere\"\n", "proxy.listen: "),
            (
                "[[service]]\nname = \"web\"\nport = 1\nhash_policy = \"random\"\n",
                "service[0].hash_policy: ",
            ),
            (
                "[[service]]\nname = \"web\"\nport = 1\nhash_policy = \"header:a(b\"\n",
                "service[0].hash_policy: ",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = AgentConfig::from_args(&a).unwrap_err().0;
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.toml");
        std::fs::write(&path, "nmae = \"x\"\n").unwrap();
        let mut a = args();
        a.config = Some(path.clone());
        let e = AgentConfig::from_args(&a).unwrap_err().0;
        assert!(e.contains("nmae"), "{e}");

        std::fs::write(&path, "[swim]\nprobe_period = \"fast\"\n").unwrap();
        let e = AgentConfig::from_args(&a).unwrap_err().0;
        assert!(e.contains("fast"), "{e}");

        let mut a = args();
        a.bind = Some("localhost".into());
        assert!(
            AgentConfig::from_args(&a)
                .unwrap_err()
                .0
                .starts_with("bind:")
        );
        let mut a = args();
        a.seeds = vec!["nope".into()];
        assert!(
            AgentConfig::from_args(&a)
                .unwrap_err()
                .0
                .starts_with("seed:")
        );
        let mut a = args();
        a.dev = false;
        assert!(AgentConfig::from_args(&a).unwrap_err().0.starts_with("ca:"));
        let mut a = args();
        a.name = Some("bad name".into());
        assert!(
            AgentConfig::from_args(&a)
                .unwrap_err()
                .0
                .starts_with("name:")
        );
        let mut a = args();
        a.admin = Some("0.0.0.0:7947".into());
        let e = AgentConfig::from_args(&a).unwrap_err().0;
        assert!(e.starts_with("admin_token_file:"), "{e}");
        let token = dir.path().join("token");
        std::fs::write(&token, "short\n").unwrap();
        a.admin_token_file = Some(token.clone());
        let e = AgentConfig::from_args(&a).unwrap_err().0;
        assert!(e.starts_with("admin_token_file:"), "{e}");
        std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
        let c = AgentConfig::from_args(&a).unwrap();
        let t = c.admin_token.unwrap();
        assert!(t.accepts(Some(b"Bearer 0123456789abcdef0123")));
        assert!(!t.accepts(Some(b"Bearer 0123456789abcdef0124")));
        assert!(!t.accepts(Some(b"0123456789abcdef0123")));
        assert!(!t.accepts(None));

        std::fs::write(&path, "[limits]\nidle_timeout = \"0s\"\n").unwrap();
        let mut a = args();
        a.config = Some(path.clone());
        let e = AgentConfig::from_args(&a).unwrap_err().0;
        assert!(e.starts_with("limits.idle_timeout"), "{e}");

        std::fs::write(&path, "[peer_links]\nmax_links = 0\n").unwrap();
        let e = AgentConfig::from_args(&a).unwrap_err().0;
        assert!(e.starts_with("peer_links.max_links"), "{e}");
        std::fs::write(&path, "[peer_links]\nidle = \"2m\"\nmax_links = 64\n").unwrap();
        let c = AgentConfig::from_args(&a).unwrap();
        assert_eq!(c.peer_links.idle, std::time::Duration::from_secs(120));
        assert_eq!(c.peer_links.max_links, 64);
        assert_eq!(c.loopback_mtu, 16384);

        std::fs::write(&path, "loopback_mtu = 1452\n").unwrap();
        assert_eq!(AgentConfig::from_args(&a).unwrap().loopback_mtu, 1452);
        for bad in ["1199", "65528", "70000"] {
            std::fs::write(&path, format!("loopback_mtu = {bad}\n")).unwrap();
            let e = AgentConfig::from_args(&a).unwrap_err().0;
            assert!(
                e.starts_with(&format!("loopback_mtu: {bad} is outside")),
                "{e}"
            );
        }
        // The flag wins over the file.
        a.loopback_mtu = Some(9000);
        assert_eq!(AgentConfig::from_args(&a).unwrap().loopback_mtu, 9000);

        let mut a = args();
        a.config = Some(dir.path().join("missing.toml"));
        assert!(
            AgentConfig::from_args(&a)
                .unwrap_err()
                .0
                .contains("missing.toml")
        );
    }
}
