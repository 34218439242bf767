//! Hostile clients against the real `cp serve` over loopback, and the
//! client against hostile servers: each limit of the HTTP layer crossed,
//! answered with the JSON error shape, nothing stored.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use super::*;

fn addr(cp: &Cp) -> SocketAddr {
    cp.url.authority().parse().expect("socket address")
}

/// Reads a whole answer (the server closes, or 10 s pass).
fn read_answer(stream: &mut TcpStream) -> String {
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Status code and parsed JSON body of a raw answer.
fn parse_answer(text: &str) -> (u16, serde_json::Value) {
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status: {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let json = serde_json::from_str(body).unwrap_or_else(|_| panic!("not a JSON body: {text:?}"));
    (status, json)
}

fn raw_exchange(cp: &Cp, request: &[u8]) -> (u16, serde_json::Value) {
    let mut stream = TcpStream::connect(addr(cp)).expect("connect");
    let _ = stream.write_all(request);
    parse_answer(&read_answer(&mut stream))
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

fn count_rows(cp: &Cp, table: &str) -> i64 {
    let conn = rusqlite::Connection::open(&cp.db).expect("open db");
    conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0)).expect("count")
}

/// A body dribbled one byte at a time: the CP's memory follows the bytes
/// received (it used to grow about 4.2 KB per byte), and after the body
/// deadline the request is answered 408 with the JSON error shape and
/// nothing is stored.
#[test]
fn a_dribbled_body_costs_its_bytes_and_ends_at_the_body_deadline() {
    let dir = TempDir::new("dribble");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start_with(dir.path(), &release.pub_path, &["--body-timeout", "4s"]);
    let mut stream = TcpStream::connect(addr(&cp)).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let head = "POST /v1/agent/heartbeat HTTP/1.1\r\nhost: cp\r\nx-nixfleet-protocol: 1\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n";
    stream.write_all(head.as_bytes()).expect("head");
    std::thread::sleep(Duration::from_millis(200));
    let before = rss_kib(cp.pid());
    let started = Instant::now();
    let n_bytes = 3000u64;
    for _ in 0..n_bytes {
        if stream.write_all(b" ").is_err() {
            break;
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    let grown = rss_kib(cp.pid()).saturating_sub(before);
    // 3,000 one-byte reads used to pin ~12 MB; a copy costs 3 KB plus noise.
    assert!(grown < 3 * 1024, "the CP grew {grown} KiB for {n_bytes} dribbled bytes");
    let (status, json) = parse_answer(&read_answer(&mut stream));
    let elapsed = started.elapsed();
    assert_eq!(status, 408, "{json}");
    assert_eq!(json["error"], "body_timeout", "{json}");
    assert!(elapsed < Duration::from_secs(10), "answered after {elapsed:?}");
    assert_eq!(count_rows(&cp, "hosts"), 0, "nothing stored");
}

/// The HTTP layer's own refusals carry the JSON error shape: a head too
/// large (431), a request line that is not HTTP (400), a URI beyond the
/// routes' bound (414). They used to be empty bodies.
#[test]
fn http_layer_errors_carry_the_json_error_shape() {
    let (_dir, _release, cp) = setup("http-errors");
    let big_header = format!("GET /healthz HTTP/1.1\r\nhost: cp\r\nx-junk: {}\r\n\r\n", "a".repeat(80 * 1024));
    let (status, json) = raw_exchange(&cp, big_header.as_bytes());
    assert_eq!((status, json["error"].as_str()), (431, Some("header_too_large")), "{json}");
    let many_headers: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
    let (status, json) = raw_exchange(&cp, format!("GET /healthz HTTP/1.1\r\n{many_headers}\r\n").as_bytes());
    assert_eq!((status, json["error"].as_str()), (431, Some("header_too_large")), "{json}");
    let (status, json) = raw_exchange(&cp, b"\x16\x03\x01 garbage that is no request\r\n\r\n");
    assert_eq!((status, json["error"].as_str()), (400, Some("bad_request")), "{json}");
    let long_uri = format!("GET /v1/rollouts/{} HTTP/1.1\r\nhost: cp\r\nconnection: close\r\n\r\n", "a".repeat(9000));
    let (status, json) = raw_exchange(&cp, long_uri.as_bytes());
    assert_eq!((status, json["error"].as_str()), (414, Some("uri_too_long")), "{json}");
    assert!(!json["message"].as_str().unwrap_or("").is_empty());
}

/// An idle connection is closed after the header timeout, also between
/// two requests of a kept-alive connection (the idle keep-alive timeout).
#[test]
fn idle_connections_are_closed_after_the_header_timeout() {
    let dir = TempDir::new("idle");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start_with(dir.path(), &release.pub_path, &["--header-timeout", "1s"]);
    let started = Instant::now();
    let mut silent = TcpStream::connect(addr(&cp)).expect("connect");
    let _ = read_answer(&mut silent);
    let silent_for = started.elapsed();
    assert!(silent_for < Duration::from_secs(5), "a silent connection lived {silent_for:?}");
    let mut kept = TcpStream::connect(addr(&cp)).expect("connect");
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: cp\r\n\r\n").expect("request");
    let started = Instant::now();
    let text = read_answer(&mut kept);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let idle_for = started.elapsed();
    assert!(idle_for < Duration::from_secs(5), "an idle kept-alive connection lived {idle_for:?}");
}

async fn connect_from(source: &str, to: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(format!("{source}:0").parse().expect("source")).expect("bind source");
    socket.connect(to).await.expect("connect")
}

async fn exchange(stream: &mut tokio::net::TcpStream, request: &str) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.write_all(request.as_bytes()).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&out);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_owned))
                        .and_then(|v| v.trim().parse::<usize>().ok());
                    if len.is_some_and(|n| body.len() >= n) {
                        break;
                    }
                }
            }
        }
    }
    parse_answer(&String::from_utf8_lossy(&out))
}

/// Per client address and in total: the connection beyond the address's
/// cap is answered 429, beyond the total the operator reserve serves
/// status views but answers agent requests 503, and beyond the reserve the
/// connection is answered 503; nothing is stored by any of them.
#[test]
fn connection_limits_per_address_in_total_and_the_operator_reserve() {
    let dir = TempDir::new("conn-limits");
    let release = Release::new(dir.path(), "release");
    let extra = ["--max-connections", "4", "--max-connections-per-address", "3"];
    let cp = Cp::start_with(dir.path(), &release.pub_path, &extra);
    let to = addr(&cp);
    rt().block_on(async {
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(connect_from("127.0.0.2", to).await);
        }
        let mut fourth = connect_from("127.0.0.2", to).await;
        // Refused before any request is read: only read the answer.
        let (status, json) = exchange(&mut fourth, "").await;
        assert_eq!((status, json["error"].as_str()), (429, Some("too_many_connections_from_address")), "{json}");
        held.push(connect_from("127.0.0.3", to).await);
        // Total reached (4): the next connections are the reserve.
        let mut operator = connect_from("127.0.0.4", to).await;
        let (status, json) = exchange(&mut operator, "GET /v1/status HTTP/1.1\r\nhost: cp\r\n\r\n").await;
        assert_eq!(status, 200, "an operator gets in through the reserve: {json}");
        let mut agent = connect_from("127.0.0.5", to).await;
        let hb = r#"{"hostname":"web-1","current_closure":"/nix/store/00000000000000000000000000000000-x","uptime_secs":1,"agent_version":"t"}"#;
        let request = format!(
            "POST /v1/agent/heartbeat HTTP/1.1\r\nhost: cp\r\nx-nixfleet-protocol: 1\r\ncontent-length: {}\r\n\r\n{hb}",
            hb.len()
        );
        let (status, json) = exchange(&mut agent, &request).await;
        assert_eq!((status, json["error"].as_str()), (503, Some("too_many_connections")), "{json}");
        drop(held);
    });
    assert_eq!(count_rows(&cp, "hosts"), 0, "nothing stored");
}

/// At the descriptor limit (`ulimit -n 160`): 150 idle connections from
/// several addresses take every ordinary and reserve slot and the rest wait
/// in the backlog; accepting never fails with EMFILE (no "accept failed"
/// storm); once idle reserve connections time out, an operator's status
/// request is answered within seconds.
#[test]
fn at_the_descriptor_limit_an_operator_still_gets_in() {
    let dir = TempDir::new("fd-limit");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start_with_nofile(dir.path(), &release.pub_path, &[], 160);
    let to = addr(&cp);
    rt().block_on(async {
        let mut held = Vec::new();
        for i in 0..150 {
            held.push(connect_from(&format!("127.0.1.{}", 1 + i % 5), to).await);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let url = client::CpUrl::parse(&format!("http://{to}")).expect("url");
        let resp = client::request(&url, Method::GET, "/v1/status", &[], None).await.expect("status");
        assert_eq!(resp.status, StatusCode::OK);
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(10), "the operator waited {waited:?}");
        drop(held);
    });
    let log = cp.log_text();
    assert!(!log.contains("accept failed"), "accept hit the descriptor limit: {log}");
}

/// One outstanding long-poll per host through the real CP: a second poll
/// of web-1 answers the first at once with 409 `longpoll_replaced`.
#[test]
fn a_newer_long_poll_answers_the_older_at_once() {
    let (_dir, _release, cp) = setup("longpoll-replace");
    rt().block_on(async {
        let url = cp.url.clone();
        let first = tokio::spawn(async move {
            let started = Instant::now();
            let resp = client::request(&url, Method::GET, "/v1/agent/dispatch?hostname=web-1&wait=30", &[], None)
                .await
                .expect("first poll");
            (resp, started.elapsed())
        });
        wait_parked(&cp, 1).await;
        let url = cp.url.clone();
        let second = tokio::spawn(async move {
            client::request(&url, Method::GET, "/v1/agent/dispatch?hostname=web-1&wait=1", &[], None).await
        });
        let (resp, took) = first.await.expect("join");
        assert_eq!(resp.status, StatusCode::CONFLICT);
        let json: serde_json::Value = serde_json::from_slice(&resp.body).expect("JSON");
        assert_eq!(json["error"], "longpoll_replaced");
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert_eq!(second.await.expect("join").expect("second poll").status, StatusCode::NO_CONTENT);
    });
}

/// A server that accepts and never answers, and one that dribbles its
/// answer a byte at a time: the client's deadline follows the request (a
/// long-poll of 1 s gives up after 1 s + the margin, not after 90 s), and a
/// declared answer beyond the bound is refused without reading it.
#[test]
fn the_client_gives_up_on_silent_dribbling_and_oversized_answers() {
    rt().block_on(async {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server_addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else { return };
                let mut head = [0u8; 1024];
                let n = tokio::io::AsyncReadExt::read(&mut tcp, &mut head).await.unwrap_or(0);
                let text = String::from_utf8_lossy(&head[..n]).into_owned();
                if text.starts_with("GET /dribble") {
                    tokio::spawn(async move {
                        let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n").await;
                        while tcp.write_all(b"x").await.is_ok() {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    });
                } else if text.starts_with("GET /huge") {
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", client::MAX_RESPONSE_BYTES + 1);
                    let _ = tcp.write_all(head.as_bytes()).await;
                    let _ = tcp.write_all(&vec![b'x'; 64 * 1024]).await;
                    held.push(tcp);
                } else {
                    held.push(tcp);
                }
            }
        });
        let url = client::CpUrl::parse(&format!("http://{server_addr}")).expect("url");
        let started = Instant::now();
        let err = client::request(&url, Method::GET, "/v1/agent/dispatch?hostname=web-1&wait=1", &[], None)
            .await
            .expect_err("silent server");
        let took = started.elapsed();
        assert!(matches!(err, client::ClientError::Timeout { .. }), "{err}");
        let expected = Duration::from_secs(1) + client::LONGPOLL_DEADLINE_MARGIN;
        assert!(took >= expected && took < expected + Duration::from_secs(3), "gave up after {took:?}");
        let started = Instant::now();
        let err = client::request_with(&url, Method::GET, "/dribble", &[], None, Duration::from_secs(2))
            .await
            .expect_err("dribbling server");
        assert!(matches!(err, client::ClientError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        let err = client::request_with(&url, Method::GET, "/huge", &[], None, Duration::from_secs(5))
            .await
            .expect_err("oversized answer");
        assert!(matches!(err, client::ClientError::Body { .. }), "{err}");
        assert!(err.to_string().contains("larger than"), "{err}");
        server.abort();
    });
}
