//! HTTP/1.1 upgrades (WebSocket): recognising an upgrade request, and
//! splicing the raw bytes once both sides have switched protocols. The
//! same bridge serves every pairing: client and local instance, client and
//! a proxy stream to the owner, and on the owner a proxy stream and the
//! instance.

use http::HeaderMap;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::hop;

/// Whether a request asks to switch protocols (`Connection: upgrade` and
/// an `Upgrade` header).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::UPGRADE)
        && hop::connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// Copies bytes both ways between a connection that is switching
/// protocols and `other` until both directions have ended. An end of input
/// on one side shuts down writing on the other (a QUIC stream is
/// finished), so half-closes pass through; an error on either side ends
/// both, so a broken peer cannot keep the other side open.
pub async fn bridge<T>(upgraded: OnUpgrade, mut other: T)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut io = match upgraded.await {
        Ok(io) => TokioIo::new(io),
        Err(e) => {
            debug!(error = %e, "upgrade failed");
            return;
        }
    };
    match tokio::io::copy_bidirectional(&mut io, &mut other).await {
        Ok((sent, received)) => debug!(sent, received, "upgraded connection closed"),
        Err(e) => debug!(error = %e, "upgraded connection broken"),
    }
}
