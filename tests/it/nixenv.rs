//! The Nix test environment (`docs/protocol.md` §6): real store paths built by the real
//! `nix-build` from a tiny derivation (no nixpkgs), a real signed local binary
//! cache, real `nix-store`/`nix-env`. The only stand-in is each closure's
//! `bin/switch-to-configuration`, a /bin/sh script that repoints a
//! `current-system` symlink baked in at build time.
//!
//! Where Nix is absent (or `NIXFLEET_TEST_NIX=stand-in`), the stand-in
//! `nix-store`/`nix-env` scripts of `nixfleet demo` (the same source) on a
//! temp dir keep the same program boundary and write closures straight into
//! the store directory: `/nix/store` when this user may write it; else
//! [`closures_here`] runs the test again in a child process (this test
//! binary, the one test) with `NIX_STORE_DIR` set to a temp store, which the
//! child fixes as its store directory and hands to every `nixfleet` it runs. Every test says which ran: `nix: real (...)` or `nix: stand-in`.
//!
//! Every closure carries a random nonce, so tests sharing the real
//! `/nix/store` never build or delete each other's paths.
#![allow(dead_code)] // Each test module uses a different part of the fixture.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nixfleet::agent::activation::{ActivationConfig, SwitchRunner};
use nixfleet::ids::Closure;

use crate::harness::TempDir;

/// What a test closure contains besides its switch script.
#[derive(Debug, Clone, Default)]
pub struct ClosureSpec {
    /// Part of the store path name, so `ls /nix/store` shows which test made it.
    pub label: String,
    /// The symlink the switch repoints (baked into the script).
    pub current_system: PathBuf,
    /// The switch prints an error and exits 1 without touching the symlink.
    pub fail_switch: bool,
    /// Content of `nixfleet-reboot-required` (the component), if any.
    pub reboot_required: Option<String>,
    /// Content of `etc/nixfleet/agent/health-checks.json`, if any.
    pub health_checks: Option<String>,
    /// The switch writes its pid here as soon as it starts.
    pub started_file: Option<PathBuf>,
    /// The switch waits until this file exists before doing anything else.
    pub wait_for: Option<PathBuf>,
    /// The switch `kill -9`s the pid in this file (the agent) before it
    /// switches, as a real switch restarting the agent's unit would.
    pub kill_pid_file: Option<PathBuf>,
}

/// Which Nix the fixture runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NixKind {
    Real { version: String },
    StandIn,
}

/// One test's view of Nix: programs, a signed binary cache, and a key pair.
#[derive(Debug)]
pub struct NixEnv {
    pub kind: NixKind,
    dir: TempDir,
    nix_store: PathBuf,
    nix_env: PathBuf,
    nix_build: PathBuf,
    cache_dir: PathBuf,
    secret_key: PathBuf,
    public_key: String,
}

fn nonce() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("os randomness");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn real_nix_version() -> Option<String> {
    if std::env::var("NIXFLEET_TEST_NIX").as_deref() == Ok("stand-in") {
        return None;
    }
    let out = Command::new("nix-store").arg("--version").output().ok()?;
    let build = Command::new("nix-build").arg("--version").output().ok()?;
    (out.status.success() && build.status.success()).then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Set in a child run by [`closures_here`].
const STORE_CHILD_ENV: &str = "NIXFLEET_IT_STORE_CHILD";

/// The first call of every test that builds closures. True: build them
/// here (real Nix, a writable `/nix/store`, or this is the child run
/// below). False: this user may not write `/nix/store` and Nix is absent,
/// so the test has just run, and passed, in a child process (this test
/// binary, `--exact` this test) with `NIX_STORE_DIR` set to a temp store;
/// the caller returns. A child that fails fails this test with its output.
pub fn closures_here() -> bool {
    use nixfleet::ids::{init_store_dir, StoreDir};
    if std::env::var_os(STORE_CHILD_ENV).is_some() {
        let dir = StoreDir::from_env().expect("the child's NIX_STORE_DIR");
        init_store_dir(dir).expect("the store dir is fixed before the test parses a closure");
        return true;
    }
    let nix_store = Path::new(StoreDir::DEFAULT);
    let writable = std::fs::create_dir_all(nix_store).is_ok()
        && rustix::fs::access(nix_store, rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK).is_ok();
    if real_nix_version().is_some() || writable {
        return true;
    }
    let current = std::thread::current();
    let name = current.name().filter(|n| *n != "main").expect("the test's name (libtest names its thread)");
    let dir = TempDir::new("store");
    let store = fs_err::canonicalize(dir.path()).expect("canonical store dir").join("store");
    fs_err::create_dir_all(&store).expect("mkdir store");
    println!("nix: stand-in; /nix/store is not writable: running {name} with NIX_STORE_DIR={}", store.display());
    let out = Command::new(std::env::current_exe().expect("the test binary"))
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(STORE_CHILD_ENV, "1")
        .env(StoreDir::ENV, &store)
        .output()
        .expect("run the child test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    // The test's own lines come between `test NAME ...` and `ok` (--nocapture).
    let ran = stdout.contains("running 1 test\n")
        && stdout.contains(&format!("test {name} ... "))
        && stdout.contains("test result: ok. 1 passed; 0 failed");
    assert!(out.status.success() && ran, "the child run of {name} failed:\n{stdout}\n{stderr}");
    false
}

fn write_script(path: &Path, text: &str) {
    fs_err::write(path, text).expect("write script");
    fs_err::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod script");
}

/// The switch-to-configuration stand-in; `@out@` is the closure's own path.
fn switch_script(spec: &ClosureSpec) -> String {
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    let mut s = String::from("#!/bin/sh\n# nixfleet test stand-in for switch-to-configuration\nPATH=/usr/bin:/bin\n");
    s.push_str("action=\"$1\"\necho \"stand-in switch-to-configuration $action @out@\" >&2\n");
    if let Some(started) = &spec.started_file {
        s.push_str(&format!("echo $$ > {}.tmp && mv {}.tmp {}\n", quote(started), quote(started), quote(started)));
    }
    if let Some(wait) = &spec.wait_for {
        s.push_str(&format!("while [ ! -e {} ]; do sleep 0.02; done\n", quote(wait)));
    }
    if let Some(pid_file) = &spec.kill_pid_file {
        s.push_str(&format!("[ -f {p} ] && kill -9 \"$(cat {p})\"\n", p = quote(pid_file)));
    }
    if spec.fail_switch {
        s.push_str("echo \"error: stand-in switch was told to fail ($action)\" >&2\nexit 1\n");
    }
    let cs = quote(&spec.current_system);
    s.push_str(&format!(
        "case \"$action\" in\n\
         switch|test) ln -sfn @out@ {cs}.tmp && mv -T {cs}.tmp {cs} ;;\n\
         boot) echo @out@ > {cs}.next-boot ;;\n\
         *) echo \"unknown action $action\" >&2; exit 2 ;;\n\
         esac\n"
    ));
    s
}

const DERIVATION: &str = r#"{ name, nonce, switchScript, rebootRequired, healthChecks }:
derivation {
  inherit name nonce switchScript rebootRequired healthChecks;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  args = [ "-c" ''
    set -e
    mkdir -p $out/bin
    printf '%s' "$switchScript" | sed "s|@out@|$out|g" > $out/bin/switch-to-configuration
    chmod 755 $out/bin/switch-to-configuration
    if [ -n "$rebootRequired" ]; then printf '%s' "$rebootRequired" > $out/nixfleet-reboot-required; fi
    if [ -n "$healthChecks" ]; then
      mkdir -p $out/etc/nixfleet/agent
      printf '%s' "$healthChecks" > $out/etc/nixfleet/agent/health-checks.json
    fi
  '' ];
}
"#;

/// The stand-in `nix-store` (--realise, from a signed `file://` substituter
/// too; --delete; --version) and `nix-env -p PROFILE --set PATH`: the
/// scripts `nixfleet demo` runs without Nix, one source for both.
const STANDIN_NIX_STORE: &str = nixfleet::tools::demo::STANDIN_NIX_STORE;
const STANDIN_NIX_ENV: &str = nixfleet::tools::demo::STANDIN_NIX_ENV;

impl NixEnv {
    /// Real Nix if `nix-store` and `nix-build` run, else stand-ins; prints which.
    pub fn detect() -> NixEnv {
        let dir = TempDir::new("nix");
        let kind = match real_nix_version() {
            Some(version) => NixKind::Real { version },
            None => NixKind::StandIn,
        };
        let cache_dir = dir.path().join("cache");
        let secret_key = dir.path().join("cache.sk");
        let key_name = format!("nixfleet-test-{}", nonce());
        let (nix_store, nix_env, nix_build, public_key) = match &kind {
            NixKind::Real { version } => {
                println!("nix: real ({version})");
                let public = dir.path().join("cache.pk");
                run(Command::new("nix-store")
                    .arg("--generate-binary-cache-key")
                    .arg(&key_name)
                    .arg(&secret_key)
                    .arg(&public));
                let public_key = fs_err::read_to_string(&public).expect("read public key").trim().to_owned();
                ("nix-store".into(), "nix-env".into(), "nix-build".into(), public_key)
            }
            NixKind::StandIn => {
                println!("nix: stand-in");
                let bin = dir.path().join("bin");
                fs_err::create_dir_all(&bin).expect("mkdir bin");
                fs_err::create_dir_all(&cache_dir).expect("mkdir cache");
                write_script(&bin.join("nix-store"), STANDIN_NIX_STORE);
                write_script(&bin.join("nix-env"), STANDIN_NIX_ENV);
                fs_err::write(&secret_key, &key_name).expect("write key");
                (bin.join("nix-store"), bin.join("nix-env"), PathBuf::new(), format!("{key_name}:stand-in"))
            }
        };
        NixEnv { kind, dir, nix_store, nix_env, nix_build, cache_dir, secret_key, public_key }
    }

    pub fn is_real(&self) -> bool {
        matches!(self.kind, NixKind::Real { .. })
    }

    pub fn nix_store(&self) -> &Path {
        &self.nix_store
    }

    pub fn nix_env(&self) -> &Path {
        &self.nix_env
    }

    /// A scratch directory that lives as long as this environment.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Builds a closure into the store; unique per call (random nonce).
    pub fn build_closure(&self, spec: &ClosureSpec) -> Closure {
        let label: String =
            spec.label.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
        let name = format!("nixfleet-test-{label}");
        let script = switch_script(spec);
        let nonce = nonce();
        let path = match &self.kind {
            NixKind::Real { .. } => {
                let expr = self.dir.path().join("closure.nix");
                fs_err::write(&expr, DERIVATION).expect("write derivation");
                run(Command::new(&self.nix_build)
                    .env("NIX_REMOTE", "local")
                    .arg("--no-out-link")
                    .arg("--quiet")
                    .arg(&expr)
                    .args(["--argstr", "name", &name, "--argstr", "nonce", &nonce, "--argstr", "switchScript", &script])
                    .args(["--argstr", "rebootRequired", spec.reboot_required.as_deref().unwrap_or("")])
                    .args(["--argstr", "healthChecks", spec.health_checks.as_deref().unwrap_or("")]))
            }
            NixKind::StandIn => {
                // A store hash of nix base32 characters derived from the nonce.
                let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
                let mut bytes = [0u8; 32];
                getrandom::fill(&mut bytes).expect("os randomness");
                let hash: String = bytes.iter().map(|b| alphabet[usize::from(*b) % 32] as char).collect();
                let out = format!("{}/{hash}-{name}", nixfleet::ids::store_dir());
                let bin = Path::new(&out).join("bin");
                fs_err::create_dir_all(&bin).expect("stand-in mode needs a writable store (see closures_here)");
                write_script(&bin.join("switch-to-configuration"), &script.replace("@out@", &out));
                if let Some(component) = &spec.reboot_required {
                    fs_err::write(Path::new(&out).join("nixfleet-reboot-required"), component).expect("write marker");
                }
                if let Some(checks) = &spec.health_checks {
                    let etc = Path::new(&out).join("etc/nixfleet/agent");
                    fs_err::create_dir_all(&etc).expect("mkdir etc");
                    fs_err::write(etc.join("health-checks.json"), checks).expect("write health checks");
                }
                out
            }
        };
        Closure::parse(&path).expect("nix-build prints a store path")
    }

    /// Copies a closure into this environment's binary cache, signed with its key.
    pub fn push_to_cache(&self, closure: &Closure) {
        match &self.kind {
            NixKind::Real { .. } => {
                let to = format!("file://{}?secret-key={}", self.cache_dir.display(), self.secret_key.display());
                run(Command::new("nix").env("NIX_REMOTE", "local").args([
                    "--extra-experimental-features",
                    "nix-command",
                    "copy",
                    "--to",
                    &to,
                    closure.as_str(),
                ]));
            }
            NixKind::StandIn => {
                let name = Path::new(closure.as_str()).file_name().expect("store path has a name");
                run(Command::new("cp").arg("-a").arg(closure.as_str()).arg(self.cache_dir.join(name)));
                let key = fs_err::read_to_string(&self.secret_key).expect("read key");
                let mut sig = self.cache_dir.join(name).into_os_string();
                sig.push(".sig");
                fs_err::write(PathBuf::from(sig), key).expect("write sig");
            }
        }
    }

    /// Removes a closure from the local store, so realising it needs a substituter.
    pub fn delete_from_store(&self, closure: &Closure) {
        run(Command::new(&self.nix_store).env("NIX_REMOTE", "local").arg("--delete").arg(closure.as_str()));
        assert!(!Path::new(closure.as_str()).exists(), "{closure} still in the store after --delete");
    }

    /// Environment for `nix-store --realise`: this cache as the only
    /// substituter, trusting this cache's key.
    pub fn substituter_env(&self) -> Vec<(OsString, OsString)> {
        self.nix_config_with_key(&self.public_key)
    }

    /// The same cache, but trusting a different key (as if the cache were
    /// signed by an untrusted key).
    pub fn untrusted_substituter_env(&self) -> Vec<(OsString, OsString)> {
        let other = match &self.kind {
            NixKind::Real { .. } => {
                let dir = self.dir.path().join("other-key");
                fs_err::create_dir_all(&dir).expect("mkdir");
                let (sk, pk) = (dir.join("sk"), dir.join("pk"));
                run(Command::new("nix-store")
                    .args(["--generate-binary-cache-key", "untrusted-other"])
                    .arg(&sk)
                    .arg(&pk));
                fs_err::read_to_string(&pk).expect("read key").trim().to_owned()
            }
            NixKind::StandIn => "untrusted-other:stand-in".to_owned(),
        };
        self.nix_config_with_key(&other)
    }

    fn nix_config_with_key(&self, key: &str) -> Vec<(OsString, OsString)> {
        let config = format!("substituters = file://{}\ntrusted-public-keys = {key}\n", self.cache_dir.display());
        vec![("NIX_CONFIG".into(), config.into()), ("NIX_REMOTE".into(), "local".into())]
    }
}

/// Where `link` points, or None if it does not exist.
pub fn resolve(link: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(link).ok()
}

/// The `PROFILE-N-link` generation links next to a profile, sorted by N.
pub fn profile_generations(profile: &Path) -> Vec<(u32, PathBuf)> {
    let dir = profile.parent().expect("profile has a parent");
    let prefix = format!("{}-", profile.file_name().expect("profile name").to_string_lossy());
    let mut gens: Vec<(u32, PathBuf)> = fs_err::read_dir(dir)
        .expect("read profile dir")
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix(&prefix)?.strip_suffix("-link")?.parse().ok()?;
            Some((n, std::fs::canonicalize(dir.join(&name)).ok()?))
        })
        .collect();
    gens.sort();
    gens
}

/// A pretend host's file system: a profile and a current-system symlink in
/// a temp dir, and the Nix to build closures for it.
#[derive(Debug)]
pub struct Host {
    pub nix: NixEnv,
    pub root: PathBuf,
}

impl Host {
    #[allow(clippy::new_without_default)] // sets up a fresh Nix environment: not a plain default
    pub fn new() -> Host {
        let nix = NixEnv::detect();
        let root = nix.dir().join("host");
        fs_err::create_dir_all(root.join("profiles")).expect("mkdir profiles");
        Host { nix, root }
    }

    pub fn profile(&self) -> PathBuf {
        self.root.join("profiles/system")
    }

    pub fn current_system(&self) -> PathBuf {
        self.root.join("current-system")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn spec(&self, label: &str) -> ClosureSpec {
        ClosureSpec { label: label.to_owned(), current_system: self.current_system(), ..ClosureSpec::default() }
    }

    pub fn build(&self, spec: ClosureSpec) -> Closure {
        self.nix.build_closure(&spec)
    }

    /// Makes `closure` what the host runs and boots (both symlinks).
    pub fn boot_into(&self, closure: &Closure) {
        for link in [self.current_system(), self.profile()] {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(closure.as_str(), &link).expect("symlink");
        }
    }

    pub fn running(&self) -> Option<PathBuf> {
        resolve(&self.current_system())
    }

    pub fn booting(&self) -> Option<PathBuf> {
        resolve(&self.profile())
    }

    /// The agent's activation settings for this host.
    pub fn config(&self, runner: SwitchRunner) -> ActivationConfig {
        ActivationConfig {
            nix_store: self.nix.nix_store().to_owned(),
            nix_env: self.nix.nix_env().to_owned(),
            profile: self.profile(),
            current_system: self.current_system(),
            switch_runner: runner,
            time_limit: std::time::Duration::from_secs(30),
            log_dir: self.root.join("log"),
            nix_extra_env: self.nix.substituter_env(),
        }
    }

    /// Switches in a new session (`setsid`), the runner off systemd.
    pub fn session() -> SwitchRunner {
        SwitchRunner::Session { setsid: "setsid".into() }
    }
}
