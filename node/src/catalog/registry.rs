//! Local service registrations: parsing and validating them (from the API's
//! JSON and the config file's `[[service]]` blocks), and persisting the
//! runtime ones in the data dir.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use gossamer_membership::catalog::{
    Health, InvalidService, Protocol, ServiceInstance, validate_instance_id,
};
use gossamer_membership::duration;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A health check on a local service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    /// What to probe.
    pub kind: CheckKind,
    /// Time between checks.
    #[serde(with = "gossamer_membership::duration")]
    pub interval: Duration,
    /// How long one check may take.
    #[serde(with = "gossamer_membership::duration")]
    pub timeout: Duration,
    /// Consecutive passes to turn `passing`.
    pub rise: u32,
    /// Consecutive failures to turn `critical`.
    pub fall: u32,
}

/// The probe of a check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// `GET path`; any 2xx passes.
    Http(String),
    /// A TCP connect passes.
    Tcp,
}

/// Check defaults.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Check defaults.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Check defaults.
pub const DEFAULT_RISE: u32 = 2;
/// Check defaults.
pub const DEFAULT_FALL: u32 = 3;

/// A registration as given by the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Instance id (unique on this node).
    pub id: String,
    /// Service name.
    pub name: String,
    /// Address the agent reaches it on.
    pub address: String,
    /// Port.
    pub port: u16,
    /// Tags.
    pub tags: Vec<String>,
    /// Version label.
    pub version: String,
    /// Weight.
    pub weight: u32,
    /// Hash policy.
    pub hash_policy: String,
    /// What the instance speaks.
    #[serde(default)]
    pub protocol: Protocol,
    /// Optional health check.
    pub check: Option<CheckSpec>,
}

fn bad<T>(field: &'static str, problem: impl Into<String>) -> Result<T, InvalidService> {
    Err(InvalidService {
        field,
        problem: problem.into(),
    })
}

fn string(obj: &Map<String, Value>, field: &'static str) -> Result<Option<String>, InvalidService> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => bad(field, "must be a string"),
    }
}

fn uint(
    obj: &Map<String, Value>,
    field: &'static str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, InvalidService> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => bad(field, format!("must be a whole number from {min} to {max}")),
        },
    }
}

fn dur(
    obj: &Map<String, Value>,
    field: &'static str,
    default: Duration,
) -> Result<Duration, InvalidService> {
    match string(obj, field)? {
        None => Ok(default),
        Some(s) => match duration::parse(&s) {
            Ok(d) if !d.is_zero() => Ok(d),
            Ok(_) => bad(field, "must be positive"),
            Err(e) => bad(field, e),
        },
    }
}

fn only(
    obj: &Map<String, Value>,
    allowed: &[&str],
    what: &'static str,
) -> Result<(), InvalidService> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => bad(
            what,
            format!("unknown field {k:?} (allowed: {})", allowed.join(", ")),
        ),
        None => Ok(()),
    }
}

impl ServiceSpec {
    /// Parses a registration body. `id` comes from the URL (API) or the
    /// block's `id` key, defaulting to the name (config file).
    pub fn from_json(id: Option<&str>, body: &Value) -> Result<Self, InvalidService> {
        let Value::Object(obj) = body else {
            return bad("body", "must be a JSON object");
        };
        let mut allowed = vec![
            "name",
            "port",
            "address",
            "tags",
            "version",
            "weight",
            "check",
            "hash_policy",
            "protocol",
        ];
        if id.is_none() {
            allowed.push("id");
        }
        only(obj, &allowed, "body")?;
        let name = string(obj, "name")?.ok_or(InvalidService {
            field: "name",
            problem: "is required".into(),
        })?;
        let id = match id {
            Some(id) => id.to_owned(),
            None => string(obj, "id")?.unwrap_or_else(|| name.clone()),
        };
        validate_instance_id(&id)?;
        let port = uint(obj, "port", 1, u16::MAX.into())?.ok_or(InvalidService {
            field: "port",
            problem: "is required".into(),
        })? as u16;
        let tags = match obj.get("tags") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|t| t.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or(InvalidService {
                    field: "tags",
                    problem: "must be an array of strings".into(),
                })?,
            Some(_) => return bad("tags", "must be an array of strings"),
        };
        let check = match obj.get("check") {
            None | Some(Value::Null) => None,
            Some(Value::Object(c)) => Some(Self::check(c)?),
            Some(_) => {
                return bad(
                    "check",
                    "must be an object like {\"http\": \"/health\"} or {\"tcp\": true}",
                );
            }
        };
        let spec = Self {
            id,
            name,
            address: string(obj, "address")?.unwrap_or_else(|| "127.0.0.1".into()),
            port,
            tags,
            version: string(obj, "version")?.unwrap_or_default(),
            weight: uint(obj, "weight", 1, 10_000)?.unwrap_or(1) as u32,
            hash_policy: string(obj, "hash_policy")?
                .unwrap_or_else(|| ServiceInstance::DEFAULT_HASH_POLICY.into()),
            protocol: match string(obj, "protocol")? {
                None => Protocol::default(),
                Some(p) => Protocol::parse(&p).ok_or_else(|| InvalidService {
                    field: "protocol",
                    problem: format!("{p:?} is not one of {}", Protocol::NAMES),
                })?,
            },
            check,
        };
        spec.instance(Health::Passing).validate()?;
        Ok(spec)
    }

    fn check(c: &Map<String, Value>) -> Result<CheckSpec, InvalidService> {
        only(
            c,
            &["http", "tcp", "interval", "timeout", "rise", "fall"],
            "check",
        )?;
        let kind = match (c.get("http"), c.get("tcp")) {
            (Some(Value::String(path)), None) => {
                if !path.starts_with('/') || path.len() > 1024 || path.contains(char::is_whitespace)
                {
                    return bad("check.http", "must be a path starting with '/'");
                }
                CheckKind::Http(path.clone())
            }
            (None, Some(Value::Bool(true))) => CheckKind::Tcp,
            (Some(_), Some(_)) => return bad("check", "give either http or tcp, not both"),
            (Some(_), None) => return bad("check.http", "must be a path string"),
            (None, Some(_)) => return bad("check.tcp", "must be true"),
            (None, None) => return bad("check", "needs \"http\": \"/path\" or \"tcp\": true"),
        };
        let interval =
            dur(c, "interval", DEFAULT_INTERVAL).map_err(|e| field(e, "check.interval"))?;
        let timeout = dur(c, "timeout", DEFAULT_TIMEOUT).map_err(|e| field(e, "check.timeout"))?;
        let count = |key: &'static str, default: u32| -> Result<u32, InvalidService> {
            Ok(uint(c, key, 1, 100)?.map_or(default, |n| n as u32))
        };
        let rise = count("rise", DEFAULT_RISE).map_err(|e| field(e, "check.rise"))?;
        let fall = count("fall", DEFAULT_FALL).map_err(|e| field(e, "check.fall"))?;
        Ok(CheckSpec {
            kind,
            interval,
            timeout,
            rise,
            fall,
        })
    }

    /// The instance this registration publishes, with `health`.
    pub fn instance(&self, health: Health) -> ServiceInstance {
        ServiceInstance {
            id: self.id.clone(),
            name: self.name.clone(),
            address: self.address.clone(),
            port: self.port,
            tags: self.tags.clone(),
            version: self.version.clone(),
            weight: self.weight,
            hash_policy: self.hash_policy.clone(),
            health,
            protocol: self.protocol,
        }
    }
}

/// The agent's own listeners, which no registration may point at: a
/// service at the admin port would expose the admin API to the whole mesh,
/// and one at the proxy, a gateway or an upstream listener would send
/// every request or connection round in a loop.
#[derive(Debug, Clone, Default)]
pub struct AgentListeners(pub Vec<(&'static str, SocketAddr)>);

impl AgentListeners {
    /// Refuses `spec` if it points at one of the listeners.
    pub fn check(&self, spec: &ServiceSpec) -> Result<(), InvalidService> {
        if !self.0.iter().any(|(_, a)| a.port() == spec.port) {
            return Ok(());
        }
        let ips: Vec<IpAddr> = match spec.address.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => (spec.address.as_str(), spec.port)
                .to_socket_addrs()
                .map(|addrs| addrs.map(|a| a.ip()).collect())
                .unwrap_or_default(),
        };
        let reaches = |listener: IpAddr, ip: IpAddr| {
            // Connecting to 0.0.0.0 reaches this host's own listeners.
            let ip_is_local = ip.is_unspecified() || ip.is_loopback() || is_local(ip);
            listener == ip
                || (listener.is_unspecified() && ip_is_local)
                || (ip.is_unspecified() && listener.is_loopback())
        };
        for (what, listener) in self.0.iter().filter(|(_, a)| a.port() == spec.port) {
            if ips.iter().any(|&ip| reaches(listener.ip(), ip)) {
                return bad(
                    "port",
                    format!(
                        "{}:{} is this agent's own {what} listener; register the service's own address",
                        spec.address, spec.port
                    ),
                );
            }
        }
        Ok(())
    }
}

/// Whether `ip` is assigned to this host: only then can a socket bind it.
fn is_local(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

fn field(mut e: InvalidService, name: &'static str) -> InvalidService {
    if !e.field.starts_with("check") {
        e.field = name;
    }
    e
}

/// `services.json`: runtime registrations and the entry version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedServices {
    /// Last published catalog version of this node.
    pub version: u64,
    /// Registrations made through the API.
    pub services: Vec<ServiceSpec>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ServiceSpec, InvalidService> {
        ServiceSpec::from_json(Some("web-1"), &v)
    }

    #[test]
    fn registrations_at_the_agent_are_refused() {
        let agent = AgentListeners(vec![
            ("admin", "127.0.0.1:7947".parse().unwrap()),
            ("proxy", "0.0.0.0:7948".parse().unwrap()),
        ]);
        for (address, port) in [
            ("127.0.0.1", 7947),
            ("localhost", 7947),
            ("127.0.0.1", 7948),
            ("0.0.0.0", 7948),
            ("0.0.0.0", 7947),
        ] {
            let s = parse(json!({"name": "web", "port": port, "address": address})).unwrap();
            let e = agent.check(&s).unwrap_err();
            assert_eq!(e.field, "port", "{address}:{port}");
            assert!(e.problem.contains("own"), "{e}");
        }
        for (address, port) in [("127.0.0.2", 7947), ("127.0.0.1", 8080)] {
            let s = parse(json!({"name": "web", "port": port, "address": address})).unwrap();
            assert!(agent.check(&s).is_ok(), "{address}:{port}");
        }
    }

    #[test]
    fn defaults() {
        let s = parse(json!({"name": "web", "port": 8080})).unwrap();
        assert_eq!(s.address, "127.0.0.1");
        assert_eq!(s.weight, 1);
        assert_eq!(s.hash_policy, "header:x-hash-key");
        assert!(s.check.is_none());
        let s = parse(json!({"name": "web", "port": 8080, "check": {"http": "/health"}})).unwrap();
        let c = s.check.unwrap();
        assert_eq!(
            (c.interval, c.timeout, c.rise, c.fall),
            (DEFAULT_INTERVAL, DEFAULT_TIMEOUT, 2, 3)
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({"port": 80}), "name"),
            (json!({"name": "web"}), "port"),
            (json!({"name": "web", "port": 70000}), "port"),
            (json!({"name": "web", "port": 0}), "port"),
            (json!({"name": "Web!", "port": 1}), "name"),
            (json!({"name": "web", "port": 1, "prot": 1}), "body"),
            (json!({"name": "web", "port": 1, "tags": "x"}), "tags"),
            (json!({"name": "web", "port": 1, "weight": 0}), "weight"),
            (
                json!({"name": "web", "port": 1, "address": "a b"}),
                "address",
            ),
            (
                json!({"name": "web", "port": 1, "check": {"http": "health"}}),
                "check.http",
            ),
            (
                json!({"name": "web", "port": 1, "check": {"tcp": true, "interval": "soon"}}),
                "check.interval",
            ),
            (
                json!({"name": "web", "port": 1, "check": {"tcp": true, "fall": 0}}),
                "check.fall",
            ),
            (json!({"name": "web", "port": 1, "check": {}}), "check"),
            (
                json!({"name": "web", "port": 1, "hash_policy": "random"}),
                "hash_policy",
            ),
            (json!([1]), "body"),
            (
                json!({"name": "web", "port": 1, "protocol": "h3"}),
                "protocol",
            ),
        ];
        for (body, field) in cases {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!(e.field, field, "{body}: {e}");
        }
        for id in ["bad id!", ".", ".."] {
            assert_eq!(
                ServiceSpec::from_json(Some(id), &json!({"name": "web", "port": 1}))
                    .unwrap_err()
                    .field,
                "id"
            );
        }
        let s = parse(json!({"name": "web", "port": 1, "protocol": "grpc"})).unwrap();
        assert_eq!(s.protocol, Protocol::Grpc);
        assert_eq!(
            parse(json!({"name": "web", "port": 1})).unwrap().protocol,
            Protocol::Http1
        );
    }
}
