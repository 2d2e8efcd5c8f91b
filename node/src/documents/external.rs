//! The `external` document: an API outside the mesh, reached by local
//! applications as if it were a mesh service (`http://payments.mesh/`),
//! with the mesh's timeouts, retries, circuit breaking, route policy and
//! metrics. The agent opens the TLS connection (TLS origination).
//!
//! ```toml
//! [[external]]
//! name = "payments"
//! endpoints = ["https://api.example.com"]   # several: failover in order
//! ca = """-----BEGIN CERTIFICATE-----..."""  # trust these roots, not the system's
//! connect_timeout = "2s"
//! ```
//!
//! The host an agent connects to comes only from the document: nothing in
//! a request can steer it elsewhere.

use std::time::Duration;

use serde::Deserialize;

use super::route::duration;

/// Endpoints per document.
pub const MAX_ENDPOINTS: usize = 16;
/// Largest CA bundle.
pub const MAX_CA_BYTES: usize = 64 * 1024;

/// An `external` document's body.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalSpec {
    /// `https://host[:port]` or `http://host[:port]`, no path.
    pub endpoints: Vec<String>,
    /// PEM roots to verify the servers with, in place of the system's.
    #[serde(default)]
    pub ca: Option<String>,
    /// The name sent in SNI and checked in the certificate, when it is
    /// not the endpoint's host (e.g. an endpoint given by IP address).
    #[serde(default)]
    pub server_name: Option<String>,
    /// Time allowed for TCP connect and the TLS handshake.
    #[serde(default, deserialize_with = "duration")]
    pub connect_timeout: Option<Duration>,
}

/// One endpoint, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Whether to speak TLS.
    pub tls: bool,
    /// Host name or IP address (without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl Endpoint {
    /// Parses `https://host[:port]` or `http://host[:port]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: http::Uri = text
            .parse()
            .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("{text:?}: the scheme must be https or http")),
        };
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(format!(
                "{text:?}: no path or query (the request's own path is used)"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{text:?}: no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{text:?}: no user info"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        if host.is_empty() {
            return Err(format!("{text:?}: no host"));
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Self { tls, host, port })
    }
}

impl ExternalSpec {
    /// Checks every field; returns `field: problem`.
    pub fn validate(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("endpoints: at least one".into());
        }
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(format!("endpoints: at most {MAX_ENDPOINTS}"));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            Endpoint::parse(e).map_err(|e| format!("endpoints[{i}]: {e}"))?;
        }
        if let Some(ca) = &self.ca {
            if ca.len() > MAX_CA_BYTES {
                return Err(format!("ca: larger than {MAX_CA_BYTES} bytes"));
            }
            let roots = parse_roots(ca).map_err(|e| format!("ca: {e}"))?;
            if roots.is_empty() {
                return Err("ca: no certificate in the PEM text".into());
            }
        }
        if let Some(name) = &self.server_name {
            rustls_pki_types::ServerName::try_from(name.as_str())
                .map_err(|_| format!("server_name: {name:?} is not a DNS name or IP address"))?;
        }
        if self.connect_timeout.is_some_and(|t| t.is_zero()) {
            return Err("connect_timeout: must be positive".into());
        }
        Ok(())
    }

    /// The endpoints, parsed (call after [`Self::validate`]).
    pub fn parsed(&self) -> Vec<Endpoint> {
        self.endpoints
            .iter()
            .filter_map(|e| Endpoint::parse(e).ok())
            .collect()
    }
}

/// The certificates of a PEM bundle.
pub fn parse_roots(pem: &str) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_or_say_why() {
        assert_eq!(
            Endpoint::parse("https://API.example.com").unwrap(),
            Endpoint {
                tls: true,
                host: "api.example.com".into(),
                port: 443
            }
        );
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:8080").unwrap(),
            Endpoint {
                tls: false,
                host: "127.0.0.1".into(),
                port: 8080
            }
        );
        assert_eq!(Endpoint::parse("https://[::1]:9443/").unwrap().host, "::1");
        for bad in [
            "ftp://x",
            "https://x/path",
            "https://u@x",
            "x.example.com",
            "https://x?q=1",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spec_mistakes_name_the_field() {
        let spec = |t: &str| {
            toml::from_str::<ExternalSpec>(t)
                .map_err(|e| e.to_string())
                .and_then(|s| s.validate())
        };
        assert!(spec("endpoints = [\"https://api.example.com\"]").is_ok());
        assert!(spec("endpoints = []").unwrap_err().starts_with("endpoints"));
        assert!(
            spec("endpoints = [\"https://a\"]\nca = \"nope\"")
                .unwrap_err()
                .starts_with("ca")
        );
        assert!(
            spec("endpoints = [\"https://a\"]\nserver_name = \"a b\"")
                .unwrap_err()
                .starts_with("server_name")
        );
        assert!(
            spec("endpoints = [\"https://a\"]\nwat = 1")
                .unwrap_err()
                .contains("wat")
        );
    }
}
