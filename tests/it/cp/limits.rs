//! Hostile clients against the real `cp serve` over loopback, and the
//! client against hostile servers: each limit of the HTTP layer crossed,
//! answered with the JSON error shape, nothing stored.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use super::*;
use crate::harness::request;

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
    if status >= 400 {
        // Refusals of the HTTP layer come before any route: the document's error shape.
        crate::openapi::check_error_shape(&format!("a raw request answered {status}"), &json);
    }
    (status, json)
}

/// A raw answer (status line, headers, a body of Content-Length) as the
/// client's response type, for `openapi::check_response`.
fn raw_response(text: &str) -> client::HttpResponse {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head: {text:?}"));
    let status = head.get(9..12).and_then(|s| s.parse::<u16>().ok()).expect("status");
    let mut headers = hyper::HeaderMap::new();
    for line in head.lines().skip(1) {
        let (name, value) = line.split_once(':').unwrap_or_else(|| panic!("header line {line:?}"));
        let name = hyper::header::HeaderName::from_bytes(name.trim().as_bytes()).expect("header name");
        headers.append(name, value.trim().parse().expect("header value"));
    }
    let status = StatusCode::from_u16(status).expect("status code");
    client::HttpResponse { status, headers, body: body.as_bytes().to_vec().into() }
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
    let answer = read_answer(&mut stream);
    let (status, json) = parse_answer(&answer);
    let elapsed = started.elapsed();
    assert_eq!(status, 408, "{json}");
    crate::openapi::check_response("POST", "/v1/agent/heartbeat", &raw_response(&answer));
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
    let text = String::from_utf8_lossy(&out);
    // A request that got through to a route: its answer against the document.
    if let Some([method, path, _]) = request.lines().next().map(|l| l.split(' ').collect::<Vec<_>>()).as_deref() {
        crate::openapi::check_response(method, path, &raw_response(&text));
    }
    parse_answer(&text)
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
        let resp = request(&url, Method::GET, "/v1/status", &[], None).await.expect("status");
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
            let resp = request(&url, Method::GET, "/v1/agent/dispatch?hostname=web-1&wait=30", &[], None)
                .await
                .expect("first poll");
            (resp, started.elapsed())
        });
        wait_parked(&cp, 1).await;
        let url = cp.url.clone();
        let second = tokio::spawn(async move {
            request(&url, Method::GET, "/v1/agent/dispatch?hostname=web-1&wait=1", &[], None).await
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
        // The client itself against a hostile stand-in server (not the CP): no
        // answer reaches the document's check, so these calls are unchecked.
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

fn heartbeat_body(host: &str) -> Vec<u8> {
    serde_json::json!({"hostname": host, "current_closure": closure("hb"), "uptime_secs": 1, "agent_version": "t"})
        .to_string()
        .into_bytes()
}

/// Only hosts named in a published manifest get records: a heartbeat for an
/// invented hostname is answered 404 `unknown_host` and stores nothing; per
/// host, heartbeats and events beyond the quota are answered 429
/// `quota_exceeded` with Retry-After, another host is untouched.
#[test]
fn unknown_hosts_get_no_records_and_per_host_quotas_hold() {
    use nixfleet::cp::quota::{
        EVENT_QUOTA_BURST, EVENT_QUOTA_PER_SEC, HEARTBEAT_QUOTA_BURST, HEARTBEAT_QUOTA_EVERY_SECS,
    };
    use std::time::Instant;
    let (_dir, release, cp) = setup("ingest-quota");
    rt().block_on(async {
        let hb = "/v1/agent/heartbeat";
        for host in ["invented-1", "invented-2"] {
            let resp = request(&cp.url, Method::POST, hb, &[], Some(heartbeat_body(host))).await.expect("hb");
            assert_eq!(resp.status, StatusCode::NOT_FOUND, "{}", String::from_utf8_lossy(&resp.body));
            assert!(matches!(resp.error(), client::ClientError::Status { code, .. } if code == "unknown_host"));
        }
        assert_eq!(count_rows(&cp, "hosts"), 0, "no record for invented hosts");
        cp.publish(&release.sign(&two_waves("stable@r1", T0, 0))).await;
        // The burst is accepted, then 429; on a loaded machine the bucket may
        // refill meanwhile (one per HEARTBEAT_QUOTA_EVERY_SECS), never more.
        let start = Instant::now();
        let mut accepted = 0u32;
        let resp = loop {
            let resp = request(&cp.url, Method::POST, hb, &[], Some(heartbeat_body("web-1"))).await.expect("hb");
            if resp.status != StatusCode::OK {
                break resp;
            }
            accepted += 1;
            let refilled = start.elapsed().as_secs() as u32 / HEARTBEAT_QUOTA_EVERY_SECS + 1;
            assert!(
                accepted <= HEARTBEAT_QUOTA_BURST + refilled,
                "{accepted} heartbeats accepted in {:?}",
                start.elapsed()
            );
        };
        assert!(accepted >= HEARTBEAT_QUOTA_BURST, "the whole burst is accepted: {accepted}");
        assert_eq!(resp.status, StatusCode::TOO_MANY_REQUESTS, "{}", String::from_utf8_lossy(&resp.body));
        assert!(matches!(resp.error(), client::ClientError::Status { code, .. } if code == "quota_exceeded"));
        assert!(resp.headers.get("retry-after").is_some(), "Retry-After is set");
        let resp = request(&cp.url, Method::POST, hb, &[], Some(heartbeat_body("web-2"))).await.expect("hb");
        assert_eq!(resp.status, StatusCode::OK, "another host is untouched");
        assert_eq!(count_rows(&cp, "hosts"), 2);

        // Events: batches of 256 for a rollout the CP does not know (answered
        // `retry`, nothing stored) until the host's burst is spent.
        let event = serde_json::json!({"seq": 1, "kind": "DispatchRejected", "target_closure": closure("x"),
            "reason": "x", "rejected_at": T0});
        let batch = serde_json::json!({"hostname": "web-3",
            "events": vec![serde_json::json!({"rollout_id": "stable@nope", "event": event}); 256]})
        .to_string()
        .into_bytes();
        // Every whole batch the burst holds is accepted, then 429; what the
        // bucket refills meanwhile (EVENT_QUOTA_PER_SEC) is the only slack.
        let n_full = EVENT_QUOTA_BURST as usize / 256;
        let start = Instant::now();
        let mut accepted = 0usize;
        let resp = loop {
            let resp =
                request(&cp.url, Method::POST, "/v1/agent/events", &[], Some(batch.clone())).await.expect("events");
            if resp.status != StatusCode::OK {
                break resp;
            }
            accepted += 256;
            let refilled = (start.elapsed().as_secs() as usize + 1) * EVENT_QUOTA_PER_SEC as usize;
            assert!(
                accepted <= EVENT_QUOTA_BURST as usize + refilled,
                "{accepted} events accepted in {:?}",
                start.elapsed()
            );
        };
        assert!(accepted >= n_full * 256, "every whole batch of the burst is accepted: {accepted}");
        assert_eq!(resp.status, StatusCode::TOO_MANY_REQUESTS, "{}", String::from_utf8_lossy(&resp.body));
        assert!(matches!(resp.error(), client::ClientError::Status { code, .. } if code == "quota_exceeded"));
    });
    assert_eq!(count_rows(&cp, "event_log"), 0);
}

/// Every row of every table, as text: equal before and after means the
/// database is unchanged.
fn db_dump(cp: &Cp) -> String {
    let conn = rusqlite::Connection::open(&cp.db).expect("open db");
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .expect("tables")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("names");
    let mut out = String::new();
    for table in tables {
        let mut stmt = conn.prepare(&format!("SELECT * FROM {table} ORDER BY 1")).expect("select");
        let n = stmt.column_count();
        let rows = stmt
            .query_map([], |r| {
                Ok((0..n)
                    .map(|i| format!("{:?}", r.get_ref(i).map(|v| format!("{v:?}"))))
                    .collect::<Vec<_>>()
                    .join("|"))
            })
            .expect("rows");
        for row in rows {
            out.push_str(&format!("{table}: {}\n", row.expect("row")));
        }
    }
    out
}

/// Hostile JSON on every endpoint that reads a body (events, heartbeat,
/// publish: the envelope and a signed manifest): nesting far beyond any
/// real document, numbers beyond u64 and beyond f64, invalid UTF-8, and
/// duplicate keys are answered 4xx with the JSON error shape, and the
/// database is byte-for-byte unchanged.
#[test]
fn hostile_json_is_refused_everywhere_and_the_database_is_unchanged() {
    let (_dir, release, cp) = setup("hostile-json");
    rt().block_on(async {
        cp.publish(&release.sign(&two_waves("stable@r1", T0, 0))).await;
        let before = db_dump(&cp);
        let deep = |open: &str, close: &str| format!("{}{}", open.repeat(100_000), close.repeat(100_000));
        let good_event = serde_json::json!({"seq": 1, "kind": "DispatchRejected", "target_closure": closure("web-1-new"),
            "reason": "x", "rejected_at": T0});
        let batch_with = |event: &str| {
            format!(r#"{{"hostname":"web-1","events":[{{"rollout_id":"stable@r1","event":{event}}}]}}"#)
        };
        let mut invalid_utf8 = batch_with(&good_event.to_string()).into_bytes();
        let at = invalid_utf8.windows(3).position(|w| w == b"\"x\"").expect("reason") + 1;
        invalid_utf8.splice(at..at + 1, [0xff, 0xfe]);
        let events_cases: Vec<(&str, Vec<u8>)> = vec![
            ("deep arrays", deep("[", "]").into_bytes()),
            ("deep objects", deep(r#"{"a":"#, "}").into_bytes()),
            ("deep inside an event", batch_with(&deep("[", "]")).into_bytes()),
            ("seq beyond u64", batch_with(&good_event.to_string().replace(r#""seq":1"#, r#""seq":18446744073709551616"#)).into_bytes()),
            ("seq as a huge float", batch_with(&good_event.to_string().replace(r#""seq":1"#, r#""seq":1e400"#)).into_bytes()),
            ("seq negative", batch_with(&good_event.to_string().replace(r#""seq":1"#, r#""seq":-1"#)).into_bytes()),
            ("invalid UTF-8", invalid_utf8),
            ("duplicate hostname", br#"{"hostname":"web-1","hostname":"web-2","events":[]}"#.to_vec()),
            ("duplicate seq", batch_with(&good_event.to_string().replace(r#""seq":1"#, r#""seq":1,"seq":2"#)).into_bytes()),
            ("trailing garbage", format!("{} x", batch_with(&good_event.to_string())).into_bytes()),
        ];
        for (name, body) in events_cases {
            assert_refused(&cp, "/v1/agent/events", name, body).await;
        }
        let hb = String::from_utf8(heartbeat_body("web-1")).expect("utf8");
        let hb_cases: Vec<(&str, Vec<u8>)> = vec![
            ("deep", deep("[", "]").into_bytes()),
            ("uptime beyond u64", hb.replace(r#""uptime_secs":1"#, r#""uptime_secs":99999999999999999999999"#).into_bytes()),
            ("duplicate hostname", hb.replacen(r#""hostname":"web-1""#, r#""hostname":"web-1","hostname":"web-9""#, 1).into_bytes()),
            ("invalid UTF-8", hb.replace("\"t\"", "\"\u{fffd}\"").replace('\u{fffd}', "\u{1}").into_bytes().into_iter().map(|b| if b == 1 { 0xff } else { b }).collect()),
            ("huge last_seq", hb.replacen('{', r#"{"last_seq":{"stable@r1":1e999},"#, 1).into_bytes()),
        ];
        for (name, body) in hb_cases {
            assert_refused(&cp, "/v1/agent/heartbeat", name, body).await;
        }
        let manifest = two_waves("stable@r2", T1, 0);
        let publish_cases: Vec<(&str, Vec<u8>)> = vec![
            ("deep envelope", deep("[", "]").into_bytes()),
            ("envelope with duplicate payload", br#"{"payload":"e30=","payload":"e30=","payloadType":"x","signatures":[]}"#.to_vec()),
            ("envelope invalid UTF-8", b"{\"payload\":\"\xff\"}".to_vec()),
            ("signed deep manifest", release.sign(&deep("[", "]"))),
            ("signed manifest with duplicate keys", release.sign(&manifest.replacen('{', r#"{"schema":1,"#, 1))),
            ("signed manifest with a huge number", release.sign(&manifest.replace(r#""max_failed_hosts":0"#, r#""max_failed_hosts":1e400"#))),
        ];
        for (name, body) in publish_cases {
            assert_refused(&cp, "/v1/rollouts", name, body).await;
        }
        assert_eq!(db_dump(&cp), before, "the database changed");
    });
}

async fn assert_refused(cp: &Cp, path: &str, name: &str, body: Vec<u8>) {
    let resp = request(&cp.url, Method::POST, path, &[], Some(body)).await.expect(name);
    let text = String::from_utf8_lossy(&resp.body).into_owned();
    assert!(resp.status.is_client_error(), "{name}: {} {text}", resp.status);
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{name}: not JSON: {text}"));
    assert!(json["error"].is_string() && !json["message"].as_str().unwrap_or("").is_empty(), "{name}: {text}");
}

pub(super) fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in {status}"))
}

fn big_manifest(id: &str, n: usize) -> String {
    let names: Vec<String> = (0..n).map(|i| format!("h{i:06}")).collect();
    let hosts: Vec<(&str, usize, &str)> = names.iter().map(|h| (h.as_str(), 0, "big")).collect();
    manifest(id, T0, 0, &[("all", 0, 10)], &hosts)
}

/// Views come in pages: `GET /v1/rollouts/{id}` and `GET /v1/hosts` of a
/// 2,500-host rollout give 1,000 hosts per page with the next page's
/// `after`, and `cp status --rollout` / `--hosts` follow the pages to all
/// 2,500 hosts.
#[test]
fn rollout_and_host_views_are_paged_and_cp_status_follows_the_pages() {
    let (_dir, release, cp) = setup("paged-views");
    let n = 2500;
    rt().block_on(async {
        let resp = cp.publish(&release.sign(&big_manifest("big@r1", n))).await;
        assert_eq!(resp.status, StatusCode::CREATED);
        let first = cp.get_json("/v1/rollouts/big@r1").await;
        let on_page: usize =
            first["waves"].as_array().expect("waves").iter().map(|w| w["hosts"].as_array().expect("hosts").len()).sum();
        assert_eq!(on_page, nixfleet::cp::views::MAX_VIEW_PAGE_HOSTS);
        assert_eq!(first["n_hosts"], n);
        assert_eq!(first["hosts_by_state"]["Pending"], n, "counts cover every host, not the page");
        assert_eq!(first["next_after"], "h000999");
        let last = cp.get_json("/v1/rollouts/big@r1?after=h001999").await;
        assert!(last.get("next_after").is_none(), "{}", last["next_after"]);
        let hosts = cp.get("/v1/hosts?limit=10").await;
        assert_eq!(serde_json::from_slice::<Vec<serde_json::Value>>(&hosts.body).expect("array").len(), 10);
        assert_eq!(hosts.headers.get("x-nixfleet-next-after").and_then(|v| v.to_str().ok()), Some("h000009"));
    });
    let url = format!("http://{}", cp.url.authority());
    let run = |args: &[&str]| std::process::Command::new(crate::harness::bin()).args(args).output().expect("run");
    let out = run(&["cp", "status", "--cp", &url, "--rollout", "big@r1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let detail: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let all: Vec<&str> = detail["waves"][0]["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| h["hostname"].as_str().expect("name"))
        .collect();
    assert_eq!(all.len(), n);
    assert!(all.windows(2).all(|w| w[0] < w[1]), "hostname order across pages");
    let out = run(&["cp", "status", "--cp", &url, "--hosts", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).expect("JSON").len(), n);
}

/// Peak RSS (VmHWM, reset through /proc/PID/clear_refs) above the current
/// RSS while `paths` are asked at once, in MiB.
async fn view_peak_mib(cp: &Cp, paths: &[String]) -> u64 {
    std::fs::write(format!("/proc/{}/clear_refs", cp.pid()), "5").expect("reset the peak RSS");
    let base = vm_kib(cp.pid(), "VmRSS:");
    let mut tasks = Vec::new();
    for path in paths {
        let (url, path) = (cp.url.clone(), path.clone());
        tasks.push(tokio::spawn(async move { request(&url, Method::GET, &path, &[], None).await }));
    }
    for task in tasks {
        let resp = task.await.expect("join").expect("view");
        assert_eq!(resp.status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp.body));
    }
    vm_kib(cp.pid(), "VmHWM:").saturating_sub(base) / 1024
}

/// The memory of views of a 100,000-host rollout: one page of the rollout
/// view costs the parsed manifest and one page (tens of MB; the whole view
/// used to cost ~250 MB per request), and 8 views asked at once cost at
/// most `MAX_CONCURRENT_VIEWS` of them, because only that many are built at
/// a time (40 parallel requests used to peak at 11 GB).
#[test]
fn views_of_a_100k_host_rollout_cost_tens_of_mb() {
    use nixfleet::cp::routes::MAX_CONCURRENT_VIEWS;
    let dir = TempDir::new("view-memory");
    let release = Release::new(dir.path(), "release");
    // glibc returns freed memory to the system at once (large blocks are
    // mapped, the heap top is trimmed), so RSS follows live memory and a
    // view's peak is not hidden in memory freed by the one before.
    let malloc = [("MALLOC_MMAP_THRESHOLD_", "65536"), ("MALLOC_TRIM_THRESHOLD_", "0"), ("MALLOC_ARENA_MAX", "2")];
    let cp = Cp::start_with_env(dir.path(), &release.pub_path, &[], &malloc);
    let envelope = release.sign(&big_manifest("huge@r1", 100_000));
    rt().block_on(async {
        let resp = cp.publish(&envelope).await;
        assert_eq!(resp.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&resp.body));
        // One view first, so lazily built caches are not counted as views.
        assert_eq!(cp.get("/v1/rollouts/huge@r1").await.status, StatusCode::OK);
        let one = view_peak_mib(&cp, &["/v1/rollouts/huge@r1?after=h050000".to_owned()]).await;
        let hosts = view_peak_mib(&cp, &["/v1/hosts?after=h050000".to_owned()]).await;
        let started = Instant::now();
        let mut paths: Vec<String> = (0..5).map(|i| format!("/v1/rollouts/huge@r1?after=h{:06}", i * 10_000)).collect();
        paths.extend(["/v1/hosts".to_owned(), "/v1/hosts?after=h090000".to_owned(), "/v1/status".to_owned()]);
        let eight = view_peak_mib(&cp, &paths).await;
        println!(
            "views of a 100,000-host rollout (debug build): one rollout page +{one} MiB, one hosts page +{hosts} MiB, 8 at once +{eight} MiB peak RSS, answered in {:?}",
            started.elapsed()
        );
        assert!(one < 80, "one rollout page cost {one} MiB");
        assert!(hosts < 80, "one hosts page cost {hosts} MiB");
        assert!(eight < 80 * MAX_CONCURRENT_VIEWS as u64, "8 views cost {eight} MiB");
    });
}

/// Publish takes at most `MAX_ENVELOPE_BYTES`: a declared length one byte
/// more is answered 413 `body_too_large` before the body is read, and
/// nothing is stored. (Raw TCP: a client still writing 16 MiB when the CP
/// answers and closes may see its write fail before it reads the answer,
/// which made a test through `client::request` racy.)
#[test]
fn a_publish_body_beyond_the_envelope_bound_is_refused() {
    use nixfleet::cp::routes::MAX_ENVELOPE_BYTES;
    let (_dir, _release, cp) = setup("publish-bound");
    let addr: SocketAddr = cp.url.authority().parse().expect("address");
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(std::time::Duration::from_secs(20))).expect("timeout");
    let head = format!(
        "POST /v1/rollouts HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nX-Nixfleet-Protocol: 1\r\nContent-Length: {}\r\n\r\n",
        MAX_ENVELOPE_BYTES + 1
    );
    stream.write_all(head.as_bytes()).expect("write head");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"body_too_large\""), "{answer}");
    // Raw TCP bypasses `harness::request`: the answer is checked against the document here.
    crate::openapi::check_response("POST", "/v1/rollouts", &raw_response(&answer));
    assert_eq!(count_rows(&cp, "rollouts"), 0);
}
