//! Egress: APIs outside the mesh, declared by `external` documents, are
//! routed like mesh services. Each endpoint is a backend (so retries,
//! outlier ejection, failover, circuit breaking and route documents apply)
//! that the agent calls itself over TLS it originates, verifying the
//! server against the document's CA bundle or the system's roots.
//!
//! The host a request reaches is the document's, never the client's: the
//! URI is rebuilt from the endpoint, and Host is set to it.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::request::Parts;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::{CertificateDer, ServerName};
use tracing::warn;

use super::body::{HttpsClient, ProxyBody};
use super::error::AttemptError;
use super::hop;
use crate::documents::Documents;
use crate::documents::external::{Endpoint, ExternalSpec, parse_roots};

/// Connect timeout when the document sets none.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle pooled connections to an external API are closed after this.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// One endpoint of an external service, with the client that calls it.
#[derive(Debug)]
pub struct ExternalTarget {
    /// The document's name.
    pub service: String,
    /// Where it is.
    pub endpoint: Endpoint,
    /// The Host header it gets (with the port when it is not the default).
    host_header: HeaderValue,
    client: HttpsClient,
}

impl PartialEq for ExternalTarget {
    fn eq(&self, other: &Self) -> bool {
        self.service == other.service && self.endpoint == other.endpoint
    }
}

impl Eq for ExternalTarget {}

/// Every `external` document in force, compiled.
#[derive(Debug, Default)]
pub struct Externals {
    /// By name: the endpoints in document order.
    pub services: HashMap<String, Vec<Arc<ExternalTarget>>>,
}

/// The system's trusted roots, read once.
pub(crate) fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        if found.certs.is_empty() {
            warn!(errors = ?found.errors, "no system root certificates found: external services need a `ca` bundle");
        }
        found.certs
    })
}

impl Externals {
    /// Compiles the documents in force; one that no longer compiles is
    /// skipped with a warning.
    pub fn build(documents: &Documents) -> Self {
        let mut services = HashMap::new();
        for held in documents.all() {
            let env = &held.envelope;
            if env.kind != "external" || env.deleted {
                continue;
            }
            let compiled = serde_json::from_str::<ExternalSpec>(&env.body)
                .map_err(|e| e.to_string())
                .and_then(|spec| {
                    spec.validate()?;
                    compile(&env.name, &spec)
                });
            match compiled {
                Ok(targets) => {
                    services.insert(env.name.clone(), targets);
                }
                Err(e) => warn!(
                    service = %env.name, version = env.version, error = %e,
                    "external document not applied"
                ),
            }
        }
        Self { services }
    }
}

fn compile(name: &str, spec: &ExternalSpec) -> Result<Vec<Arc<ExternalTarget>>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &spec.ca {
        Some(pem) => {
            for cert in parse_roots(pem)? {
                roots.add(cert).map_err(|e| format!("ca: {e}"))?;
            }
        }
        None => {
            let (_, ignored) = roots.add_parsable_certificates(system_roots().iter().cloned());
            if ignored > 0 {
                tracing::debug!(ignored, "system root certificates rustls could not use");
            }
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connect_timeout = spec.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let mut out = Vec::new();
    for endpoint in spec.parsed() {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        let name_to_verify = spec
            .server_name
            .clone()
            .unwrap_or_else(|| endpoint.host.clone());
        let server_name = ServerName::try_from(name_to_verify.clone())
            .map_err(|_| format!("{name_to_verify:?} is not a server name"))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(server_name))
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_timer(TokioTimer::new());
        builder.pool_idle_timeout(POOL_IDLE);
        let default_port = if endpoint.tls { 443 } else { 80 };
        // The name the server knows itself by: the document's
        // server_name when the endpoint is an address.
        let named = spec.server_name.as_ref().unwrap_or(&endpoint.host);
        let host = if named.contains(':') {
            format!("[{named}]")
        } else {
            named.clone()
        };
        let host_header = if endpoint.port == default_port {
            host
        } else {
            format!("{host}:{}", endpoint.port)
        };
        out.push(Arc::new(ExternalTarget {
            service: name.to_owned(),
            host_header: HeaderValue::from_str(&host_header).map_err(|e| e.to_string())?,
            endpoint,
            client: builder.build(connector),
        }));
    }
    Ok(out)
}

impl ExternalTarget {
    /// `https://host:port` (the address connected to).
    pub fn url(&self) -> String {
        let host = if self.endpoint.host.contains(':') {
            format!("[{}]", self.endpoint.host)
        } else {
            self.endpoint.host.clone()
        };
        format!(
            "{}://{host}:{}",
            if self.endpoint.tls { "https" } else { "http" },
            self.endpoint.port
        )
    }

    /// Sends one attempt of a request to this endpoint.
    pub async fn call(
        &self,
        parts: &Parts,
        body: ProxyBody,
    ) -> Result<Response<Incoming>, AttemptError> {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = format!("{}{path}", self.url());
        let mut req = Request::builder()
            .method(parts.method.clone())
            .uri(uri)
            .body(body)
            .map_err(|e| AttemptError::Connect(format!("{}: bad request: {e}", self.url())))?;
        let mut headers = parts.headers.clone();
        hop::strip(&mut headers, false);
        hop::strip_internal(&mut headers);
        headers.insert(http::header::HOST, self.host_header.clone());
        *req.headers_mut() = headers;
        self.client.request(req).await.map_err(|e| {
            // The chain holds the TLS problem (an unknown issuer, a name
            // mismatch, an expired certificate): name it.
            let mut cause = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                cause = format!("{cause}: {s}");
                source = s.source();
            }
            if e.is_connect() {
                AttemptError::Connect(format!(
                    "cannot reach external {} at {}: {cause}",
                    self.service,
                    self.url()
                ))
            } else {
                AttemptError::NoResponse(format!(
                    "external {} at {}: {cause}",
                    self.service,
                    self.url()
                ))
            }
        })
    }
}
