//! Parsing the health-checks file: the full format, defaults, and every
//! rejection naming its field.

use super::*;

const FULL: &str = r#"{"probes":[
  {"name":"app-up","kind":"exec","mode":"enforce","interval_secs":10,"argv":["/bin/true"],"timeout_secs":5},
  {"name":"web","kind":"http","mode":"observe","url":"http://127.0.0.1:8080/healthz","body_contains":"ok","timeout_secs":2},
  {"name":"db-port","kind":"tcp","mode":"enforce","host":"127.0.0.1","port":5432},
  {"name":"nginx","kind":"systemd","mode":"disabled","unit":"nginx.service"}
]}"#;

fn err(json: &str) -> ProbeConfigError {
    HealthChecks::parse(json).expect_err(json)
}

#[test]
fn full_example_parses_with_defaults_applied() {
    // Proves every kind parses and the documented defaults (interval 30 s, status 200, tcp 3 s, exit 0) apply.
    let checks = HealthChecks::parse(FULL).expect("valid");
    assert_eq!(checks.probes.len(), 4);
    assert_eq!(
        checks.probes[0].check,
        Check::Exec { argv: vec!["/bin/true".into()], timeout: Duration::from_secs(5), expect_exit_code: 0 }
    );
    assert_eq!(checks.probes[0].interval, Duration::from_secs(10));
    assert_eq!(checks.probes[1].interval, Duration::from_secs(DEFAULT_INTERVAL_SECS));
    let Check::Http { expect_status, body_contains, ca_file, .. } = &checks.probes[1].check else { panic!("http") };
    assert_eq!((*expect_status, body_contains.as_deref(), ca_file.as_deref()), (200, Some("ok"), None));
    assert_eq!(
        checks.probes[2].check,
        Check::Tcp { host: "127.0.0.1".into(), port: 5432, timeout: Duration::from_secs(DEFAULT_TCP_TIMEOUT_SECS) }
    );
    let topology = checks.topology();
    assert_eq!(
        topology.iter().map(|d| (d.name.as_str(), d.kind, d.mode)).collect::<Vec<_>>(),
        vec![
            ("app-up", ProbeKind::Exec, ProbeMode::Enforce),
            ("web", ProbeKind::Http, ProbeMode::Observe),
            ("db-port", ProbeKind::Tcp, ProbeMode::Enforce),
            ("nginx", ProbeKind::Systemd, ProbeMode::Disabled),
        ]
    );
}

#[test]
fn rejections_name_the_offending_field() {
    // Proves strictness: each malformed probe is an error whose field path or message points at the mistake.
    let probe = |extra: &str| format!(r#"{{"probes":[{{"name":"p","mode":"enforce",{extra}}}]}}"#);
    let cases: Vec<(String, &str, &str)> = vec![
        (
            probe(r#""kind":"exec","argv":["/bin/true"],"timeout_secs":1,"timeout":3"#),
            "probes[0]",
            "unknown field `timeout`",
        ),
        (probe(r#""kind":"exec","argv":[],"timeout_secs":1"#), "probes[0].argv", "must name a program"),
        (probe(r#""kind":"exec","argv":["x"]"#), "probes[0]", "missing field `timeout_secs`"),
        (probe(r#""kind":"exec","argv":["x"],"timeout_secs":0"#), "probes[0].timeout_secs", "outside 1..="),
        (probe(r#""kind":"tcp","host":"h","port":1,"interval_secs":0"#), "probes[0].interval_secs", "outside 1..="),
        (probe(r#""kind":"tcp","host":"","port":1"#), "probes[0].host", "must not be empty"),
        (probe(r#""kind":"tcp","host":"h","port":0"#), "probes[0].port", "1..=65535"),
        (probe(r#""kind":"tcp","host":"h","port":70000"#), "probes[0]", "70000"),
        (probe(r#""kind":"http","url":"ftp://x/","timeout_secs":1"#), "probes[0].url", "http:// or https://"),
        (
            probe(r#""kind":"http","url":"http://x/","timeout_secs":1,"ca_file":"/etc/ca.pem""#),
            "probes[0].ca_file",
            "only https:// URLs use a CA file",
        ),
        (
            probe(r#""kind":"http","url":"https://x/","timeout_secs":1,"ca_file":"ca.pem""#),
            "probes[0].ca_file",
            "ca.pem must be an absolute path",
        ),
        (
            probe(r#""kind":"http","url":"https://x/","timeout_secs":1,"ca_file":"/nonexistent/ca.pem""#),
            "probes[0].ca_file",
            "/nonexistent/ca.pem: No such file or directory",
        ),
        (
            probe(r#""kind":"http","url":"http://x/","timeout_secs":1,"expect_status":42"#),
            "probes[0].expect_status",
            "not an HTTP status",
        ),
        (probe(r#""kind":"systemd","unit":"-x""#), "probes[0].unit", "must not start with '-'"),
        (probe(r#""kind":"dns","unit":"x""#), "probes[0].kind", "unknown variant `dns`"),
        (r#"{"probes":[{"name":"p","kind":"systemd","unit":"x"}]}"#.to_owned(), "probes[0]", "missing field `mode`"),
        (
            r#"{"probes":[{"name":"p","kind":"systemd","mode":"strict","unit":"x"}]}"#.to_owned(),
            "probes[0]",
            "unknown variant `strict`",
        ),
        (
            r#"{"probes":[{"name":"a b","kind":"systemd","mode":"enforce","unit":"x"}]}"#.to_owned(),
            "probes[0].name",
            "must match",
        ),
        (r#"{"probes":[],"extra":1}"#.to_owned(), "extra", "unknown field `extra`"),
        (r#"{"probes":"#.to_owned(), "probes", "EOF"),
    ];
    for (json, field, message) in cases {
        let e = err(&json);
        assert_eq!(e.field, field, "{json}: {e}");
        assert!(e.message.contains(message), "{json}: {e} should contain {message:?}");
    }
}

#[test]
fn duplicate_names_are_rejected() {
    // Proves two probes cannot share a name (the machine keys its probe map by name).
    let json = r#"{"probes":[{"name":"p","kind":"systemd","mode":"enforce","unit":"a"},
                             {"name":"p","kind":"systemd","mode":"observe","unit":"b"}]}"#;
    let e = err(json);
    assert_eq!((e.field.as_str(), e.message.contains("duplicate")), ("probes[1].name", true), "{e}");
}

#[test]
fn too_many_probes_are_rejected() {
    // Proves the MAX_PROBES bound from the wire format is enforced at parse time.
    let one = r#"{"name":"pNN","kind":"systemd","mode":"enforce","unit":"u"}"#;
    let probes: Vec<String> = (0..=MAX_PROBES).map(|i| one.replace("NN", &i.to_string())).collect();
    let e = err(&format!(r#"{{"probes":[{}]}}"#, probes.join(",")));
    assert_eq!(e.field, "probes", "{e}");
}

#[test]
fn missing_file_is_an_empty_topology_and_a_bad_file_names_its_path() {
    // Proves the documented file semantics: absent = no probes; present but invalid = error with the path.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("health-checks.json");
    assert_eq!(HealthChecks::load(&path).expect("missing is fine"), HealthChecks::default());
    fs_err::write(&path, FULL).expect("write");
    assert_eq!(HealthChecks::load(&path).expect("valid").probes.len(), 4);
    fs_err::write(&path, "{}").expect("write");
    let e = HealthChecks::load(&path).expect_err("no probes key");
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    assert!(e.message.contains("missing field `probes`"), "{e}");
}

#[test]
fn failure_reasons_are_capped_at_the_wire_limit() {
    // Proves ProbeRun::fail never produces a reason the wire would reject.
    let run = ProbeRun::fail("é".repeat(MAX_FAILURE_REASON_BYTES));
    let reason = run.reason.expect("reason");
    assert!(reason.len() <= MAX_FAILURE_REASON_BYTES && reason.len() >= MAX_FAILURE_REASON_BYTES - 1);
    assert_eq!(run.status, ProbeStatus::Fail);
}

#[test]
fn the_shipped_example_health_checks_file_parses() {
    // Proves examples/health-checks.json (also shown in the README) is valid.
    let checks = HealthChecks::parse(include_str!("../../../examples/health-checks.json")).expect("valid example");
    assert_eq!(checks.topology().len(), 4);
}

#[test]
fn https_probes_parse_with_the_system_roots_or_a_ca_file_that_is_checked_when_parsed() {
    // Proves https:// is accepted, ca_file is optional, and a ca_file that is not a CA bundle is a config error
    // naming the field and the file (found before any probe runs).
    let dir = tempfile::tempdir().expect("tempdir");
    let https = |ca_file: &str| {
        format!(
            r#"{{"probes":[{{"name":"web","kind":"http","mode":"enforce","url":"https://127.0.0.1:8443/healthz",
                 "timeout_secs":2{ca_file}}}]}}"#
        )
    };
    let checks = HealthChecks::parse(&https("")).expect("system roots");
    let Check::Http { url, ca_file, .. } = &checks.probes[0].check else { panic!("http") };
    assert_eq!((url.scheme, url.port, ca_file.as_deref()), (http::Scheme::Https, 8443, None));

    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_path = dir.path().join("ca.pem");
    fs_err::write(&ca_path, params.self_signed(&key).expect("ca").pem()).expect("write");
    let checks = HealthChecks::parse(&https(&format!(r#","ca_file":"{}""#, ca_path.display()))).expect("with CA");
    let Check::Http { ca_file, .. } = &checks.probes[0].check else { panic!("http") };
    assert_eq!(ca_file.as_deref(), Some(ca_path.as_path()));

    let not_pem = dir.path().join("key.pem");
    fs_err::write(&not_pem, key.serialize_pem()).expect("write");
    let e = err(&https(&format!(r#","ca_file":"{}""#, not_pem.display())));
    assert_eq!(e.field, "probes[0].ca_file", "{e}");
    assert!(e.message.contains(&not_pem.display().to_string()) && e.message.contains("no PEM CERTIFICATE"), "{e}");
}
