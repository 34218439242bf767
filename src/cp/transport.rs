//! The control plane's TLS transport: [`TlsAcceptor`] puts mutual TLS under
//! the [`Acceptor`] seam of [`super::server`]. Every connection must present
//! a client certificate chained to the client CA (the handshake fails
//! otherwise); what the certificate names becomes the connection's
//! [`PeerIdentity`], which the routes check (`routes::require_host`,
//! `routes::require_operator`). The config is taken from a
//! [`ReloadableServerConfig`] per connection, so a SIGHUP reload applies to
//! the next handshake and open connections keep theirs.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::routes::PeerIdentity;
use super::server::Acceptor;
use crate::tls::{self, ReloadableServerConfig};
use crate::wire::{ErrorBody, PROTOCOL_HEADER, PROTOCOL_VERSION};

/// A client must finish its TLS handshake (including its first byte) within
/// this, or the connection is closed: a peer that connects and says nothing
/// would otherwise hold a connection slot and a task forever. A handshake is
/// two round trips and a signature; 10 s covers a slow link with room.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// After refusing a plaintext request: how long and how much of the rest
/// of it is read before closing (enough for a request head; a peer that
/// keeps sending is cut off).
const PLAINTEXT_DRAIN_TIME: Duration = Duration::from_secs(1);
const MAX_PLAINTEXT_DRAIN_BYTES: usize = 64 * 1024;

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Mutual TLS for `cp serve --tls-cert --tls-key --client-ca`.
#[derive(Debug, Clone)]
pub struct TlsAcceptor {
    config: Arc<ReloadableServerConfig>,
}

impl TlsAcceptor {
    pub fn new(config: Arc<ReloadableServerConfig>) -> TlsAcceptor {
        TlsAcceptor { config }
    }
}

impl Acceptor for TlsAcceptor {
    type Io = TlsStream<TcpStream>;

    async fn accept(&self, tcp: TcpStream) -> io::Result<(TlsStream<TcpStream>, PeerIdentity)> {
        let acceptor = self.config.acceptor();
        let work = async move {
            let mut first = [0u8; 1];
            let n = tcp.peek(&mut first).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the TLS handshake"));
            }
            if first[0] != TLS_HANDSHAKE_RECORD {
                refuse_plaintext(tcp).await;
                return Err(io::Error::new(io::ErrorKind::InvalidData, "plaintext on the TLS port; told to use https"));
            }
            let peer = tcp.peer_addr().ok();
            let stream = acceptor.accept(tcp).await.inspect_err(|e| {
                // An operator rotating certificates needs to see why a host is refused (expired, unknown CA).
                tracing::info!(peer = ?peer, error = %e, "TLS handshake refused");
            })?;
            let identity = tls::PeerIdentity::from_connection(stream.get_ref().1).map_err(|e| e.to_string());
            if let Err(why) = &identity {
                tracing::warn!(reason = %why, "a client certificate chained to the client CA names no usable identity; its requests are refused");
            }
            Ok((stream, PeerIdentity::Certificate(identity)))
        };
        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, work)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no TLS handshake within the time limit"))?
    }
}

/// Answers a plaintext HTTP request with one JSON 400 saying to use
/// https, then closes: nothing of the API is served without TLS.
async fn refuse_plaintext(mut tcp: TcpStream) {
    let body = ErrorBody {
        error: "tls_required".to_owned(),
        message: "this control plane port speaks TLS only: use https:// with a client certificate".to_owned(),
    };
    let body = serde_json::to_string(&body).unwrap_or_default();
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n{PROTOCOL_HEADER}: {PROTOCOL_VERSION}\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.write_all(answer.as_bytes()).await;
    let _ = tcp.shutdown().await;
    // Read what the client sent until it closes (bounded in time and bytes):
    // closing with unread bytes would make the kernel send a reset, and the
    // client could lose the answer.
    let mut sink = [0u8; 4096];
    let mut left = MAX_PLAINTEXT_DRAIN_BYTES;
    let drain = async {
        while left > 0 {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(PLAINTEXT_DRAIN_TIME, drain).await;
}
