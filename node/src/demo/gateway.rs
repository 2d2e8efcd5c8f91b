//! The demo's gateway step: n3 also listens as a gateway; an `ingress`
//! document applied at n1 gives it a route, and requests from outside the
//! mesh reach `web` through it, rate-limited per client.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;

use super::run::{DemoError, Http, apply_document, wait_for};
use crate::proxy::body;

/// The demo's ingress document: shop.local/api goes to web, 20 requests a
/// second per client.
pub(super) const INGRESS: &str = r#"
[[ingress]]
name = "demo"
[[ingress.route]]
hosts = ["shop.local"]
path = "/api"
strip_prefix = true
service = "web"
rate_limit = { per_client = 20 }
"#;

/// What the step saw.
#[derive(Debug)]
pub(super) struct Seen {
    /// From applying the document at n1 until the gateway served the route.
    pub spread: Duration,
    /// Of a burst of requests sent at once: answered, and refused with 429.
    pub answered: usize,
    pub limited: usize,
    /// The path the service saw for `/api/cart`.
    pub path: String,
}

async fn get(http: &Http, gateway: SocketAddr, path: &str) -> Result<(u16, Bytes), String> {
    let req = Request::get(format!("http://{gateway}{path}"))
        .header(http::header::HOST, "shop.local")
        .body(body::empty())
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), http.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// Applies the ingress document at `admin` (n1), waits until `gateway`
/// (n3's) serves it, then sends a burst of 60 requests.
pub(super) async fn run(
    http: &Http,
    admin: SocketAddr,
    signer: &gossamer_transport::sign::OperatorSigner,
    gateway: SocketAddr,
) -> Result<Seen, DemoError> {
    let docs =
        crate::documents::envelope::parse_file("ingress.toml", INGRESS).map_err(DemoError)?;
    let (kind, name, body) = docs.into_iter().next().expect("one document");
    let (_, applied) = apply_document(admin, signer, &kind, &name, &body).await?;
    let mut path = String::new();
    wait_for(
        "n3's gateway to serve shop.local/api",
        Duration::from_secs(10),
        async || {
            let (status, body) = get(http, gateway, "/api/cart").await?;
            if status != 200 {
                return Err(format!("{status}"));
            }
            let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
            path = v["path"].as_str().unwrap_or("").to_owned();
            Ok(())
        },
    )
    .await?;
    let spread = applied.elapsed();
    // Let the bucket refill after the probe, then send a burst at once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let burst: Vec<_> = (0..60)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move { get(&http, gateway, "/api/cart").await })
        })
        .collect();
    let (mut answered, mut limited) = (0, 0);
    for task in burst {
        match task.await {
            Ok(Ok((200, _))) => answered += 1,
            Ok(Ok((429, _))) => limited += 1,
            other => {
                return Err(DemoError(format!(
                    "a request through the gateway failed: {other:?}"
                )));
            }
        }
    }
    Ok(Seen {
        spread,
        answered,
        limited,
        path,
    })
}
