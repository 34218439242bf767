//! `http` probes: one GET through hyper's HTTP/1.1 client, over TCP or, for
//! `https://`, over rustls (`src/tls.rs`: ring, TLS 1.3 with 1.2 allowed).
//! Pass when the status matches and (if asked) the body contains a substring.
//!
//! An https probe trusts the host's store (rustls-native-certs: on NixOS
//! `/etc/ssl/certs/ca-certificates.crt`, which `security.pki` builds, so a
//! site CA added there works on an air-gapped host), or, when the probe names
//! a `ca_file`, that file only. Not webpki-roots: a compiled-in copy of the
//! public roots knows no site CA and is as old as the binary. The trust is
//! loaded off the reactor and reused for [`TRUST_CACHE_TTL`]: a rotated CA
//! file or a new bundle after a switch is in use within a minute, without
//! restarting the agent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::header::{ACCEPT, CONNECTION, HOST, USER_AGENT};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::output::error_chain;

use super::ProbeRun;
use crate::tls;

/// Body bytes read at most: health endpoints are small; a bigger body is
/// searched only in its first MiB, and the connection is then dropped.
pub const MAX_HTTP_RESPONSE_BYTES: usize = 1024 * 1024;

/// How long a loaded trust (the system's roots, or one CA file) is reused.
/// Loading the system's ~150 roots costs about 6 ms of CPU (measured, release
/// build), too much for every run of up to 64 probes a second; a minute keeps
/// it negligible and still follows a changed file soon. Failures are not
/// cached: a missing file is tried again at the next run.
pub const TRUST_CACHE_TTL: Duration = Duration::from_secs(60);
/// Distinct trusts kept at most: the system's plus one per `ca_file` of a
/// full health-checks file. At the limit the cache is emptied, so paths from
/// old health-checks files cannot pile up.
const MAX_TRUST_CACHE_ENTRIES: usize = 1 + crate::wire::event::MAX_PROBES;

type TrustCache = HashMap<Option<PathBuf>, (Instant, Arc<rustls::ClientConfig>)>;
static TRUST_CACHE: LazyLock<Mutex<TrustCache>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// Why an `http` probe's URL is refused (the health-checks file names it),
/// or why one GET failed (the probe's Fail reason, after `GET {url}: `).
#[derive(Debug, thiserror::Error)]
pub enum ProbeHttpError {
    #[error("{url:?} must start with http:// or https://")]
    Scheme { url: String },
    #[error("{url:?}: credentials in the URL are not supported")]
    Credentials { url: String },
    #[error("{url:?}: unclosed '[' in host")]
    UnclosedBracket { url: String },
    #[error("{url:?}: junk after ']'")]
    AfterBracket { url: String },
    #[error("{url:?} has no host")]
    NoHost { url: String },
    #[error("{url:?}: bad port {port:?}")]
    Port { url: String, port: String },
    #[error("{url:?}: the path has spaces or control characters")]
    PathCharacters { url: String },
    #[error("{url:?}: the path is not a valid request target")]
    RequestTarget { url: String },
    #[error("{url:?}: {host:?} is not a DNS name or IP address a certificate can name")]
    NotCertificateName { url: String, host: String },
    #[error("{host:?} as a TLS server name: {error}")]
    ServerName { host: String, error: rustls::pki_types::InvalidDnsNameError },
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS trust: {0}")]
    Trust(tls::TlsError),
    #[error("TLS trust: loading task failed: {0}")]
    TrustTask(tokio::task::JoinError),
    #[error("TLS handshake: {}", error_chain(.0))]
    TlsHandshake(std::io::Error),
    #[error("HTTP: {}", error_chain(.0))]
    HttpHandshake(hyper::Error),
    #[error("request: {0}")]
    Request(hyper::http::Error),
    /// Sending the request or reading the response head.
    #[error("{}", error_chain(.0))]
    Exchange(hyper::Error),
    #[error("reading the body: {}", error_chain(.0))]
    Body(hyper::Error),
    /// The connection failed before the response was whole.
    #[error("{}", error_chain(.0))]
    Connection(hyper::Error),
}

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// A parsed `http[s]://host[:port][/path]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub scheme: Scheme,
    /// Host as written, without brackets for IPv6 literals.
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    /// The URL as written, for messages.
    pub original: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl, ProbeHttpError> {
        let bad = || url.to_owned();
        let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else {
            return Err(ProbeHttpError::Scheme { url: bad() });
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'?' => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') {
            return Err(ProbeHttpError::Credentials { url: bad() });
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| ProbeHttpError::UnclosedBracket { url: bad() })?;
            match after {
                "" => (host, None),
                p => (host, Some(p.strip_prefix(':').ok_or_else(|| ProbeHttpError::AfterBracket { url: bad() })?)),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(ProbeHttpError::NoHost { url: bad() });
        }
        let port = match port {
            None => scheme.default_port(),
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| ProbeHttpError::Port { url: bad(), port: p.to_owned() })?,
        };
        if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(ProbeHttpError::PathCharacters { url: bad() });
        }
        if path.parse::<hyper::Uri>().is_err() {
            return Err(ProbeHttpError::RequestTarget { url: bad() });
        }
        if scheme == Scheme::Https && rustls::pki_types::ServerName::try_from(host).is_err() {
            return Err(ProbeHttpError::NotCertificateName { url: bad(), host: host.to_owned() });
        }
        Ok(HttpUrl { scheme, host: host.to_owned(), port, path, original: url.to_owned() })
    }

    fn host_header(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == self.scheme.default_port() {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// GETs `url` once; the timeout covers loading the trust, connecting, the
/// TLS handshake, sending and reading. `ca_file` (https only) replaces the
/// system's roots.
pub async fn run(
    url: &HttpUrl,
    expect_status: u16,
    body_contains: Option<&str>,
    ca_file: Option<&Path>,
    timeout: Duration,
) -> ProbeRun {
    let response = match tokio::time::timeout(timeout, get(url, ca_file)).await {
        Err(_elapsed) => {
            return ProbeRun::fail(format!("GET {} timed out after {} s", url.original, timeout.as_secs()))
        }
        Ok(Err(why)) => return ProbeRun::fail(format!("GET {}: {why}", url.original)),
        Ok(Ok(response)) => response,
    };
    if response.status != expect_status {
        return ProbeRun::fail(format!("GET {}: status {} (expected {expect_status})", url.original, response.status));
    }
    if let Some(needle) = body_contains {
        if !contains(&response.body, needle.as_bytes()) {
            let cut = if response.truncated { " (first MiB)" } else { "" };
            return ProbeRun::fail(format!("GET {}: body{cut} does not contain {needle:?}", url.original));
        }
    }
    ProbeRun::pass()
}

struct Response {
    status: u16,
    body: Vec<u8>,
    truncated: bool,
}

async fn get(url: &HttpUrl, ca_file: Option<&Path>) -> Result<Response, ProbeHttpError> {
    match url.scheme {
        Scheme::Http => {
            let tcp = connect(url).await?;
            exchange(TokioIo::new(tcp), url).await
        }
        Scheme::Https => {
            let config = client_config(ca_file.map(Path::to_owned)).await?;
            let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                .map_err(|error| ProbeHttpError::ServerName { host: url.host.clone(), error })?;
            let tcp = connect(url).await?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(ProbeHttpError::TlsHandshake)?;
            exchange(TokioIo::new(tls), url).await
        }
    }
}

async fn connect(url: &HttpUrl) -> Result<TcpStream, ProbeHttpError> {
    TcpStream::connect((url.host.as_str(), url.port)).await.map_err(ProbeHttpError::Connect)
}

/// The https client config: the probe's CA file, or the system's roots,
/// from the cache or loaded on the blocking pool (it is file I/O).
async fn client_config(ca_file: Option<PathBuf>) -> Result<Arc<rustls::ClientConfig>, ProbeHttpError> {
    let now = Instant::now();
    let cache = || TRUST_CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((loaded_at, config)) = cache().get(&ca_file) {
        if now.saturating_duration_since(*loaded_at) < TRUST_CACHE_TTL {
            return Ok(Arc::clone(config));
        }
    }
    let config = load_client_config(ca_file.clone()).await?;
    let mut cached = cache();
    if cached.len() >= MAX_TRUST_CACHE_ENTRIES {
        cached.clear();
    }
    cached.insert(ca_file, (now, Arc::clone(&config)));
    Ok(config)
}

async fn load_client_config(ca_file: Option<PathBuf>) -> Result<Arc<rustls::ClientConfig>, ProbeHttpError> {
    let build = move || {
        let roots = match &ca_file {
            Some(path) => tls::load_ca_bundle(path)?,
            None => tls::system_roots()?,
        };
        let mut config = tls::client_config_with_roots(roots, None)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok::<_, tls::TlsError>(Arc::new(config))
    };
    match tokio::task::spawn_blocking(build).await {
        Ok(Ok(config)) => Ok(config),
        Ok(Err(e)) => Err(ProbeHttpError::Trust(e)),
        Err(e) => Err(ProbeHttpError::TrustTask(e)),
    }
}

/// One request and its response on an open connection. The connection is
/// driven here, not in a spawned task, and dropped with the response.
async fn exchange<T>(io: T, url: &HttpUrl) -> Result<Response, ProbeHttpError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(ProbeHttpError::HttpHandshake)?;
    let request = hyper::Request::get(url.path.as_str())
        .header(HOST, url.host_header())
        .header(USER_AGENT, "nixfleet-probe")
        .header(ACCEPT, "*/*")
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(ProbeHttpError::Request)?;
    let response = async {
        let response = sender.send_request(request).await.map_err(ProbeHttpError::Exchange)?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut bytes = Vec::new();
        let mut truncated = false;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(ProbeHttpError::Body)?;
            let Some(data) = frame.data_ref() else { continue };
            let room = MAX_HTTP_RESPONSE_BYTES - bytes.len();
            if data.len() > room {
                bytes.extend_from_slice(&data[..room]);
                truncated = true;
                break;
            }
            bytes.extend_from_slice(data);
        }
        Ok::<_, ProbeHttpError>(Response { status, body: bytes, truncated })
    };
    tokio::pin!(response, conn);
    tokio::select! {
        biased;
        done = &mut response => done,
        ended = &mut conn => match ended {
            // The connection ended cleanly: what it read is in the response.
            Ok(()) => response.await,
            Err(e) => Err(ProbeHttpError::Connection(e)),
        },
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_scheme_host_port_and_path() {
        let u = HttpUrl::parse("http://127.0.0.1:8080/healthz?full=1").expect("valid");
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port, u.path.as_str()),
            (Scheme::Http, "127.0.0.1", 8080, "/healthz?full=1")
        );
        let u = HttpUrl::parse("http://localhost").expect("valid");
        assert_eq!((u.port, u.path.as_str(), u.host_header()), (80, "/", "localhost".to_owned()));
        let u = HttpUrl::parse("http://[::1]:9/x").expect("valid");
        assert_eq!((u.host.as_str(), u.port, u.host_header()), ("::1", 9, "[::1]:9".to_owned()));
        let u = HttpUrl::parse("http://h?q").expect("valid");
        assert_eq!(u.path, "/?q");
        let u = HttpUrl::parse("https://app.internal/healthz").expect("valid");
        assert_eq!((u.scheme, u.port, u.host_header()), (Scheme::Https, 443, "app.internal".to_owned()));
        let u = HttpUrl::parse("https://[::1]:8443/").expect("valid");
        assert_eq!((u.scheme, u.host.as_str(), u.port), (Scheme::Https, "::1", 8443));
    }

    #[test]
    fn bad_urls_are_config_errors() {
        for bad in [
            "ftp://x",
            "http://",
            "https://",
            "http://h:0/",
            "http://h:99999/",
            "http://u:p@h/",
            "http://h/a b",
            "https://a_b!/",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
        // The texts the health-checks error reports, unchanged by the typed error.
        let text = |url: &str| HttpUrl::parse(url).expect_err(url).to_string();
        assert_eq!(text("ftp://x"), r#""ftp://x" must start with http:// or https://"#);
        assert_eq!(text("http://h:0/"), r#""http://h:0/": bad port "0""#);
        assert_eq!(
            text("https://a_b!/"),
            r#""https://a_b!/": "a_b!" is not a DNS name or IP address a certificate can name"#
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_loaded_trust_is_reused_for_the_ttl_then_loaded_again_and_failures_are_not_kept() {
        // Proves the trust cache: one load per TTL per CA file, a reload after it, and a vanished file failing
        // at the first run after the TTL instead of being served from the cache forever.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        fs_err::write(&path, params.self_signed(&key).expect("ca").pem()).expect("write");
        let first = client_config(Some(path.clone())).await.expect("load");
        let again = client_config(Some(path.clone())).await.expect("cached");
        assert!(Arc::ptr_eq(&first, &again), "reused within the TTL");
        tokio::time::advance(TRUST_CACHE_TTL).await;
        let reloaded = client_config(Some(path.clone())).await.expect("reload");
        assert!(!Arc::ptr_eq(&first, &reloaded), "loaded again after the TTL");
        fs_err::remove_file(&path).expect("remove");
        tokio::time::advance(TRUST_CACHE_TTL).await;
        let err = client_config(Some(path.clone())).await.expect_err("gone");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn substring_search_spans_the_whole_body() {
        assert!(contains(b"status: healthy", b"healthy"));
        assert!(!contains(b"heal", b"healthy"));
        assert!(contains(b"", b""));
    }
}
