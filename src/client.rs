//! A minimal HTTP/1.1 client for the agent, `cp publish` / `cp status` and
//! the integration tests: one connection per request, a deadline on each, JSON
//! errors turned into messages. `https://` is mutual TLS: the CA file the
//! control plane's certificate must chain to and this client's certificate,
//! held in a [`ReloadableClientConfig`] so a SIGHUP's new certificate is used
//! from the next request on (a connector is taken per connection).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::tls::{CertKeyFiles, ClientTlsFiles, ReloadableClientConfig, TlsError};
use crate::wire::{ErrorBody, MAX_LONGPOLL_WAIT_SECS, PROTOCOL_HEADER, PROTOCOL_VERSION};

/// Connecting longer than this means the CP is down or unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed request, how long the connection may take to report its
/// own error (it has failed already; this only orders the two tasks).
const CONNECTION_ERROR_WAIT: Duration = Duration::from_millis(100);
/// A long-poll's deadline is its wait plus this: the CP answers at the end
/// of the wait, so a connection silent for longer was dropped on the way
/// (a NAT losing its mapping sends neither FIN nor RST) and the agent
/// reconnects at once instead of after a fixed 90 s.
pub const LONGPOLL_DEADLINE_MARGIN: Duration = Duration::from_secs(5);
/// Events, heartbeats and a manifest fetch: the CP answers after one group
/// commit (well under a second); a slower answer is a sick connection and
/// the agent's retry is cheaper than waiting.
pub const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Operator calls (publish verifies and plans a manifest of up to 100,000
/// hosts; a status page reads the database).
pub const OPERATOR_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Answers above this are refused: the largest answer is a manifest
/// envelope (the CP's publish bound, 16 MiB); status views come in pages.
pub const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;
/// TCP keepalive on every connection to the CP: a CP that vanished without
/// a FIN or RST is noticed by the kernel, not only by the deadline.
pub const TCP_KEEPALIVE: Keepalive =
    Keepalive { idle: Duration::from_secs(15), interval: Duration::from_secs(5), probes: 3 };

/// TCP keepalive timings: the first probe after `idle` without traffic,
/// then one every `interval`; `probes` unanswered ones end the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub probes: u32,
}

impl Keepalive {
    pub fn apply(&self, socket: &TcpStream) -> std::io::Result<()> {
        use rustix::net::sockopt;
        sockopt::set_socket_keepalive(socket, true)?;
        sockopt::set_tcp_keepidle(socket, self.idle)?;
        sockopt::set_tcp_keepintvl(socket, self.interval)?;
        sockopt::set_tcp_keepcnt(socket, self.probes)?;
        Ok(())
    }
}

/// The deadline of a request by what it is: a long-poll waits its `wait`
/// (clamped like the CP clamps it) plus [`LONGPOLL_DEADLINE_MARGIN`]; the
/// other agent calls [`AGENT_CALL_TIMEOUT`]; everything else (operator
/// calls) [`OPERATOR_CALL_TIMEOUT`].
pub fn deadline_for(path_and_query: &str) -> Duration {
    let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
    if path == "/v1/agent/dispatch" {
        let wait = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("wait="))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(MAX_LONGPOLL_WAIT_SECS)
            .min(MAX_LONGPOLL_WAIT_SECS);
        return Duration::from_secs(wait) + LONGPOLL_DEADLINE_MARGIN;
    }
    if path.starts_with("/v1/agent/") || path.ends_with("/manifest") {
        return AGENT_CALL_TIMEOUT;
    }
    OPERATOR_CALL_TIMEOUT
}

/// Why a body could not be collected.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error(transparent)]
    Read(Box<dyn std::error::Error + Send + Sync>),
}

/// Collects a body of at most `limit` bytes by COPYING each chunk into one
/// buffer: a chunk handed out by hyper pins its whole read buffer (kilobytes
/// for a one-byte chunk), so keeping the chunks, as `collect` does, let a
/// body dribbled one byte at a time cost about 4 KB per byte. `expected`
/// (a declared length) beyond `limit` is refused before reading.
pub async fn collect_bounded<B>(body: B, limit: usize, expected: usize) -> Result<Vec<u8>, BodyError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if expected > limit {
        return Err(BodyError::TooLarge { limit });
    }
    let mut body = body;
    // A declared length is the peer's word: room for at most 1 MiB up front.
    let mut out = Vec::with_capacity(expected.min(1024 * 1024));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.into()))?;
        if let Ok(data) = frame.into_data() {
            if out.len().saturating_add(data.len()) > limit {
                return Err(BodyError::TooLarge { limit });
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad control plane URL {url:?}: {why}")]
    BadUrl { url: String, why: &'static str },
    #[error("cannot connect to {authority}: {source}")]
    Connect { authority: String, source: std::io::Error },
    /// The TLS handshake failed: the server's certificate is not from the
    /// CA file, or it names another address.
    #[error("TLS handshake with {authority} failed: {source}")]
    Handshake { authority: String, source: std::io::Error },
    #[error("{0}")]
    TlsSetup(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("request to {authority} timed out")]
    Timeout { authority: String },
    #[error("HTTP error talking to {authority}: {source}")]
    Http { authority: String, source: hyper::Error },
    /// The control plane ended the TLS session with an alert: with TLS 1.3
    /// it checks the client certificate after the client's handshake is
    /// done, so a refused certificate shows up at the first read.
    #[error(
        "the control plane at {authority} refused this client's TLS certificate ({alert}): check that \
         --client-cert is issued by the CA the control plane trusts and is within its validity dates"
    )]
    CertificateRefused { authority: String, alert: String },
    #[error("bad request header {0}")]
    BadHeader(String),
    #[error("the control plane answered {status}: {message}")]
    Status { status: StatusCode, code: String, message: String },
    /// A successful answer whose body is not the JSON the caller expects.
    #[error("the control plane answered {status}: the answer is not the expected JSON: {source}")]
    BadAnswer { status: StatusCode, source: serde_json::Error },
    /// The answer's body could not be read: cut off, or larger than
    /// [`MAX_RESPONSE_BYTES`].
    #[error("the control plane answered {status}: cannot read the answer from {authority}: {source}")]
    Body { authority: String, status: StatusCode, source: Box<dyn std::error::Error + Send + Sync> },
    /// A request body that cannot be encoded as JSON.
    #[error("cannot encode the request as JSON: {0}")]
    Encode(#[source] serde_json::Error),
}

/// `http://host:port` or `https://host:port` of a control plane; an https
/// one carries the client's TLS config.
#[derive(Debug, Clone)]
pub struct CpUrl {
    authority: String,
    tls: Option<Arc<ReloadableClientConfig>>,
    https: bool,
}

impl PartialEq for CpUrl {
    fn eq(&self, other: &CpUrl) -> bool {
        let same_tls = match (&self.tls, &other.tls) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        self.authority == other.authority && self.https == other.https && same_tls
    }
}

impl Eq for CpUrl {}

/// The TLS files of a client of the control plane, as the flags give them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsPaths {
    pub ca_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl CpUrl {
    /// Parses the URL; an `https://` one cannot send a request until
    /// [`CpUrl::with_tls`] gives it a config ([`CpUrl::connect_to`] does both).
    pub fn parse(url: &str) -> Result<CpUrl, ClientError> {
        let bad = |why| ClientError::BadUrl { url: url.to_owned(), why };
        let (https, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => return Err(bad("must start with https:// or http://")),
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
            return Err(bad("expected https://HOST:PORT or http://HOST:PORT"));
        }
        Ok(CpUrl { authority: authority.to_owned(), tls: None, https })
    }

    /// The URL with the TLS config its connections use.
    pub fn with_tls(mut self, tls: Arc<ReloadableClientConfig>) -> CpUrl {
        self.tls = Some(tls);
        self
    }

    /// Parses the URL and loads the TLS files: `https://` needs all three
    /// (the control plane accepts no client without a certificate),
    /// `http://` none (a certificate would silently not be used).
    pub fn connect_to(url: &str, paths: &ClientTlsPaths) -> Result<CpUrl, ClientError> {
        let parsed = CpUrl::parse(url)?;
        let setup = |text: String| ClientError::TlsSetup(text);
        match (parsed.https, &paths.ca_cert, &paths.client_cert, &paths.client_key) {
            (true, Some(ca), Some(cert), Some(key)) => {
                let files = ClientTlsFiles {
                    ca: ca.clone(),
                    identity: Some(CertKeyFiles { cert: cert.clone(), key: key.clone() }),
                };
                Ok(parsed.with_tls(Arc::new(ReloadableClientConfig::load(files)?)))
            }
            (true, _, _, _) => Err(setup(format!(
                "{url} is https: give --ca-cert (the CA the control plane's certificate chains to), \
                 --client-cert and --client-key (this client's certificate and key)"
            ))),
            (false, None, None, None) => Ok(parsed),
            (false, _, _, _) => {
                Err(setup(format!("{url} is plaintext http, but TLS files were given; use https:// to talk TLS")))
            }
        }
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// `https://…` or `http://…`.
    pub fn is_https(&self) -> bool {
        self.https
    }

    /// The client TLS config (re-read by `reload` on SIGHUP).
    pub fn tls(&self) -> Option<&Arc<ReloadableClientConfig>> {
        self.tls.as_ref()
    }

    /// The name the server's certificate must carry: the authority without
    /// its port (and without the brackets of an IPv6 address).
    fn server_name(&self) -> Result<rustls::pki_types::ServerName<'static>, ClientError> {
        let host = self.authority.rsplit_once(':').map_or(self.authority.as_str(), |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|_| ClientError::BadUrl {
            url: self.authority.clone(),
            why: "the host is neither a DNS name nor an IP address",
        })
    }
}

/// A connection's byte stream: plain TCP or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects (and for https, shakes hands) within [`CONNECT_TIMEOUT`].
async fn connect(url: &CpUrl) -> Result<Box<dyn Io>, ClientError> {
    let authority = url.authority.clone();
    let work = async {
        let stream = TcpStream::connect(&authority)
            .await
            .map_err(|source| ClientError::Connect { authority: authority.clone(), source })?;
        let _ = stream.set_nodelay(true);
        if let Err(e) = TCP_KEEPALIVE.apply(&stream) {
            tracing::debug!(error = %e, "cannot set TCP keepalive");
        }
        match (&url.tls, url.https) {
            (None, false) => Ok(Box::new(stream) as Box<dyn Io>),
            (Some(tls), true) => {
                let tls_stream = tls
                    .connector()
                    .connect(url.server_name()?, stream)
                    .await
                    .map_err(|source| ClientError::Handshake { authority: authority.clone(), source })?;
                Ok(Box::new(tls_stream) as Box<dyn Io>)
            }
            (None, true) => Err(ClientError::TlsSetup(format!(
                "https://{authority} needs the client's TLS files (--ca-cert, --client-cert, --client-key)"
            ))),
            (Some(_), false) => Err(ClientError::TlsSetup(format!("http://{authority} is plaintext; use https://"))),
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, work)
        .await
        .map_err(|_| ClientError::Timeout { authority: authority.clone() })?
}

/// A whole answer.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpResponse {
    /// The answer as JSON if 2xx, else the CP's error as [`ClientError`].
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ClientError> {
        if !self.status.is_success() {
            return Err(self.error());
        }
        serde_json::from_slice(&self.body).map_err(|source| ClientError::BadAnswer { status: self.status, source })
    }

    pub fn error(&self) -> ClientError {
        match serde_json::from_slice::<ErrorBody>(&self.body) {
            Ok(e) => ClientError::Status { status: self.status, code: e.error, message: e.message },
            Err(_) => ClientError::Status {
                status: self.status,
                code: "unknown".to_owned(),
                message: String::from_utf8_lossy(&self.body).chars().take(200).collect(),
            },
        }
    }
}

/// A hyper error, or [`ClientError::CertificateRefused`] when underneath it
/// the server sent a TLS alert.
fn http_error(authority: &str, source: hyper::Error) -> ClientError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&source);
    while let Some(err) = cause {
        let inner =
            err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).map(|e| e as &dyn std::error::Error);
        if let Some(rustls::Error::AlertReceived(alert)) = inner.and_then(|e| e.downcast_ref::<rustls::Error>()) {
            return ClientError::CertificateRefused { authority: authority.to_owned(), alert: format!("{alert:?}") };
        }
        cause = err.source();
    }
    ClientError::Http { authority: authority.to_owned(), source }
}

/// One request with `X-Nixfleet-Protocol: 1` unless `headers` sets it; a
/// header given with an empty value is left out (tests use that to send a
/// request without the protocol header). The deadline follows the request
/// ([`deadline_for`]).
pub async fn request(
    url: &CpUrl,
    method: Method,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<HttpResponse, ClientError> {
    let deadline = deadline_for(path_and_query);
    request_with(url, method, path_and_query, headers, body, deadline).await
}

/// [`request`] with an explicit deadline for the whole exchange after the
/// connection is made: sending, waiting, and reading the answer to its end
/// (a server dribbling its answer cannot hold the caller longer).
pub async fn request_with(
    url: &CpUrl,
    method: Method,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
    deadline: Duration,
) -> Result<HttpResponse, ClientError> {
    let authority = url.authority.clone();
    let timeout = || ClientError::Timeout { authority: authority.clone() };
    let stream = connect(url).await?;
    let http = |source| http_error(&authority, source);
    let handshake = hyper::client::conn::http1::handshake(TokioIo::new(stream));
    let (mut sender, conn) = tokio::time::timeout(deadline, handshake).await.map_err(|_| timeout())?.map_err(http)?;
    let mut driver = tokio::spawn(conn);

    let mut builder = Request::builder().method(method).uri(path_and_query).header(HOST, &authority);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(PROTOCOL_HEADER)) {
        builder = builder.header(PROTOCOL_HEADER, PROTOCOL_VERSION);
    }
    for (k, v) in headers.iter().filter(|(_, v)| !v.is_empty()) {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| ClientError::BadHeader((*k).to_owned()))?;
        let value = HeaderValue::from_str(v).map_err(|_| ClientError::BadHeader((*k).to_owned()))?;
        builder = builder.header(name, value);
    }
    if body.is_some() {
        builder = builder.header(CONTENT_TYPE, "application/json");
    }
    let req = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| ClientError::BadHeader(e.to_string()))?;
    let work = async {
        let resp = sender.send_request(req).await.map_err(http)?;
        let (parts, body) = resp.into_parts();
        let declared = parts
            .headers
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        let body = collect_bounded(body, MAX_RESPONSE_BYTES, declared).await.map_err(|e| ClientError::Body {
            authority: authority.clone(),
            status: parts.status,
            source: Box::new(e),
        })?;
        Ok(HttpResponse { status: parts.status, headers: parts.headers, body: Bytes::from(body) })
    };
    let mut result = tokio::time::timeout(deadline, work).await.map_err(|_| timeout());
    drop(sender);
    let mut driver_done = false;
    if let Ok(Err(ClientError::Http { .. })) = &result {
        // A request cancelled by a failed connection: the connection's own
        // error says why (a TLS alert: the certificate was refused).
        if let Ok(joined) = tokio::time::timeout(CONNECTION_ERROR_WAIT, &mut driver).await {
            driver_done = true;
            if let Ok(Err(e)) = joined {
                if let refused @ ClientError::CertificateRefused { .. } = http_error(&authority, e) {
                    result = Ok(Err(refused));
                }
            }
        }
    }
    if !driver_done {
        driver.abort();
        let _ = driver.await;
    }
    result?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_follow_the_request() {
        let margin = LONGPOLL_DEADLINE_MARGIN;
        assert_eq!(deadline_for("/v1/agent/dispatch?hostname=web-1&wait=20"), Duration::from_secs(20) + margin);
        assert_eq!(deadline_for("/v1/agent/dispatch?wait=0&hostname=web-1"), margin);
        let longest = Duration::from_secs(MAX_LONGPOLL_WAIT_SECS) + margin;
        assert_eq!(deadline_for("/v1/agent/dispatch?hostname=web-1&wait=99999"), longest, "clamped like the CP");
        assert_eq!(deadline_for("/v1/agent/dispatch?hostname=web-1"), longest);
        assert_eq!(deadline_for("/v1/agent/events"), AGENT_CALL_TIMEOUT);
        assert_eq!(deadline_for("/v1/agent/heartbeat"), AGENT_CALL_TIMEOUT);
        assert_eq!(deadline_for("/v1/rollouts/stable@r1/manifest"), AGENT_CALL_TIMEOUT);
        assert_eq!(deadline_for("/v1/rollouts"), OPERATOR_CALL_TIMEOUT);
    }

    #[tokio::test]
    async fn a_body_beyond_the_bound_is_refused_and_chunks_are_copied() {
        let body = Full::new(Bytes::from(vec![7u8; 10]));
        assert_eq!(collect_bounded(body, 10, 10).await.expect("fits"), vec![7u8; 10]);
        let body = Full::new(Bytes::from(vec![7u8; 11]));
        assert!(matches!(collect_bounded(body, 10, 0).await, Err(BodyError::TooLarge { limit: 10 })));
    }
}
