//! Refused input: malformed requests stored nowhere, and an authenticated
//! transport's identity.

use super::*;

/// Malformed input is refused with a JSON error naming the problem, and
/// nothing is stored: bad JSON, wrong types, unknown enum values, oversized
/// bodies, missing or wrong protocol header, bad hostnames and rollout ids.
#[test]
fn bad_input_is_refused_with_json_errors_and_not_stored() {
    let (_dir, release, cp) = setup("badinput");
    rt().block_on(async {
        cp.publish(&release.sign(&two_waves("stable@r1", T0, 0))).await;
        let event = serde_json::json!({"seq": 1, "kind": "DispatchRejected", "target_closure": closure("web-1-new"),
            "reason": "x", "rejected_at": "2026-11-25T12:00:00Z"});
        let batch = |host: &str, event: &serde_json::Value| {
            serde_json::json!({"hostname": host, "events": [{"rollout_id": "stable@r1", "event": event}]})
                .to_string()
                .into_bytes()
        };
        let mut unknown_kind = event.clone();
        unknown_kind["kind"] = "Exploded".into();
        let unknown_mode = serde_json::json!({"seq": 1, "kind": "ProbeResult", "probe_name": "p", "mode": "sometimes",
            "status": "pass", "observed_at": "2026-11-25T12:00:00Z"});
        let too_many = serde_json::json!({"hostname": "web-1",
            "events": vec![serde_json::json!({"rollout_id": "stable@r1", "event": event}); 257]})
        .to_string()
        .into_bytes();
        let no_header = [("X-Nixfleet-Protocol", "")];
        let v2 = [("X-Nixfleet-Protocol", "2")];
        let events = "/v1/agent/events";
        let heartbeat = "/v1/agent/heartbeat";
        type Case<'a> = (&'a str, &'a str, Vec<u8>, &'a [(&'a str, &'a str)], StatusCode, &'a str);
        let cases: Vec<Case<'_>> = vec![
            ("malformed JSON", events, b"{\"hostname\": ".to_vec(), &[], StatusCode::BAD_REQUEST, "bad_event_batch"),
            (
                "wrong type",
                events,
                br#"{"hostname": 7, "events": []}"#.to_vec(),
                &[],
                StatusCode::BAD_REQUEST,
                "bad_event_batch",
            ),
            (
                "unknown event kind",
                events,
                batch("web-1", &unknown_kind),
                &[],
                StatusCode::BAD_REQUEST,
                "bad_event_batch",
            ),
            (
                "unknown probe mode",
                events,
                batch("web-1", &unknown_mode),
                &[],
                StatusCode::BAD_REQUEST,
                "bad_event_batch",
            ),
            ("bad hostname", events, batch("Web_1", &event), &[], StatusCode::BAD_REQUEST, "bad_event_batch"),
            ("too many events", events, too_many, &[], StatusCode::BAD_REQUEST, "bad_event_batch"),
            (
                "missing protocol header",
                events,
                batch("web-1", &event),
                &no_header,
                StatusCode::BAD_REQUEST,
                "missing_protocol_header",
            ),
            (
                "wrong protocol version",
                events,
                batch("web-1", &event),
                &v2,
                StatusCode::UPGRADE_REQUIRED,
                "unsupported_protocol",
            ),
            (
                "body over 1 MiB",
                events,
                vec![b' '; nixfleet::wire::MAX_BODY_BYTES + 1],
                &[],
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
            ),
            (
                "heartbeat with a bad closure",
                heartbeat,
                br#"{"hostname":"web-1","current_closure":"/tmp/x","uptime_secs":1,"agent_version":"t"}"#.to_vec(),
                &[],
                StatusCode::BAD_REQUEST,
                "bad_heartbeat",
            ),
            (
                "heartbeat without header",
                heartbeat,
                b"{}".to_vec(),
                &no_header,
                StatusCode::BAD_REQUEST,
                "missing_protocol_header",
            ),
        ];
        for (name, path, body, headers, status, code) in cases {
            let resp = crate::harness::request(&cp.url, Method::POST, path, headers, Some(body)).await.expect(name);
            let text = String::from_utf8_lossy(&resp.body).into_owned();
            assert_eq!(resp.status, status, "{name}: {text}");
            let json: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|_| panic!("{name}: not JSON: {text}"));
            assert_eq!(json["error"], code, "{name}");
            assert!(!json["message"].as_str().unwrap_or("").is_empty(), "{name}");
        }
        for (path, code) in [
            ("/v1/agent/dispatch?hostname=Web_1&wait=0", "bad_hostname"),
            ("/v1/agent/dispatch?wait=0", "missing_hostname"),
            ("/v1/agent/dispatch?hostname=web-1&wait=soon", "bad_wait"),
            ("/v1/rollouts/no-at-sign", "bad_rollout_id"),
        ] {
            let resp = cp.get(path).await;
            assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{path}");
            assert_eq!(serde_json::from_slice::<serde_json::Value>(&resp.body).unwrap()["error"], code, "{path}");
        }
        let log = cp.get_json("/v1/rollouts/stable@r1/events").await;
        assert!(log["events"].as_array().unwrap().is_empty(), "nothing stored: {log:#}");
        let hosts = cp.get_json("/v1/hosts").await;
        assert!(hosts.as_array().unwrap().iter().all(|h| h["last_heartbeat_at"].is_null()), "{hosts:#}");
        assert_eq!(cp.host_state("stable@r1", "web-1").await, "Pending");
    });
}

/// Liveness follows the injected clock: silent for more than 3 heartbeat
/// intervals is unreachable. (Who may act for which host is checked over
/// real mutual TLS in `tests/it/tls.rs`.)
#[test]
fn liveness_follows_the_clock() {
    let dir = TempDir::new("liveness");
    let release = Release::new(dir.path(), "release");
    let rt = rt();
    rt.block_on(async {
        let listener = nixfleet::cp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let url = client::CpUrl::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let clock = nixfleet::clock::ClockHandle::manual(datetime!(2026-11-25 12:00 UTC));
        let cfg = nixfleet::cp::ServeConfig {
            db_path: dir.path().join("cp.db"),
            trust_keys: vec![nixfleet::sign::PublicKey::load(&release.pub_path).unwrap()],
            heartbeat_interval_secs: 60,
            grace: Duration::from_secs(5),
            limits: nixfleet::cp::ServeLimits::default(),
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server =
            tokio::spawn(nixfleet::cp::serve(listener, nixfleet::cp::PlainAcceptor, cfg, clock.clone(), async {
                let _ = stop_rx.await;
            }));
        let publish = crate::harness::request(
            &url,
            Method::POST,
            "/v1/rollouts",
            &[],
            Some(release.sign(&two_waves("stable@r1", T0, 0))),
        )
        .await
        .unwrap();
        assert_eq!(publish.status, StatusCode::CREATED);

        let mut me = Agent::new("web-1", &url);
        let d = me.poll(0).await.expect("own dispatch");
        me.activate(&d).await;
        me.heartbeat().await;
        let liveness = |hosts: serde_json::Value| {
            hosts.as_array().unwrap().iter().find(|h| h["hostname"] == "web-1").unwrap()["liveness"].clone()
        };
        let get = |path: &'static str| {
            let url = url.clone();
            async move {
                let r = crate::harness::request(&url, Method::GET, path, &[], None).await.unwrap();
                serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()
            }
        };
        assert_eq!(liveness(get("/v1/hosts").await), "reachable");
        clock.advance(time::Duration::seconds(180));
        assert_eq!(liveness(get("/v1/hosts").await), "reachable", "exactly 3 intervals is not yet silent");
        clock.advance(time::Duration::seconds(1));
        assert_eq!(liveness(get("/v1/hosts").await), "unreachable");
        assert_eq!(get("/v1/status").await["n_unreachable"], 1);

        stop_tx.send(()).unwrap();
        let report = server.await.unwrap().unwrap();
        assert!(report.graceful);
        assert!(report.writer.n_events_applied >= 2);
    });
}
