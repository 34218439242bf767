//! A minimal HTTP/1.1 client for the agent, `cp publish` / `cp status` and
//! the integration tests: one connection per request, a deadline on each, JSON
//! errors turned into messages. Plain `http://` only until TLS lands.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::wire::{ErrorBody, MAX_LONGPOLL_WAIT_SECS, PROTOCOL_HEADER, PROTOCOL_VERSION};

/// Connecting longer than this means the CP is down or unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole request, including the longest long-poll the CP holds.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(MAX_LONGPOLL_WAIT_SECS + 30);
/// Answers above this are refused (status views of a 100k-host fleet fit).
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad control plane URL {url:?}: {why}")]
    BadUrl { url: String, why: &'static str },
    #[error("cannot connect to {authority}: {source}")]
    Connect { authority: String, source: std::io::Error },
    #[error("request to {authority} timed out")]
    Timeout { authority: String },
    #[error("HTTP error talking to {authority}: {source}")]
    Http { authority: String, source: hyper::Error },
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

/// `http://host:port` of a control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpUrl {
    authority: String,
}

impl CpUrl {
    pub fn parse(url: &str) -> Result<CpUrl, ClientError> {
        let bad = |why| ClientError::BadUrl { url: url.to_owned(), why };
        if url.starts_with("https://") {
            return Err(bad("https is not supported yet; TLS arrives with the transport-security work"));
        }
        let rest = url.strip_prefix("http://").ok_or_else(|| bad("must start with http://"))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
            return Err(bad("expected http://HOST:PORT"));
        }
        Ok(CpUrl { authority: authority.to_owned() })
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }
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

/// One request with `X-Nixfleet-Protocol: 1` unless `headers` sets it; a
/// header given with an empty value is left out (tests use that to send a
/// request without the protocol header).
pub async fn request(
    url: &CpUrl,
    method: Method,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<HttpResponse, ClientError> {
    let authority = url.authority.clone();
    let timeout = || ClientError::Timeout { authority: authority.clone() };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&authority))
        .await
        .map_err(|_| timeout())?
        .map_err(|source| ClientError::Connect { authority: authority.clone(), source })?;
    let _ = stream.set_nodelay(true);
    let http = |source| ClientError::Http { authority: authority.clone(), source };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
    let driver = tokio::spawn(conn);

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
        let body = http_body_util::Limited::new(body, MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|source| ClientError::Body { authority: authority.clone(), status: parts.status, source })?;
        Ok(HttpResponse { status: parts.status, headers: parts.headers, body: body.to_bytes() })
    };
    let result = tokio::time::timeout(REQUEST_TIMEOUT, work).await.map_err(|_| timeout());
    drop(sender);
    driver.abort();
    let _ = driver.await;
    result?
}
