//! Mutual TLS through the real binaries over loopback, with real
//! certificates from the `pki` code: who may do what (a host only for its
//! own name, operators on the operator endpoints), what a handshake refuses
//! (no certificate, another CA, expired, not yet valid), plaintext on the TLS
//! port, and SIGHUP rotation while an agent keeps working.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use nixfleet::client::{self, ClientError, CpUrl, HttpResponse};
use nixfleet::tls::{CertKeyFiles, ClientTlsFiles, ReloadableClientConfig, Role};
use nixfleet::tools::pki;

use crate::harness::{bin, closure, manifest, request, wait_for, Agent, Cp, Pki, Release, TempDir};

const T0: &str = "2026-11-25T12:00:00Z";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// One wave of web-1 and web-2.
fn one_wave(id: &str) -> String {
    manifest(id, T0, 0, &[("all", 0, 2)], &[("web-1", 0, "web-1-new"), ("web-2", 0, "web-2-new")])
}

fn setup(label: &str) -> (TempDir, Release, Cp) {
    let dir = TempDir::new(label);
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start_tls(dir.path(), &release.pub_path, &[]);
    (dir, release, cp)
}

fn pki(cp: &Cp) -> &Pki {
    cp.pki.as_ref().expect("a TLS control plane")
}

fn error_code(resp: &HttpResponse) -> String {
    let body: serde_json::Value = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&resp.body)));
    body["error"].as_str().unwrap_or_default().to_owned()
}

fn message(resp: &HttpResponse) -> String {
    resp.error().to_string()
}

fn nixfleet(args: &[String]) -> Output {
    Command::new(bin()).args(args).env("RUST_LOG", "warn").output().expect("run nixfleet")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `nixfleet cp ARGS --cp https://… --ca-cert … --client-cert … --client-key …` as `name`.
fn cp_cmd(cp: &Cp, name: &str, role: Role, args: &[&str]) -> Output {
    let mut all: Vec<String> = vec!["cp".into(), args[0].into()];
    all.extend(cp.client_args(name, role));
    all.extend(args[1..].iter().map(|a| (*a).to_owned()));
    nixfleet(&all)
}

#[test]
fn over_mutual_tls_an_operator_publishes_and_reads_and_an_agent_acts_for_its_own_host() {
    // Proves the thin path end to end: `cp serve` with --tls-cert/--tls-key/--client-ca, the real `cp publish`
    // and `cp status` binaries with an operator certificate, and an agent with its host certificate taking its
    // dispatch and reporting events that the CP stores.
    let (dir, release, cp) = setup("tls-e2e");
    let envelope = dir.path().join("signed.json");
    fs_err::write(&envelope, release.sign(&one_wave("stable@r1"))).expect("write envelope");
    let out = cp_cmd(&cp, "alice", Role::Operator, &["publish", envelope.to_str().expect("utf8")]);
    assert!(out.status.success() && text(&out).contains("published stable@r1"), "{}", text(&out));
    rt().block_on(async {
        let mut web1 = Agent::new("web-1", &cp.host_url("web-1"));
        let d = web1.poll(0).await.expect("web-1's dispatch");
        web1.activate(&d).await;
        web1.heartbeat().await;
    });
    let out = cp_cmd(&cp, "alice", Role::Operator, &["status", "--rollout", "stable@r1"]);
    assert!(out.status.success(), "{}", text(&out));
    let status = text(&out);
    assert!(status.lines().any(|l| l.contains("web-1") && l.contains("Soaking")), "{status}");
    assert!(cp.log_text().contains("mutual TLS"), "the CP says it speaks TLS: {}", cp.log_text());
}

#[test]
fn a_host_certificate_acting_for_another_host_is_refused_and_nothing_is_stored() {
    // Proves identity on every agent endpoint: web-1's certificate posting events, a heartbeat or a long-poll
    // for web-2 gets 403 naming both hosts, and the CP stores nothing for web-2 (events, heartbeat, dispatch).
    let (_dir, release, cp) = setup("tls-impostor");
    rt().block_on(async {
        assert_eq!(cp.publish(&release.sign(&one_wave("stable@r1"))).await.status, StatusCode::CREATED);
        let web1_url = cp.host_url("web-1");
        // web-2's events, as web-1's certificate sends them.
        let mut impostor = Agent::new("web-2", &web1_url);
        let d = Agent::new("web-2", &cp.host_url("web-2")).poll(0).await.expect("web-2's own dispatch");
        let ack = impostor.ack_body(&d);
        let event = impostor.emit("stable@r1", ack);
        let resp = impostor.post_raw(&[("stable@r1", &event)]).await;
        assert_eq!((resp.status, error_code(&resp)), (StatusCode::FORBIDDEN, "identity_mismatch".to_owned()));
        let why = message(&resp);
        assert!(why.contains("authenticated as web-1") && why.contains("for host web-2"), "{why}");

        let hb = serde_json::json!({"hostname": "web-2", "current_closure": closure("x"), "uptime_secs": 1, "agent_version": "t"});
        let resp = request(&web1_url, Method::POST, "/v1/agent/heartbeat", &[], Some(hb.to_string().into()))
            .await
            .expect("heartbeat");
        assert_eq!((resp.status, error_code(&resp)), (StatusCode::FORBIDDEN, "identity_mismatch".to_owned()));
        assert!(message(&resp).contains("web-1") && message(&resp).contains("web-2"), "{}", message(&resp));

        let started = Instant::now();
        let resp = request(&web1_url, Method::GET, "/v1/agent/dispatch?hostname=web-2&wait=30", &[], None)
            .await
            .expect("long-poll");
        assert_eq!((resp.status, error_code(&resp)), (StatusCode::FORBIDDEN, "identity_mismatch".to_owned()));
        assert!(started.elapsed() < Duration::from_secs(10), "refused at once, not parked");

        // Nothing stored: no event and no heartbeat for web-2; its dispatch still stands for its own certificate.
        let log = cp.get_json("/v1/rollouts/stable@r1/events").await;
        assert!(log["events"].as_array().expect("events").is_empty(), "{log:#}");
        let hosts = cp.get_json("/v1/hosts").await;
        let web2 = hosts.as_array().expect("hosts").iter().find(|h| h["hostname"] == "web-2").cloned();
        assert!(web2.is_none_or(|h| h["last_heartbeat_at"].is_null()), "{hosts:#}");
        assert_eq!(cp.host_state("stable@r1", "web-2").await, "Pending");
        let mut web2 = Agent::new("web-2", &cp.host_url("web-2"));
        let again = web2.poll(0).await.expect("web-2's dispatch still stands");
        web2.activate(&again).await;
        assert_eq!(cp.host_state("stable@r1", "web-2").await, "Soaking");
    });
}

#[test]
fn a_host_certificate_is_refused_on_every_operator_endpoint_and_an_operator_on_agent_endpoints() {
    // Proves the role split: a host certificate gets 403 on publish, the views (JSON and web pages), a rollout's
    // events, metrics and every operator action (resume, cancel, unquarantine, the dry run, the action log);
    // an operator certificate gets 403 on /v1/agent/*; /healthz is open to both; a host may fetch a manifest.
    let (_dir, release, cp) = setup("tls-roles");
    rt().block_on(async {
        assert_eq!(cp.publish(&release.sign(&one_wave("stable@r1"))).await.status, StatusCode::CREATED);
        let host = cp.host_url("web-1");
        let envelope = release.sign(&one_wave("stable@r2"));
        let action = || Some(br#"{"reason": "a host tries"}"#.to_vec());
        let unquarantine = serde_json::json!({"closure": closure("web-1-new"), "reason": "a host tries"});
        let refused = [
            (Method::POST, "/v1/rollouts", Some(envelope.clone())),
            (Method::GET, "/v1/status", None),
            (Method::GET, "/v1/rollouts", None),
            (Method::GET, "/v1/hosts", None),
            (Method::GET, "/v1/rollouts/stable@r1", None),
            (Method::GET, "/v1/rollouts/stable@r1/events", None),
            (Method::GET, "/metrics", None),
            (Method::GET, "/", None),
            (Method::GET, "/hosts/web-1", None),
            (Method::GET, "/rollouts/stable@r1", None),
            (Method::POST, "/v1/rollouts/stable@r1/resume", action()),
            (Method::POST, "/v1/rollouts/stable@r1/cancel", action()),
            (Method::POST, "/v1/channels/stable/unquarantine", Some(unquarantine.to_string().into_bytes())),
            (Method::POST, "/v1/plan", Some(envelope)),
            (Method::GET, "/v1/actions", None),
        ];
        for (method, path, body) in refused {
            let resp = request(&host, method, path, &[], body).await.expect(path);
            assert_eq!((resp.status, error_code(&resp)), (StatusCode::FORBIDDEN, "role_required".to_owned()), "{path}");
            assert!(message(&resp).contains("operator certificate") && message(&resp).contains("CN web-1"), "{path}");
        }
        // A path no route has is refused the same way (before routing, so the document has no operation for it).
        let resp = client::request(&host, Method::GET, "/v1/no-such-route", &[], None).await.expect("unrouted");
        assert_eq!((resp.status, error_code(&resp)), (StatusCode::FORBIDDEN, "role_required".to_owned()));
        let body: serde_json::Value = serde_json::from_slice(&resp.body).expect("a JSON error");
        crate::openapi::check_error_shape("GET /v1/no-such-route answered 403", &body);
        // Nothing changed: r2 was neither published nor planned into anything, r1 is still active, no action logged.
        assert_eq!(cp.get_json("/v1/rollouts").await.as_array().expect("rollouts").len(), 1, "r2 was not stored");
        let detail = cp.get_json("/v1/rollouts/stable@r1").await;
        assert!(detail["state"] != "cancelled" && detail["operator_actions"] == serde_json::json!([]), "{detail:#}");
        assert!(cp.get_json("/v1/actions").await.as_array().expect("actions").is_empty());
        let resp = request(&host, Method::GET, "/v1/rollouts/stable@r1/manifest", &[], None).await.expect("m");
        assert_eq!(resp.status, StatusCode::OK);
        for url in [&host, &cp.url] {
            assert_eq!(request(url, Method::GET, "/healthz", &[], None).await.expect("healthz").status, 200);
        }
        let resp = request(&cp.url, Method::GET, "/v1/agent/dispatch?hostname=web-1&wait=0", &[], None)
            .await
            .expect("dispatch");
        assert_eq!((resp.status, error_code(&resp)), (StatusCode::FORBIDDEN, "role_required".to_owned()));
        assert!(message(&resp).contains("host certificate"), "{}", message(&resp));
    });
    // The operator binary with a host certificate says why.
    let out = cp_cmd(&cp, "web-1", Role::Host, &["status"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("403") && text(&out).contains("operator certificate"), "{}", text(&out));
}

#[test]
fn an_operator_certificate_names_who_resumed_a_halted_rollout() {
    // Proves who acts under mutual TLS: `cp resume --reason …` with the operator certificate of alice records
    // operator "alice" in the action log (`/v1/actions`) and `cp status` says "resume by alice"; the same
    // command with a host certificate is refused and logs nothing.
    let (_dir, release, cp) = setup("tls-operator-name");
    rt().block_on(async {
        assert_eq!(cp.publish(&release.sign(&one_wave("stable@r1"))).await.status, StatusCode::CREATED);
        let mut web1 = Agent::new("web-1", &cp.host_url("web-1"));
        let d = web1.poll(0).await.expect("web-1's dispatch");
        web1.fail_and_revert(&d).await;
        assert_eq!(cp.get_json("/v1/rollouts/stable@r1").await["state"], "halted");
    });
    let out = cp_cmd(&cp, "web-1", Role::Host, &["resume", "stable@r1", "--reason", "a host tries"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("403") && text(&out).contains("operator certificate"), "{}", text(&out));
    let out = cp_cmd(&cp, "alice", Role::Operator, &["resume", "stable@r1", "--reason", "INC-7: probe target fixed"]);
    assert!(out.status.success() && text(&out).contains("resumed stable@r1"), "{}", text(&out));
    rt().block_on(async {
        let actions = cp.get_json("/v1/actions").await;
        let actions = actions.as_array().expect("actions");
        assert_eq!(actions.len(), 1, "{actions:#?}");
        assert_eq!(actions[0]["action"], "resume");
        assert_eq!(actions[0]["operator"], "alice");
        assert_eq!(actions[0]["reason"], "INC-7: probe target fixed");
        assert_eq!(cp.get_json("/v1/rollouts/stable@r1").await["operator_actions"][0]["operator"], "alice");
    });
    let out = cp_cmd(&cp, "alice", Role::Operator, &["status", "--rollout", "stable@r1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("resume by alice: INC-7: probe target fixed"), "{}", text(&out));
}

/// A client of `cp` presenting `identity` (or no certificate).
fn url_with(cp: &Cp, identity: Option<CertKeyFiles>) -> CpUrl {
    let files = ClientTlsFiles { ca: pki(cp).ca(), identity };
    let tls = Arc::new(ReloadableClientConfig::load(files).expect("client config"));
    CpUrl::parse(&format!("https://{}", cp.url.authority())).expect("url").with_tls(tls)
}

/// The CP's log, once it says `what` (its handshake errors are logged at debug).
fn cp_log_saying(cp: &Cp, what: &str) -> String {
    wait_for(&format!("the CP log to say {what:?}"), || Some(cp.log_text()).filter(|l| l.contains(what)))
}

#[test]
fn clients_without_a_valid_certificate_fail_the_handshake_and_reach_nothing() {
    // Proves the handshake refuses, each for its own reason in the CP's log: no client certificate, a certificate
    // of another CA, an expired one and a not yet valid one; none of them reaches the API (nothing published).
    let (dir, release, cp) = setup("tls-refused");
    let other = Pki::new(&dir.path().join("other-pki"));
    let now = nixfleet::clock::ClockHandle::system().now();
    let p = pki(&cp);
    let expired = p.issue_at("old-op", Role::Operator, now - time::Duration::days(40), 30);
    let future = p.issue_at("new-op", Role::Operator, now + time::Duration::days(2), 30);
    let cases = [
        ("no client certificate", None, "peer sent no certificates"),
        ("another CA", Some(other.files("alice", Role::Operator)), "UnknownIssuer"),
        ("expired", Some(expired), "certificate expired"),
        ("not yet valid", Some(future), "certificate not valid yet"),
    ];
    rt().block_on(async {
        for (what, identity, logged) in cases {
            let url = url_with(&cp, identity);
            let envelope = release.sign(&one_wave("stable@r1"));
            // Refused in the handshake: no HTTP answer, nothing for the document to check.
            let err = client::request(&url, Method::POST, "/v1/rollouts", &[], Some(envelope)).await.expect_err(what);
            assert!(
                matches!(err, ClientError::CertificateRefused { .. } | ClientError::Handshake { .. }),
                "{what}: refused at the TLS layer, not an answer: {err}"
            );
            cp_log_saying(&cp, logged);
        }
        assert!(cp.get_json("/v1/rollouts").await.as_array().expect("rollouts").is_empty(), "nothing published");
        // Without a certificate no operator endpoint answers anything: the web pages, the views, every action.
        let anonymous = url_with(&cp, None);
        let action = br#"{"reason": "anonymous"}"#.to_vec();
        for (method, path, body) in [
            (Method::GET, "/", None),
            (Method::GET, "/hosts/web-1", None),
            (Method::GET, "/rollouts/stable@r1", None),
            (Method::GET, "/v1/status", None),
            (Method::GET, "/v1/actions", None),
            (Method::POST, "/v1/rollouts/stable@r1/resume", Some(action.clone())),
            (Method::POST, "/v1/rollouts/stable@r1/cancel", Some(action.clone())),
            (Method::POST, "/v1/channels/stable/unquarantine", Some(action.clone())),
            (Method::POST, "/v1/plan", Some(release.sign(&one_wave("stable@r1")))),
        ] {
            // Refused in the handshake: no HTTP answer, nothing for the document to check.
            let err = client::request(&anonymous, method, path, &[], body).await.expect_err(path);
            assert!(
                matches!(err, ClientError::CertificateRefused { .. } | ClientError::Handshake { .. }),
                "{path}: refused at the TLS layer, not an answer: {err}"
            );
        }
        assert!(cp.get_json("/v1/actions").await.as_array().expect("actions").is_empty(), "no action logged");
    });
    // The real binary with an expired certificate: exit 1, one line.
    let expired = p.paths("old-op");
    let mut args: Vec<String> =
        vec!["cp".into(), "status".into(), "--cp".into(), format!("https://{}", cp.url.authority())];
    for (flag, path) in [("--ca-cert", p.ca()), ("--client-cert", expired.cert), ("--client-key", expired.key)] {
        args.extend([flag.to_owned(), path.display().to_string()]);
    }
    let out = nixfleet(&args);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("refused this client's TLS certificate (CertificateExpired)"), "{said}");
}

#[test]
fn plaintext_http_to_the_tls_port_gets_only_a_tls_required_error() {
    // Proves nothing of the API is served without TLS: plain HTTP requests (a view, an event batch) get a JSON
    // 400 `tls_required` and the event is not stored; a silent connection is closed after the handshake limit.
    let (_dir, release, cp) = setup("tls-plaintext");
    rt().block_on(async {
        assert_eq!(cp.publish(&release.sign(&one_wave("stable@r1"))).await.status, StatusCode::CREATED);
        let plain = CpUrl::parse(&format!("http://{}", cp.url.authority())).expect("url");
        let resp = request(&plain, Method::GET, "/v1/status", &[], None).await.expect("plain GET");
        assert_eq!((resp.status, error_code(&resp)), (StatusCode::BAD_REQUEST, "tls_required".to_owned()));
        assert!(message(&resp).contains("https://"), "{}", message(&resp));
        let mut web1 = Agent::new("web-1", &plain);
        let d = Agent::new("web-1", &cp.host_url("web-1")).poll(0).await.expect("dispatch");
        let ack = web1.ack_body(&d);
        let event = web1.emit("stable@r1", ack);
        let resp = web1.post_raw(&[("stable@r1", &event)]).await;
        assert_eq!(error_code(&resp), "tls_required");
        let log = cp.get_json("/v1/rollouts/stable@r1/events").await;
        assert!(log["events"].as_array().expect("events").is_empty(), "{log:#}");

        // A client that connects and sends nothing is cut off after the handshake limit.
        use tokio::io::AsyncReadExt as _;
        let mut silent = tokio::net::TcpStream::connect(cp.url.authority()).await.expect("connect");
        let started = Instant::now();
        let limit = nixfleet::cp::transport::TLS_HANDSHAKE_TIMEOUT;
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(limit + Duration::from_secs(10), silent.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed, not answered: {read:?}");
        assert!(
            started.elapsed() >= limit - Duration::from_millis(500),
            "not before the limit: {:?}",
            started.elapsed()
        );
    });
}

/// A host's certificate files (the ones its agent was started with) replaced by `files`' contents.
fn install(from: &CertKeyFiles, to: &CertKeyFiles) {
    fs_err::write(&to.key, fs_err::read(&from.key).expect("read key")).expect("write key");
    fs_err::write(&to.cert, fs_err::read(&from.cert).expect("read cert")).expect("write cert");
}

fn sighup(pid: u32) {
    let ok = Command::new("kill").args(["-HUP", &pid.to_string()]).status().expect("kill -HUP");
    assert!(ok.success());
}

/// The last heartbeat time the CP has for `host`, as an operator reads it.
async fn last_heartbeat(url: &CpUrl, host: &str) -> Option<String> {
    let resp = request(url, Method::GET, "/v1/hosts", &[], None).await.ok()?;
    let hosts: serde_json::Value = resp.json().ok()?;
    hosts.as_array()?.iter().find(|h| h["hostname"] == host)?["last_heartbeat_at"].as_str().map(str::to_owned)
}

/// Waits for a heartbeat of `host` newer than `after` (the agent is still working).
async fn next_heartbeat(url: &CpUrl, host: &str, after: Option<String>, agent_log: impl Fn() -> String) -> String {
    let start = Instant::now();
    loop {
        if let Some(now) = last_heartbeat(url, host).await.filter(|now| Some(now) > after.as_ref()) {
            return now;
        }
        assert!(
            start.elapsed() < crate::harness::DEADLINE,
            "no new heartbeat after {after:?}; agent log:\n{}",
            agent_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The certificate the CP presents to a new connection (DER).
async fn served_certificate(cp: &Cp) -> Vec<u8> {
    let tls = pki(cp).url_with(cp.url.authority(), pki(cp).files("operator", Role::Operator));
    let config = tls.tls().expect("tls").current();
    let tcp = tokio::net::TcpStream::connect(cp.url.authority()).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.expect("handshake");
    stream.get_ref().1.peer_certificates().expect("server certificate")[0].to_vec()
}

fn first_der(path: &Path) -> Vec<u8> {
    nixfleet::tls::load_certs(path).expect("load")[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_to_a_new_client_ca_and_keeps_the_old_files_on_a_bad_one_while_an_agent_keeps_working() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves rotation without dropping the fleet, with the real CP and the real agent: the CP re-reads its
    // certificate and client CA on SIGHUP (a bad file keeps the old config and logs why), the agent re-reads
    // its certificate on SIGHUP and uses it from the next request on; a whole CA rotation (old+new bundle,
    // new host certificate, new CA only) never stops the agent's heartbeats, and a rollout converges after it.
    let dir = TempDir::new("tls-sighup");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start_tls(dir.path(), &release.pub_path, &[]);
    let p = pki(&cp);
    let mut host = crate::agent::Host::new("web-1");
    let (old, new) =
        (host.closure("old", crate::agent::PASSING_PROBE), host.closure("new", crate::agent::PASSING_PROBE));
    host.boot_into(&old);
    // The CP keeps heartbeats only of hosts a published manifest names: a
    // first rollout to the closure web-1 already runs names it.
    let first = crate::agent::manifest("stable@r0", 1, &[("web-1", 0, &old)]);
    let resp = request(&cp.url, Method::POST, "/v1/rollouts", &[], Some(release.sign(&first))).await;
    assert_eq!(resp.expect("publish").status, StatusCode::CREATED);
    host.start_agent(&cp, &release.pub_path);
    let agent_pid = host.agent.as_ref().expect("agent").id();
    let cp_pid = cp.pid();
    let log = || host.log();
    let mut seen = Some(next_heartbeat(&cp.url, "web-1", None, log).await);

    // 1. The CP: a new server certificate (good), then a truncated one (bad).
    let before = served_certificate(&cp).await;
    let cp2 = pki::IssueRequest {
        name: "cp2".into(),
        role: Role::Cp,
        dns: vec![],
        ips: vec!["127.0.0.1".parse().expect("ip")],
        days: 30,
    };
    pki::issue(&p.dir, &cp2, nixfleet::clock::ClockHandle::system().now()).expect("issue");
    install(&p.paths("cp2"), &p.paths("cp"));
    sighup(cp_pid);
    cp_log_saying(&cp, "TLS files re-read");
    let after = served_certificate(&cp).await;
    assert!(after != before && after == first_der(&p.paths("cp").cert), "the CP serves the new certificate");
    seen = Some(next_heartbeat(&cp.url, "web-1", seen, log).await);
    fs_err::write(&p.paths("cp").cert, "-----BEGIN CERTIFICATE-----\ntruncated").expect("corrupt");
    sighup(cp_pid);
    let text = cp_log_saying(&cp, "keeping the certificate and CA already in use");
    assert!(text.contains(&p.paths("cp").cert.display().to_string()), "the log names the bad file:\n{text}");
    assert_eq!(served_certificate(&cp).await, after, "the old certificate still serves");
    seen = Some(next_heartbeat(&cp.url, "web-1", seen, log).await);

    // 2. A CA rotation: the CP trusts old + new, the agent and the operator move to the new CA, the CP drops the old.
    let new_ca = Pki::new(&dir.path().join("new-pki"));
    let bundle = format!(
        "{}{}",
        fs_err::read_to_string(p.ca()).expect("old CA"),
        fs_err::read_to_string(new_ca.ca()).expect("new CA")
    );
    let client_ca = p.ca();
    let old_ca_text = fs_err::read_to_string(&client_ca).expect("old CA");
    // The agent and operators keep trusting the CP's (old-CA) server certificate: a copy of the old CA.
    let server_ca = dir.path().join("server-ca.crt");
    fs_err::write(&server_ca, &old_ca_text).expect("server CA");
    fs_err::write(&client_ca, &bundle).expect("bundle");
    install(&p.paths("cp2"), &p.paths("cp"));
    sighup(cp_pid);
    wait_for("the second good reload", || (cp.log_text().matches("TLS files re-read").count() >= 2).then_some(()));
    let agent_files = p.paths("web-1");
    install(&new_ca.files("web-1", Role::Host), &agent_files);
    sighup(agent_pid);
    wait_for("the agent's reload", || log().contains("TLS files re-read").then_some(()));
    seen = Some(next_heartbeat(&cp.url, "web-1", seen, log).await);
    fs_err::write(&client_ca, fs_err::read_to_string(new_ca.ca()).expect("new CA")).expect("new CA only");
    sighup(cp_pid);
    wait_for("the third good reload", || (cp.log_text().matches("TLS files re-read").count() >= 3).then_some(()));
    let new_operator = {
        let files = ClientTlsFiles { ca: server_ca.clone(), identity: Some(new_ca.files("bob", Role::Operator)) };
        CpUrl::parse(&format!("https://{}", cp.url.authority()))
            .expect("url")
            .with_tls(Arc::new(ReloadableClientConfig::load(files).expect("client")))
    };
    // Refused in the handshake (no HTTP answer to check against the document).
    let old_operator = client::request(&cp.url, Method::GET, "/v1/hosts", &[], None).await;
    assert!(old_operator.is_err(), "the old CA's operator certificate is refused now");
    seen = Some(next_heartbeat(&new_operator, "web-1", seen, log).await);

    // 3. A bad file on the agent: it keeps its certificate, says why, and keeps working.
    fs_err::write(&agent_files.cert, "not a certificate").expect("corrupt");
    sighup(agent_pid);
    wait_for("the agent's refusal", || log().contains("keeping the certificate and CA already in use").then_some(()));
    assert!(log().contains(&agent_files.cert.display().to_string()), "the agent names the bad file");
    seen = Some(next_heartbeat(&new_operator, "web-1", seen, log).await);
    let _ = seen;

    // 4. The agent still does its job: a rollout converges.
    let m = crate::agent::manifest("stable@r1", 1, &[("web-1", 0, &new)]);
    let resp = request(&new_operator, Method::POST, "/v1/rollouts", &[], Some(release.sign(&m))).await;
    assert_eq!(resp.expect("publish").status, StatusCode::CREATED);
    let start = Instant::now();
    loop {
        let resp = request(&new_operator, Method::GET, "/v1/rollouts/stable@r1", &[], None).await.expect("view");
        let detail: serde_json::Value = resp.json().expect("json");
        if detail["state"] == "completed" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "not converged: {detail:#}\nagent log:\n{}", log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(host.running().as_deref(), Some(Path::new(new.as_str())));
    let code = host.stop_agent();
    assert_eq!(code, Some(0), "{}", host.log());
}

#[test]
fn without_tls_the_cp_binds_loopback_only_and_insecure_says_loudly_that_it_is_for_a_lab() {
    // Proves the plaintext rules: a network address without TLS is refused with a message naming the TLS flags;
    // --insecure serves but logs an INSECURE warning; half the TLS flags, or --insecure with TLS, are usage
    // errors; https without the client files and http with them are refused by the clients.
    let dir = TempDir::new("tls-plain-rules");
    let release = Release::new(dir.path(), "release");
    let db = dir.path().join("cp.db").display().to_string();
    let trust = release.pub_path.display().to_string();
    let serve = |extra: &[&str]| {
        let mut args: Vec<String> = ["cp", "serve", "--db", &db, "--trust-key", &trust].map(String::from).to_vec();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };
    let out = nixfleet(&serve(&["--listen", "0.0.0.0:0"]));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("--tls-cert, --tls-key and --client-ca") && text(&out).contains("--insecure"),
        "{}",
        text(&out)
    );
    for usage in
        [&["--tls-cert", "x.crt"][..], &["--tls-cert", "a", "--tls-key", "b", "--client-ca", "c", "--insecure"]]
    {
        let out = nixfleet(&serve(usage));
        assert_eq!(out.status.code(), Some(2), "{usage:?}: {}", text(&out));
    }

    let cp = Cp::start_with(dir.path(), &release.pub_path, &["--insecure"]);
    let log = cp.log_text();
    assert!(log.contains("INSECURE") && log.contains("trusted lab network only"), "{log}");

    let url = format!("https://{}", cp.url.authority());
    let out = nixfleet(&["cp".into(), "status".into(), "--cp".into(), url.clone()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("give --ca-cert"), "{}", text(&out));
    let out = nixfleet(&[
        "agent".into(),
        "--cp".into(),
        url,
        "--trust-key".into(),
        trust.clone(),
        "--hostname".into(),
        "web-1".into(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("give --ca-cert"), "{}", text(&out));
    let http = format!("http://{}", cp.url.authority());
    let out = nixfleet(&["cp".into(), "status".into(), "--cp".into(), http, "--ca-cert".into(), trust]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("plaintext http, but TLS files were given"), "{}", text(&out));
}
