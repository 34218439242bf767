//! `contrib/nixos/module.nix` with real Nix: it parses (`nix-instantiate
//! --parse`), and it evaluates against `tests/it/nixos/stub.nix`, a small
//! stand-in for the NixOS module system (nixpkgs is not available offline)
//! that declares, type-checks and merges options as NixOS does. The
//! rendered health checks are parsed by the agent's own strict parser, and
//! the rendered command lines by the real CLI parser. Without
//! `nix-instantiate` the tests are skipped with a printed reason. The
//! README's real-fleet steps are checked here too: its flake as above, its
//! steps without NixOS against `contrib/systemd/` (no Nix needed).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Parser;
use nixfleet::agent::probes::{Check, HealthChecks};
use nixfleet::cli::{Cli, Command as CliCommand, CpCommand};
use nixfleet::machine::ProbeMode;

use crate::harness::TempDir;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn have_nix() -> bool {
    let found = Command::new("nix-instantiate").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        println!("skipped: nix-instantiate is not installed (bash .ci/nix-setup.sh installs Nix)");
    }
    found
}

/// Evaluates `select` (a Nix expression over `config`) for a system made of
/// the module and `settings` (a module body); JSON, or the error text.
fn eval(settings: &str, select: &str) -> Result<serde_json::Value, String> {
    let dir = TempDir::new("nixos");
    let expr = format!(
        "let\n  stub = import {stub};\n  config = stub.system [ (import {module}) ({{ ... }}: {settings}) ];\n  fake = stub.fakePackage;\nin {select}\n",
        stub = repo("tests/it/nixos/stub.nix").display(),
        module = repo("contrib/nixos/module.nix").display(),
    );
    let file = dir.path().join("system.nix");
    std::fs::write(&file, expr).expect("write expression");
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .arg(&file)
        .output()
        .expect("run nix-instantiate");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).expect("nix-instantiate --json prints JSON"))
}

/// Splits an `ExecStart=` made by `lib.escapeShellArgs` (bare words and
/// single-quoted ones with `'\''`) back into arguments.
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut in_word, mut quoted, mut escaped) = (Vec::new(), String::new(), false, false, false);
    for c in line.chars() {
        match (quoted, escaped, c) {
            (false, true, c) => {
                word.push(c);
                escaped = false;
            }
            (false, false, '\\') => (escaped, in_word) = (true, true),
            (_, _, '\'') => (quoted, in_word) = (!quoted, true),
            (false, false, ' ') => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (_, _, c) => (word.push(c), in_word = true).0,
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

const AGENT: &str = r#"{
  services.nixfleet.agent = {
    enable = true;
    package = fake "nixfleet";
    cpUrl = "http://cp.example:8443";
    hostname = "web-1";
    trustKeys = [ "/etc/nixfleet/release.pub" "/etc/nixfleet/release-next.pub" ];
    extraFlags = [ "--heartbeat" "30s" ];
    healthChecks = {
      web = { kind = "http"; url = "http://127.0.0.1:8080/healthz"; timeoutSecs = 2; intervalSecs = 15; bodyContains = "it's ok"; };
      db-port = { kind = "tcp"; mode = "observe"; host = "127.0.0.1"; port = 5432; };
      selftest = { kind = "exec"; argv = [ "/run/current-system/sw/bin/app" "--selftest" ]; timeoutSecs = 5; expectExitCode = 3; };
      nginx = { kind = "systemd"; mode = "disabled"; unit = "nginx.service"; };
    };
  };
}"#;

#[test]
fn the_module_parses() {
    if !have_nix() {
        return;
    }
    let out = Command::new("nix-instantiate")
        .arg("--parse")
        .arg(repo("contrib/nixos/module.nix"))
        .output()
        .expect("run nix-instantiate");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The fenced blocks of `lang` in the README's section `heading` (up to the next `## `).
fn readme_blocks(heading: &str, lang: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(repo("README.md")).expect("README.md");
    let section = readme.split(&format!("\n## {heading}\n")).nth(1).unwrap_or_else(|| panic!("a section {heading:?}"));
    let section = section.split("\n## ").next().expect("the section");
    let fence = format!("```{lang}\n");
    section.split(&fence).skip(1).filter_map(|s| s.split("```").next()).map(str::to_owned).collect()
}

/// What the README's flake builds, per `nixosConfigurations` entry: the
/// services' command lines, the rendered health checks, the open ports.
/// `nixpkgs.lib.nixosSystem` is the stub module system; the flake's path
/// modules (the reader's own `./hosts/*.nix`, which this test does not
/// have) are left out, and `nixfleet` is this repository.
fn eval_readme_flake(dir: &Path) -> Result<serde_json::Value, String> {
    let expr = format!(
        r#"let
  stub = import {stub};
  nixpkgs.lib.nixosSystem = {{ modules, ... }}: {{
    config = stub.system (map (m: if builtins.isString m then import m else m) (builtins.filter (m: !builtins.isPath m) modules));
  }};
  outputs = (import ./flake.nix).outputs {{ inherit nixpkgs; nixfleet = "{repo}"; self = outputs; }};
  select = config: {{
    agent = config.systemd.services.nixfleet-agent.serviceConfig.ExecStart or null;
    cp = config.systemd.services.nixfleet-cp.serviceConfig.ExecStart or null;
    checks = config.environment.etc."nixfleet/agent/health-checks.json".text or null;
    ports = config.networking.firewall.allowedTCPPorts;
  }};
in builtins.mapAttrs (name: system: select system.config) outputs.nixosConfigurations
"#,
        stub = repo("tests/it/nixos/stub.nix").display(),
        repo = repo("").display().to_string().trim_end_matches('/'),
    );
    std::fs::write(dir.join("eval.nix"), expr).expect("write expression");
    // --eval is read-only: path literals get their store paths without being added.
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .arg(dir.join("eval.nix"))
        .output()
        .expect("run nix-instantiate");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).expect("nix-instantiate --json prints JSON"))
}

/// Runs the `nixfleet` lines of the README's step 1 in `dir`, as written.
fn run_readme_pki_steps(dir: &Path) {
    let steps = readme_blocks("A real fleet", "sh").into_iter().next().expect("step 1's commands");
    let mut ran = 0;
    for line in steps.lines().map(|l| l.split(" #").next().unwrap_or_default().trim()).filter(|l| !l.is_empty()) {
        let args = shell_words(line);
        assert_eq!(args[0], "nixfleet", "step 1 is nixfleet commands only: {line}");
        let out = Command::new(crate::harness::bin()).args(&args[1..]).current_dir(dir).output().expect("run nixfleet");
        assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
        ran += 1;
    }
    assert!(ran >= 5, "init, the cp, two hosts, an operator and keygen: {ran} commands");
}

#[test]
fn the_readmes_flake_snippet_parses_and_evaluates_against_the_module() {
    if !have_nix() {
        return;
    }
    let blocks = readme_blocks("A real fleet", "nix");
    let flake = blocks.iter().find(|b| b.contains("nixosConfigurations")).expect("the fleet's flake");
    assert!(flake.contains("contrib/nixos/module.nix"), "the flake imports the module");
    let dir = TempDir::new("readme-nix");
    let file = dir.path().join("flake.nix");
    std::fs::write(&file, flake).expect("write snippet");
    let out = Command::new("nix-instantiate").arg("--parse").arg(&file).output().expect("run nix-instantiate");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Step 1 makes the certificates and the release key the flake names.
    run_readme_pki_steps(dir.path());
    let systems =
        eval_readme_flake(dir.path()).unwrap_or_else(|e| panic!("the README's flake does not evaluate:\n{e}"));
    let systems = systems.as_object().expect("nixosConfigurations");
    let names: Vec<&str> = systems.keys().map(String::as_str).collect();
    assert_eq!(names, ["cp", "web-1", "web-2"]);
    let argv = |line: &serde_json::Value| {
        let argv = shell_words(line.as_str().expect("ExecStart"));
        Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("nixfleet refuses {argv:?}: {e}"))
    };
    let store_file = |path: &Option<PathBuf>, name: &str| {
        let path = path.as_ref().unwrap_or_else(|| panic!("{name} is passed")).display().to_string();
        assert!(path.starts_with("/nix/store/") && path.ends_with(&format!("-{name}")), "{name}: {path}");
    };

    let cp = &systems["cp"];
    assert!(cp["agent"].is_null(), "the CP host runs no agent in the README");
    let CliCommand::Cp(CpCommand::Serve(serve)) = argv(&cp["cp"]).command else { panic!("not `cp serve`") };
    assert_eq!(serve.listen.to_string(), "0.0.0.0:8443", "on the network, so TLS is required");
    store_file(&serve.tls_cert, "cp.crt");
    store_file(&serve.client_ca, "ca.crt");
    assert_eq!(serve.tls_key, Some(PathBuf::from("/etc/nixfleet/tls/cp.key")), "the key stays out of the store");
    assert_eq!(serve.trust_key.len(), 1);
    assert_eq!(cp["ports"], serde_json::json!([8443]), "openFirewall");

    let cp_cert = nixfleet::tls::load_certs(&dir.path().join("pki/cp.crt")).expect("step 1's cp certificate");
    let cp_names = nixfleet::tls::PeerIdentity::from_certificate(&cp_cert[0]).expect("identity").dns_names;
    for host in ["web-1", "web-2"] {
        let system = &systems[host];
        assert!(system["cp"].is_null(), "{host} runs no control plane");
        let CliCommand::Agent(agent) = argv(&system["agent"]).command else { panic!("not `agent`") };
        let cp_host = agent.cp.strip_prefix("https://").and_then(|rest| rest.split(':').next());
        let cp_host = cp_host.unwrap_or_else(|| panic!("{host} dials the CP over https: {}", agent.cp));
        assert!(
            cp_names.iter().any(|n| n == cp_host),
            "{host} dials {cp_host}, not in the cp certificate: {cp_names:?}"
        );
        store_file(&agent.ca_cert, "ca.crt");
        store_file(&agent.client_cert, &format!("{host}.crt"));
        assert_eq!(agent.client_key, Some(PathBuf::from("/etc/nixfleet/tls/host.key")));
        let text = system["checks"].as_str().expect("health checks rendered");
        let checks = HealthChecks::parse(text).unwrap_or_else(|e| panic!("the agent refuses {host}'s checks: {e}"));
        assert!(!checks.probes.is_empty(), "{host} has probes");
    }

    // A misspelt option in the README's flake fails this test.
    std::fs::write(&file, flake.replace("clientCert =", "clientCertificate =")).expect("write");
    let error = eval_readme_flake(dir.path()).expect_err("a misspelt option");
    assert!(error.contains("services.nixfleet.agent.clientCertificate' does not exist"), "{error}");
}

/// Every `/etc/nixfleet/…` path in `text`'s lines that are not comments.
fn etc_paths(text: &str) -> std::collections::BTreeSet<String> {
    let mut paths = std::collections::BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        // `EnvironmentFile=-PATH` is optional: nothing needs to install it.
        if line.starts_with("EnvironmentFile=-") {
            continue;
        }
        for (at, _) in line.match_indices("/etc/nixfleet/") {
            let path: String =
                line[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || "._/-".contains(*c)).collect();
            paths.insert(path);
        }
    }
    paths
}

#[test]
fn the_readmes_steps_without_nixos_install_every_file_the_units_read() {
    // Proves the README's systemd path is complete: each file under /etc/nixfleet that contrib/systemd's units
    // and examples/agent.env name is installed by an `install` line of the README, and both units are installed.
    let installed: std::collections::BTreeSet<String> = readme_blocks("A real fleet", "sh")
        .iter()
        .flat_map(|block| block.lines().map(|l| l.split(" #").next().unwrap_or_default().trim().to_owned()))
        .filter(|l| l.starts_with("install "))
        .filter_map(|l| shell_words(&l).last().cloned())
        .collect();
    let mut read = std::collections::BTreeSet::new();
    for file in ["contrib/systemd/nixfleet-cp.service", "contrib/systemd/nixfleet-agent.service", "examples/agent.env"]
    {
        read.extend(etc_paths(&std::fs::read_to_string(repo(file)).expect(file)));
    }
    for want in ["/etc/nixfleet/agent.env", "/etc/nixfleet/tls/cp.key", "/etc/nixfleet/tls/host.key"] {
        assert!(read.contains(want), "the units or agent.env read {want}: {read:?}");
    }
    let missing: Vec<&String> = read.iter().filter(|p| !installed.contains(*p)).collect();
    assert!(missing.is_empty(), "the README installs none of {missing:?}; it installs {installed:?}");
    assert!(installed.contains("/etc/nixfleet/agent/health-checks.json"), "the agent's default --health-checks");
    let steps = readme_blocks("A real fleet", "sh").concat();
    for unit in ["nixfleet-cp.service", "nixfleet-agent.service"] {
        let line = format!("install -m 0644 contrib/systemd/{unit} /etc/systemd/system/");
        assert!(steps.contains(&line), "the README installs {unit}");
    }
}

#[test]
fn the_agents_health_checks_are_rendered_into_the_closure_as_the_agent_parses_them() {
    if !have_nix() {
        return;
    }
    let json = eval(AGENT, r#"config.environment.etc."nixfleet/agent/health-checks.json".text"#).expect("evaluates");
    let text = json.as_str().expect("the file's text");
    let checks =
        HealthChecks::parse(text).unwrap_or_else(|e| panic!("the agent refuses the rendered file: {e}\n{text}"));
    let names: Vec<&str> = checks.probes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["db-port", "nginx", "selftest", "web"], "one probe per attribute, named by it");
    let probe = |name: &str| checks.probes.iter().find(|p| p.name == name).expect("probe");
    let web = probe("web");
    assert_eq!((web.mode, web.interval), (ProbeMode::Enforce, Duration::from_secs(15)), "mode defaults to enforce");
    let Check::Http { url, expect_status, body_contains, timeout, .. } = &web.check else { panic!("{web:?}") };
    assert_eq!((url.host.as_str(), url.port, url.path.as_str()), ("127.0.0.1", 8080, "/healthz"));
    assert_eq!((*expect_status, body_contains.as_deref(), *timeout), (200, Some("it's ok"), Duration::from_secs(2)));
    let db = probe("db-port");
    assert_eq!((db.mode, db.interval), (ProbeMode::Observe, Duration::from_secs(30)), "the agent's default interval");
    assert!(matches!(&db.check, Check::Tcp { host, port: 5432, .. } if host == "127.0.0.1"), "{db:?}");
    let Check::Exec { argv, timeout, expect_exit_code } = &probe("selftest").check else { panic!("exec") };
    assert_eq!(
        (argv.as_slice(), *timeout, *expect_exit_code),
        (&["/run/current-system/sw/bin/app".to_owned(), "--selftest".to_owned()][..], Duration::from_secs(5), 3)
    );
    assert_eq!(probe("nginx").mode, ProbeMode::Disabled);
    assert!(matches!(&probe("nginx").check, Check::Systemd { unit } if unit == "nginx.service"));

    let none = eval(
        r#"{ services.nixfleet.agent = { enable = true; package = fake "nixfleet"; cpUrl = "http://cp:8443"; trustKeys = [ "/k.pub" ]; }; }"#,
        r#"config.environment.etc."nixfleet/agent/health-checks.json".text"#,
    )
    .expect("evaluates");
    let empty = HealthChecks::parse(none.as_str().expect("text")).expect("parses");
    assert!(empty.probes.is_empty(), "no probes: converge on the soak time alone");
}

#[test]
fn the_agent_service_runs_a_command_line_the_cli_accepts_under_systemd_notify() {
    if !have_nix() {
        return;
    }
    let service = eval(AGENT, "config.systemd.services.nixfleet-agent").expect("evaluates");
    let cfg = &service["serviceConfig"];
    assert_eq!(
        (cfg["Type"].as_str(), cfg["NotifyAccess"].as_str(), cfg["WatchdogSec"].as_str()),
        (Some("notify"), Some("main"), Some("60s"))
    );
    assert_eq!(
        cfg["ExecReload"].as_str(),
        Some("/nix/store/00000000000000000000000000000000-coreutils/bin/kill -HUP $MAINPID")
    );
    let argv = shell_words(cfg["ExecStart"].as_str().expect("ExecStart"));
    assert_eq!(argv[0], "/nix/store/00000000000000000000000000000000-nixfleet/bin/nixfleet");
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("the agent refuses {argv:?}: {e}"));
    let CliCommand::Agent(args) = cli.command else { panic!("not `agent`: {argv:?}") };
    assert_eq!(args.cp, "http://cp.example:8443");
    assert_eq!(args.hostname.as_deref(), Some("web-1"));
    assert_eq!(
        args.trust_keys,
        [PathBuf::from("/etc/nixfleet/release.pub"), PathBuf::from("/etc/nixfleet/release-next.pub")]
    );
    assert_eq!(args.state_dir, PathBuf::from("/var/lib/nixfleet-agent"));
    assert_eq!(args.heartbeat, Duration::from_secs(30), "extraFlags are passed");
    assert_eq!(
        args.health_checks,
        PathBuf::from("/etc/nixfleet/agent/health-checks.json"),
        "the agent reads the file the module renders into /etc"
    );
    let path: Vec<&str> = service["path"].as_array().expect("path").iter().filter_map(|p| p.as_str()).collect();
    for program in ["-nix", "-systemd", "-util-linux"] {
        assert!(path.iter().any(|p| p.ends_with(program)), "{program} on the agent's PATH: {path:?}");
    }
    let rules = eval(AGENT, "config.systemd.tmpfiles.rules").expect("evaluates");
    assert_eq!(rules, serde_json::json!(["d /var/lib/nixfleet-agent 0700 root root -"]));

    // Mutual TLS: the flags of docs/protocol.md's transport (the CLI gains
    // them with the TLS work; here their rendering is checked).
    let tls = AGENT.replace(
        "enable = true;",
        r#"enable = true; caCert = "/etc/nixfleet/ca.crt"; clientCert = "/etc/nixfleet/web-1.crt"; clientKey = "/var/lib/nixfleet-secrets/web-1.key";"#,
    );
    let line = eval(&tls, "config.systemd.services.nixfleet-agent.serviceConfig.ExecStart").expect("evaluates");
    let line = line.as_str().expect("ExecStart");
    for pair in [
        "--ca-cert /etc/nixfleet/ca.crt",
        "--client-cert /etc/nixfleet/web-1.crt",
        "--client-key /var/lib/nixfleet-secrets/web-1.key",
    ] {
        assert!(line.contains(pair), "{pair} in {line}");
    }
}

const CP: &str = r#"{
  services.nixfleet.cp = {
    enable = true;
    package = fake "nixfleet";
    listenAddress = "::";
    port = 9443;
    openFirewall = true;
    database = "/srv/nixfleet/cp.db";
    trustKeys = [ "/etc/nixfleet/release.pub" ];
    heartbeatInterval = "2m";
  };
}"#;

#[test]
fn the_cp_service_listens_where_told_opens_its_port_and_is_confined() {
    if !have_nix() {
        return;
    }
    let service = eval(CP, "config.systemd.services.nixfleet-cp").expect("evaluates");
    let cfg = &service["serviceConfig"];
    assert_eq!(
        (cfg["Type"].as_str(), cfg["NotifyAccess"].as_str(), cfg["WatchdogSec"].as_str()),
        (Some("notify"), Some("main"), Some("60s"))
    );
    for (key, want) in [("User", "nixfleet-cp"), ("ProtectSystem", "strict"), ("StateDirectory", "nixfleet-cp")] {
        assert_eq!(cfg[key].as_str(), Some(want), "{key}");
    }
    for key in [
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "RestrictNamespaces",
        "MemoryDenyWriteExecute",
    ] {
        assert_eq!(cfg[key].as_bool(), Some(true), "{key}");
    }
    assert!(cfg.get("AmbientCapabilities").is_none(), "no capability for a port above 1024");
    assert_eq!(cfg["ReadWritePaths"], serde_json::json!(["/srv/nixfleet"]), "the database's directory is writable");
    let argv = shell_words(cfg["ExecStart"].as_str().expect("ExecStart"));
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("cp serve refuses {argv:?}: {e}"));
    let CliCommand::Cp(CpCommand::Serve(args)) = cli.command else { panic!("not `cp serve`: {argv:?}") };
    assert_eq!(args.listen.to_string(), "[::]:9443");
    assert_eq!(args.db, PathBuf::from("/srv/nixfleet/cp.db"));
    assert_eq!(args.trust_key, [PathBuf::from("/etc/nixfleet/release.pub")]);
    assert_eq!(args.heartbeat_interval_secs, 120);

    let system = eval(
        CP,
        "{ ports = config.networking.firewall.allowedTCPPorts; rules = config.systemd.tmpfiles.rules; user = config.users.users.nixfleet-cp.isSystemUser; }",
    )
    .expect("evaluates");
    assert_eq!(system["ports"], serde_json::json!([9443]));
    assert_eq!(system["rules"], serde_json::json!(["d /srv/nixfleet 0700 nixfleet-cp nixfleet-cp -"]));
    assert_eq!(system["user"], serde_json::json!(true));

    let low = CP.replace("port = 9443;", "port = 443;").replace("openFirewall = true;", "openFirewall = false;");
    let system = eval(&low, "{ ports = config.networking.firewall.allowedTCPPorts; caps = config.systemd.services.nixfleet-cp.serviceConfig.AmbientCapabilities; }").expect("evaluates");
    assert_eq!(system["ports"], serde_json::json!([]), "openFirewall = false opens nothing");
    assert_eq!(system["caps"], serde_json::json!(["CAP_NET_BIND_SERVICE"]));

    let tls = CP.replace(
        "enable = true;",
        r#"enable = true; tls = { cert = "/etc/nixfleet/cp.crt"; key = "/var/lib/nixfleet-secrets/cp.key"; clientCa = "/etc/nixfleet/ca.crt"; };"#,
    );
    let line = eval(&tls, "config.systemd.services.nixfleet-cp.serviceConfig.ExecStart").expect("evaluates");
    let line = line.as_str().expect("ExecStart");
    for pair in [
        "--tls-cert /etc/nixfleet/cp.crt",
        "--tls-key /var/lib/nixfleet-secrets/cp.key",
        "--client-ca /etc/nixfleet/ca.crt",
    ] {
        assert!(line.contains(pair), "{pair} in {line}");
    }
}

#[test]
fn disabled_roles_add_nothing_to_the_system() {
    if !have_nix() {
        return;
    }
    let system = eval(
        "{ }",
        "{ services = config.systemd.services; etc = config.environment.etc; ports = config.networking.firewall.allowedTCPPorts; users = config.users.users; }",
    )
    .expect("evaluates");
    assert_eq!(system, serde_json::json!({"services": {}, "etc": {}, "ports": [], "users": {}}));
}

#[test]
fn mistakes_fail_the_evaluation_naming_the_option() {
    if !have_nix() {
        return;
    }
    let agent = |extra: &str| AGENT.replacen("enable = true;", &format!("enable = true; {extra}"), 1);
    let probe = |body: &str| agent(&format!("healthChecks.extra = {{ {body} }};"));
    let cases: Vec<(String, &str)> = vec![
        (probe(r#"kind = "http"; urll = "http://x/"; timeoutSecs = 1;"#), "The option `services.nixfleet.agent.healthChecks.extra.urll' does not exist."),
        (probe(r#"kind = "tcp"; host = "db"; port = "5432";"#), "A definition for option `services.nixfleet.agent.healthChecks.extra.port' is not of type `null or 16 bit unsigned integer"),
        (probe(r#"kind = "ping"; host = "db";"#), "A definition for option `services.nixfleet.agent.healthChecks.extra.kind' is not of type `one of"),
        (probe(r#"kind = "tcp"; host = "db"; port = 5432; url = "http://db/";"#), "services.nixfleet.agent.healthChecks.extra: a tcp probe does not take url"),
        (probe(r#"kind = "http"; url = "http://db/";"#), "services.nixfleet.agent.healthChecks.extra: a http probe needs timeoutSecs"),
        (probe(r#"kind = "exec"; argv = [ "/bin/true" ]; timeoutSecs = 0;"#), "healthChecks.extra.timeoutSecs' is not of type `null or positive integer"),
        (agent(r#"caCert = "/etc/nixfleet/ca.crt";"#), "services.nixfleet.agent: set all of caCert, clientCert, clientKey for mutual TLS, or none of them"),
        (
            agent(r#"caCert = "/etc/ca.crt"; clientCert = "/etc/h.crt"; clientKey = "/nix/store/00000000000000000000000000000000-h.key";"#),
            "services.nixfleet.agent.clientKey must be an absolute path outside the Nix store",
        ),
        (AGENT.replace("cpUrl = \"http://cp.example:8443\";", ""), "The option `services.nixfleet.agent.cpUrl' is used but not defined."),
        (AGENT.replace("cpUrl =", "cpURL ="), "The option `services.nixfleet.agent.cpURL' does not exist."),
        (CP.replace(r#"trustKeys = [ "/etc/nixfleet/release.pub" ];"#, "trustKeys = [ ];"), "services.nixfleet.cp.trustKeys: at least one release key"),
        (CP.replace("port = 9443;", "port = 70000;"), "A definition for option `services.nixfleet.cp.port' is not of type `16 bit unsigned integer"),
        (CP.replace("enable = true;", r#"enable = true; tls.cert = "/etc/cp.crt";"#), "services.nixfleet.cp.tls: set all of cert, key, clientCa"),
    ];
    for (settings, want) in cases {
        let error = eval(&settings, "config.systemd.services").expect_err(want);
        assert!(error.contains(want), "wanted {want:?} in:\n{error}");
    }
}

/// A unit file from an evaluated `systemd.services.NAME`, as NixOS writes it
/// (booleans as true/false, one line per list element), with the stand-in
/// store paths pointed at real programs so `systemd-analyze verify` can
/// check that they are executable.
fn unit_file(service: &serde_json::Value) -> String {
    let fake = |name: &str| format!("/nix/store/00000000000000000000000000000000-{name}");
    let real = |text: &str| {
        text.replace(&format!("{}/bin/nixfleet", fake("nixfleet")), crate::harness::bin())
            .replace(&format!("{}/bin/kill", fake("coreutils")), "/bin/kill")
    };
    let scalar = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => real(s),
        other => other.to_string(),
    };
    let mut unit = format!("[Unit]\nDescription={}\n", scalar(&service["description"]));
    for key in ["wants", "after"] {
        for v in service[key].as_array().into_iter().flatten() {
            unit += &format!("{}={}\n", if key == "wants" { "Wants" } else { "After" }, scalar(v));
        }
    }
    unit += "\n[Service]\n";
    for (key, value) in service["serviceConfig"].as_object().expect("serviceConfig") {
        match value {
            serde_json::Value::Array(items) => items.iter().for_each(|v| unit += &format!("{key}={}\n", scalar(v))),
            v => unit += &format!("{key}={}\n", scalar(v)),
        }
    }
    unit + "\n[Install]\nWantedBy=multi-user.target\n"
}

#[test]
fn the_modules_units_pass_systemd_analyze_verify() {
    if !have_nix() {
        return;
    }
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        println!("skipped: systemd-analyze is not installed (Debian package `systemd`; .ci/run installs it)");
        return;
    }
    let dir = TempDir::new("nixos-units");
    let mut paths = Vec::new();
    for (settings, name) in [(AGENT, "nixfleet-agent"), (&*CP.replace("port = 9443;", "port = 443;"), "nixfleet-cp")] {
        let service = eval(settings, &format!("config.systemd.services.{name}")).expect("evaluates");
        let path = dir.path().join(format!("{name}.service"));
        std::fs::write(&path, unit_file(&service)).expect("write unit");
        paths.push(path);
    }
    let out = Command::new("systemd-analyze").arg("verify").args(&paths).output().expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let about_units: Vec<&str> = stderr.lines().filter(|l| l.contains("nixfleet")).collect();
    let units: Vec<String> = paths.iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect();
    assert!(out.status.success() && about_units.is_empty(), "systemd-analyze verify:\n{stderr}\n{}", units.join("\n"));
}
