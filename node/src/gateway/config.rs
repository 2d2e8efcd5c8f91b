//! `[ingress]` in the agent config (and `--ingress ADDR`).
//!
//! ```toml
//! [ingress]
//! max_header_bytes = 16384
//! max_body_bytes = 10485760
//!
//! [[ingress.listener]]
//! listen = "0.0.0.0:8443"
//! tls = [
//!   { cert = "/etc/gossamer/shop.pem", key = "/etc/gossamer/shop.key" },
//!   { cert = "/etc/gossamer/api.pem", key = "/etc/gossamer/api.key" },
//! ]
//!
//! [[ingress.listener]]
//! listen = "0.0.0.0:8080"
//! redirect_https_port = 8443       # answer 308 to https://HOST:8443/...
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// One certificate and its key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPair {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// One gateway listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Certificates (chosen by SNI; the first for clients without SNI).
    /// None: plain HTTP.
    #[serde(default)]
    pub tls: Vec<CertPair>,
    /// On a plain listener: answer every request with a redirect to
    /// https on this port.
    #[serde(default)]
    pub redirect_https_port: Option<u16>,
}

/// `[ingress]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngressConfig {
    /// Listeners.
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// Most bytes of request line and headers (431 past it).
    pub max_header_bytes: usize,
    /// Most bytes of request body (413 past it).
    pub max_body_bytes: u64,
    /// Time allowed from a connection's first byte (its TLS handshake
    /// included) or a request's first byte to the end of its head.
    #[serde(with = "gossamer_membership::duration")]
    pub header_read_timeout: Duration,
    /// A connection with no request open for this long is closed.
    #[serde(with = "gossamer_membership::duration")]
    pub idle_timeout: Duration,
    /// Most open connections over all gateway listeners.
    pub max_connections: usize,
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            listeners: Vec::new(),
            max_header_bytes: 16 * 1024,
            max_body_bytes: 10 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
        }
    }
}

impl IngressConfig {
    /// Checks values, and that every certificate loads; returns
    /// `ingress.key: problem`.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_header_bytes < 1024 {
            return Err("ingress.max_header_bytes: at least 1024".into());
        }
        if self.max_body_bytes == 0 {
            return Err("ingress.max_body_bytes: must be positive".into());
        }
        if self.header_read_timeout.is_zero() || self.idle_timeout.is_zero() {
            return Err("ingress.header_read_timeout, idle_timeout: must be positive".into());
        }
        if self.max_connections == 0 {
            return Err("ingress.max_connections: at least 1".into());
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if self.listeners[..i].iter().any(|o| o.listen == l.listen) {
                return Err(format!(
                    "ingress.listener[{i}].listen: {} is used twice",
                    l.listen
                ));
            }
            if !l.tls.is_empty() && l.redirect_https_port.is_some() {
                return Err(format!(
                    "ingress.listener[{i}].redirect_https_port: only for a listener without tls"
                ));
            }
            if l.redirect_https_port == Some(0) {
                return Err(format!("ingress.listener[{i}].redirect_https_port: not 0"));
            }
            if !l.tls.is_empty() {
                super::tls::Store::load(l.tls.clone())
                    .map_err(|e| format!("ingress.listener[{i}].tls: {e}"))?;
            }
        }
        Ok(())
    }
}
