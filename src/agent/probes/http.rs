//! `http` probes: one plain HTTP/1.1 GET over a TCP connection, Pass when the
//! status matches and (if asked) the body contains a substring.
//!
//! A probe needs only a status line and a body, so this speaks the small
//! subset of HTTP/1.1 it needs (`Connection: close`, Content-Length, chunked)
//! instead of pulling in an HTTP client. `https://` URLs are not supported
//! yet and are rejected when the health-checks file is parsed, so they can
//! never turn into a silently passing probe.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::ProbeRun;

/// Bytes of response read at most (headers and body): health endpoints are
/// small; a bigger body is searched only in its first MiB.
pub const HTTP_RESPONSE_MAX_BYTES: usize = 1024 * 1024;

/// A parsed `http://host[:port][/path]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// Host as written, without brackets for IPv6 literals.
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    /// The URL as written, for messages.
    pub original: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl, String> {
        if url.starts_with("https://") {
            return Err(format!("{url:?}: https probes are not supported yet; use http:// or an exec probe"));
        }
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(format!("{url:?} must start with http://"));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'?' => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') {
            return Err(format!("{url:?}: credentials in the URL are not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| format!("{url:?}: unclosed '[' in host"))?;
            match after {
                "" => (host, None),
                p => (host, Some(p.strip_prefix(':').ok_or_else(|| format!("{url:?}: junk after ']'"))?)),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let port = match port {
            None => 80,
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("{url:?}: bad port {p:?}"))?,
        };
        if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(format!("{url:?}: the path has spaces or control characters"));
        }
        Ok(HttpUrl { host: host.to_owned(), port, path, original: url.to_owned() })
    }

    fn host_header(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == 80 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// GETs `url` once; the timeout covers connecting, sending and reading.
pub async fn run(url: &HttpUrl, expect_status: u16, body_contains: Option<&str>, timeout: Duration) -> ProbeRun {
    let response = match tokio::time::timeout(timeout, get(url)).await {
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

async fn get(url: &HttpUrl) -> Result<Response, String> {
    let mut stream = TcpStream::connect((url.host.as_str(), url.port)).await.map_err(|e| format!("connect: {e}"))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: nixfleet-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        url.path,
        url.host_header()
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let mut truncated = false;
    loop {
        let n = stream.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if raw.len() >= HTTP_RESPONSE_MAX_BYTES {
            raw.truncate(HTTP_RESPONSE_MAX_BYTES);
            truncated = true;
            break;
        }
        if let Some(done) = complete_length(&raw) {
            raw.truncate(done);
            break;
        }
    }
    parse_response(&raw, truncated)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// Splits headers from body: (status, header lines, body start).
fn head(raw: &[u8]) -> Option<(&str, usize)> {
    let end = find(raw, b"\r\n\r\n")?;
    let text = std::str::from_utf8(&raw[..end]).ok()?;
    Some((text, end + 4))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// With Content-Length, the response is complete at a known length; a server
/// that keeps the connection open despite `Connection: close` then still works.
fn complete_length(raw: &[u8]) -> Option<usize> {
    let (text, body_at) = head(raw)?;
    let len: usize = header(text, "content-length")?.parse().ok()?;
    let total = body_at.checked_add(len)?;
    (raw.len() >= total).then_some(total)
}

fn parse_response(raw: &[u8], truncated: bool) -> Result<Response, String> {
    let Some((text, body_at)) = head(raw) else {
        return Err(if raw.is_empty() {
            "connection closed without a response".to_owned()
        } else {
            "response headers incomplete or not UTF-8".to_owned()
        });
    };
    let status_line = text.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let status = match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code.parse::<u16>().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("not an HTTP/1.x status line: {:?}", status_line.chars().take(80).collect::<String>()))?;
    let body = &raw[body_at..];
    let chunked = header(text, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_vec() };
    Ok(Response { status, body, truncated })
}

/// Decodes a chunked body as far as it goes (a cut-off body yields what arrived).
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = find(data, b"\r\n") {
        let size_text = std::str::from_utf8(&data[..line_end]).unwrap_or("");
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else { break };
        data = &data[line_end + 2..];
        if size == 0 {
            break;
        }
        let take = size.min(data.len());
        out.extend_from_slice(&data[..take]);
        data = data.get(take + 2..).unwrap_or(&[]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_host_port_and_path() {
        let u = HttpUrl::parse("http://127.0.0.1:8080/healthz?full=1").expect("valid");
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("127.0.0.1", 8080, "/healthz?full=1"));
        let u = HttpUrl::parse("http://localhost").expect("valid");
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        let u = HttpUrl::parse("http://[::1]:9/x").expect("valid");
        assert_eq!((u.host.as_str(), u.port, u.host_header()), ("::1", 9, "[::1]:9".to_owned()));
        let u = HttpUrl::parse("http://h?q").expect("valid");
        assert_eq!(u.path, "/?q");
    }

    #[test]
    fn bad_urls_are_config_errors_and_https_says_it_is_unsupported() {
        let err = HttpUrl::parse("https://example.org/").expect_err("https");
        assert!(err.contains("https probes are not supported yet"), "{err}");
        for bad in ["ftp://x", "http://", "http://h:0/", "http://h:99999/", "http://u:p@h/", "http://h/a b"] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chunked_bodies_are_decoded_so_substrings_spanning_chunks_match() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nheal\r\n3;x=y\r\nthy\r\n0\r\n\r\n";
        let r = parse_response(raw, false).expect("parses");
        assert_eq!((r.status, r.body.as_slice()), (200, b"healthy".as_slice()));
    }

    #[test]
    fn garbage_responses_are_errors_not_panics() {
        assert!(parse_response(b"", false).is_err());
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n", false).is_err());
        assert!(parse_response(b"HTTP/1.1 abc\r\n\r\n", false).is_err());
        assert_eq!(dechunk(b"zz\r\n"), b"");
        assert_eq!(dechunk(b"ff\r\nabc"), b"abc");
    }
}
