# The nixfleet NixOS module: `services.nixfleet.agent` on every host of the
# fleet, `services.nixfleet.cp` on the control plane. Import it from a flake
# (see the README's "NixOS" section) and set `package` to a nixfleet build.
#
# The agent's health checks are Nix attribute sets rendered into this
# system's closure as /etc/nixfleet/agent/health-checks.json, so every
# closure carries its own probes: after a switch, the agent probes with the
# checks of the system it just activated (docs/protocol.md §6).
#
# TLS: the certificate options pass the flags of mutual TLS (`--ca-cert`,
# `--client-cert`, `--client-key` for the agent; `--tls-cert`, `--tls-key`,
# `--client-ca` for the control plane); leave them unset for a plaintext
# control plane on loopback.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption mkEnableOption mkIf mkMerge types;

  agent = config.services.nixfleet.agent;
  cp = config.services.nixfleet.cp;

  # Probe fields as Nix options (camelCase) and as the health-checks file
  # names them; `name` comes from the attribute name.
  probeFieldNames = {
    kind = "kind";
    mode = "mode";
    intervalSecs = "interval_secs";
    argv = "argv";
    timeoutSecs = "timeout_secs";
    expectExitCode = "expect_exit_code";
    url = "url";
    expectStatus = "expect_status";
    bodyContains = "body_contains";
    caFile = "ca_file";
    host = "host";
    port = "port";
    unit = "unit";
  };
  # Which optional fields each kind takes, and which it needs: the agent
  # refuses a file with anything else, so the module refuses it first.
  probeKinds = {
    exec = { needs = [ "argv" "timeoutSecs" ]; takes = [ "argv" "timeoutSecs" "expectExitCode" ]; };
    http = { needs = [ "url" "timeoutSecs" ]; takes = [ "url" "timeoutSecs" "expectStatus" "bodyContains" "caFile" ]; };
    tcp = { needs = [ "host" "port" ]; takes = [ "host" "port" "timeoutSecs" ]; };
    systemd = { needs = [ "unit" ]; takes = [ "unit" ]; };
  };
  alwaysTaken = [ "kind" "mode" "intervalSecs" ];

  nullable = type: description: mkOption { type = types.nullOr type; default = null; inherit description; };

  probeOptions = {
    options = {
      kind = mkOption {
        type = types.enum (builtins.attrNames probeKinds);
        description = "What the probe checks: exec (a program's exit code), http (a status, optionally a body), tcp (a connection), systemd (a unit is active).";
      };
      mode = mkOption {
        type = types.enum [ "enforce" "observe" "disabled" ];
        default = "enforce";
        description = "enforce: a sustained failure fails the host (and rolls it back under rollback-and-halt); observe: reported only; disabled: declared, not run.";
      };
      intervalSecs = nullable types.ints.positive "Seconds between runs (the agent's default: 30).";
      argv = nullable (types.listOf types.str) "exec: the program and its arguments.";
      timeoutSecs = nullable types.ints.positive "exec, http, tcp: seconds before a run fails.";
      expectExitCode = nullable types.int "exec: the exit code that passes (default 0).";
      url = nullable types.str "http: an http:// or https:// URL.";
      expectStatus = nullable types.ints.positive "http: the status that passes (default 200).";
      bodyContains = nullable types.str "http: text the body must contain.";
      caFile = nullable types.str "http (https:// only): the CA bundle the server must chain to, instead of the system's roots.";
      host = nullable types.str "tcp: the host to connect to.";
      port = nullable types.port "tcp: the port to connect to.";
      unit = nullable types.str "systemd: the unit that must be active.";
    };
  };

  # The health-checks file exactly as the agent parses it (strict: unset
  # fields are left out, never written as null).
  renderProbe = name: probe:
    { inherit name; }
    // lib.mapAttrs' (field: value: lib.nameValuePair probeFieldNames.${field} value)
      (lib.filterAttrs (field: value: value != null && builtins.hasAttr field probeFieldNames) probe);
  healthChecksJSON = builtins.toJSON { probes = lib.mapAttrsToList renderProbe agent.healthChecks; };

  probeAssertions = lib.concatLists (lib.mapAttrsToList (name: probe:
    let
      kind = probeKinds.${probe.kind};
      set = builtins.filter (f: probe.${f} != null) (builtins.attrNames probeFieldNames);
      foreign = builtins.filter (f: !(builtins.elem f (alwaysTaken ++ kind.takes))) set;
      missing = builtins.filter (f: probe.${f} == null) kind.needs;
    in [
      {
        assertion = foreign == [ ];
        message = "services.nixfleet.agent.healthChecks.${name}: a ${probe.kind} probe does not take ${lib.concatStringsSep ", " foreign}";
      }
      {
        assertion = missing == [ ];
        message = "services.nixfleet.agent.healthChecks.${name}: a ${probe.kind} probe needs ${lib.concatStringsSep ", " missing}";
      }
    ]) agent.healthChecks);

  # `--flag value` when the value is set. Interpolated, not toString: a
  # path literal (a public key or certificate next to the flake) is then
  # copied into the store and becomes part of the system closure.
  flag = name: value: lib.optionals (value != null) [ name "${value}" ];

  # A secret must not be copied into the world-readable Nix store.
  outsideStore = option: path: {
    assertion = path == null || (lib.hasPrefix "/" path && !(lib.hasPrefix "${builtins.storeDir}/" path));
    message = "${option} must be an absolute path outside the Nix store (the store is world-readable): ${toString path}";
  };

  allOrNone = prefix: names: values: {
    assertion = builtins.all (v: v == null) values || builtins.all (v: v != null) values;
    message = "${prefix}: set all of ${lib.concatStringsSep ", " names} for mutual TLS, or none of them";
  };

  agentArgs = [ "${agent.package}/bin/nixfleet" "agent" "--cp" agent.cpUrl "--state-dir" agent.stateDir ]
    ++ lib.concatMap (flag "--trust-key") agent.trustKeys
    ++ flag "--hostname" agent.hostname
    ++ flag "--ca-cert" agent.caCert
    ++ flag "--client-cert" agent.clientCert
    ++ flag "--client-key" agent.clientKey
    ++ agent.extraFlags;

  listen = if lib.hasInfix ":" cp.listenAddress then "[${cp.listenAddress}]:${toString cp.port}" else "${cp.listenAddress}:${toString cp.port}";
  cpArgs = [ "${cp.package}/bin/nixfleet" "cp" "serve" "--listen" listen "--db" cp.database "--heartbeat-interval" cp.heartbeatInterval ]
    ++ lib.concatMap (flag "--trust-key") cp.trustKeys
    ++ flag "--tls-cert" cp.tls.cert
    ++ flag "--tls-key" cp.tls.key
    ++ flag "--client-ca" cp.tls.clientCa
    ++ cp.extraFlags;
  cpStateDir = "/var/lib/nixfleet-cp";
  cpDatabaseDir = dirOf cp.database;

  # Both roles tell systemd when they serve and ping its watchdog from their
  # core loop (the CP's store writer, the agent's reducer); see
  # contrib/systemd/ for the same settings outside NixOS.
  notifyService = {
    Type = "notify";
    NotifyAccess = "main";
    WatchdogSec = "60s";
    # SIGHUP re-reads the TLS files (`systemctl reload` after a rotation).
    ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
  };
in
{
  options.services.nixfleet.agent = {
    enable = mkEnableOption "the nixfleet agent (pulls, activates and health-checks this host's system closures)";
    package = mkOption { type = types.package; description = "The nixfleet package (its bin/nixfleet)."; };
    cpUrl = mkOption { type = types.str; example = "https://cp.example:8443"; description = "The control plane's URL."; };
    trustKeys = mkOption {
      type = types.listOf types.path;
      description = "Release public keys a manifest must be signed with (at least one).";
    };
    hostname = nullable types.str "This host's name in manifests (default: the system's hostname).";
    caCert = nullable types.path "The CA certificate the control plane's certificate must chain to.";
    clientCert = nullable types.path "This host's client certificate (its CN is the hostname).";
    clientKey = nullable types.str "This host's client key: an absolute path outside the Nix store, readable by root.";
    stateDir = mkOption {
      type = types.str;
      default = "/var/lib/nixfleet-agent";
      description = "The agent's queue, cached manifests and switch logs.";
    };
    healthChecks = mkOption {
      type = types.attrsOf (types.submodule probeOptions);
      default = { };
      example = lib.literalExpression ''
        {
          web = { kind = "http"; url = "http://127.0.0.1:8080/healthz"; timeoutSecs = 2; intervalSecs = 15; };
          db-port = { kind = "tcp"; mode = "observe"; host = "127.0.0.1"; port = 5432; };
        }
      '';
      description = "This system's probes, by name, written to /etc/nixfleet/agent/health-checks.json in its closure.";
    };
    extraFlags = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--heartbeat" "30s" ];
      description = "More `nixfleet agent` flags.";
    };
  };

  options.services.nixfleet.cp = {
    enable = mkEnableOption "the nixfleet control plane";
    package = mkOption { type = types.package; description = "The nixfleet package (its bin/nixfleet)."; };
    listenAddress = mkOption {
      type = types.str;
      default = "127.0.0.1";
      description = "Address to listen on. Without TLS the control plane refuses any but a loopback address.";
    };
    port = mkOption { type = types.port; default = 8443; description = "Port to listen on."; };
    openFirewall = mkOption { type = types.bool; default = false; description = "Open `port` in the firewall."; };
    database = mkOption {
      type = types.str;
      default = "${cpStateDir}/cp.db";
      description = "The SQLite database (created if missing).";
    };
    trustKeys = mkOption {
      type = types.listOf types.path;
      description = "Release public keys that may sign manifests (at least one).";
    };
    heartbeatInterval = mkOption {
      type = types.str;
      default = "60s";
      description = "The agents' heartbeat interval; a host silent for three is unreachable.";
    };
    tls = {
      cert = nullable types.path "The control plane's server certificate.";
      key = nullable types.str "Its key: an absolute path outside the Nix store, readable by the nixfleet-cp user.";
      clientCa = nullable types.path "The CA that host and operator client certificates must chain to.";
    };
    extraFlags = mkOption { type = types.listOf types.str; default = [ ]; description = "More `nixfleet cp serve` flags."; };
  };

  config = mkMerge [
    (mkIf agent.enable {
      assertions = [
        { assertion = agent.trustKeys != [ ]; message = "services.nixfleet.agent.trustKeys: at least one release key"; }
        (outsideStore "services.nixfleet.agent.clientKey" agent.clientKey)
        (allOrNone "services.nixfleet.agent" [ "caCert" "clientCert" "clientKey" ] [ agent.caCert agent.clientCert agent.clientKey ])
      ] ++ probeAssertions;

      environment.etc."nixfleet/agent/health-checks.json".text = healthChecksJSON;

      systemd.tmpfiles.rules = [ "d ${agent.stateDir} 0700 root root -" ];

      systemd.services.nixfleet-agent = {
        description = "nixfleet agent: pulls, activates and health-checks system closures";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" "nix-daemon.service" ];
        # nix-store/nix-env, systemd-run/systemctl (the detached switch and
        # systemd probes), setsid.
        path = [ config.nix.package config.systemd.package pkgs.util-linux ];
        serviceConfig = notifyService // {
          ExecStart = lib.escapeShellArgs agentArgs;
          Restart = "always";
          RestartSec = 5;
          # The agent stops its workers within 25 s of SIGTERM.
          TimeoutStopSec = 40;
          # It switches the system and runs this system's probes as root, so
          # it is confined only where no switch or probe can need more.
          UMask = "0077";
          LockPersonality = true;
          RestrictRealtime = true;
        };
      };
    })

    (mkIf cp.enable {
      assertions = [
        { assertion = cp.trustKeys != [ ]; message = "services.nixfleet.cp.trustKeys: at least one release key"; }
        (outsideStore "services.nixfleet.cp.tls.key" cp.tls.key)
        (allOrNone "services.nixfleet.cp.tls" [ "cert" "key" "clientCa" ] [ cp.tls.cert cp.tls.key cp.tls.clientCa ])
      ];

      networking.firewall.allowedTCPPorts = lib.optional cp.openFirewall cp.port;

      users.users.nixfleet-cp = { isSystemUser = true; group = "nixfleet-cp"; home = cpStateDir; };
      users.groups.nixfleet-cp = { };

      systemd.tmpfiles.rules = lib.optional (cpDatabaseDir != cpStateDir) "d ${cpDatabaseDir} 0700 nixfleet-cp nixfleet-cp -";

      systemd.services.nixfleet-cp = {
        description = "nixfleet control plane: rollouts, event log, long-poll dispatch";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        serviceConfig = notifyService // {
          ExecStart = lib.escapeShellArgs cpArgs;
          User = "nixfleet-cp";
          Group = "nixfleet-cp";
          StateDirectory = "nixfleet-cp";
          StateDirectoryMode = "0700";
          ReadWritePaths = [ cpDatabaseDir ];
          Restart = "always";
          RestartSec = 2;
          # 10 s drain of in-flight requests, then a WAL checkpoint.
          TimeoutStopSec = 30;
          # Thousands of agents hold one long-poll connection each.
          LimitNOFILE = 65536;
          UMask = "0077";
          NoNewPrivileges = true;
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectClock = true;
          ProtectHostname = true;
          RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          SystemCallArchitectures = "native";
          SystemCallFilter = [ "@system-service" ];
        } // lib.optionalAttrs (cp.port < 1024) {
          # A port below 1024 needs this one capability, and nothing else.
          AmbientCapabilities = [ "CAP_NET_BIND_SERVICE" ];
          CapabilityBoundingSet = [ "CAP_NET_BIND_SERVICE" ];
        };
      };
    })
  ];
}
