//! The demo's closures and the Nix it runs with. With `nix-store` on PATH the
//! closures are real store paths (`nix-store --add`) and the agents run the
//! real `nix-store`/`nix-env`. Without it the closures are plain directories
//! in a store directory, and the agents are configured with the stand-in
//! `nix-store`/`nix-env` scripts (`stand-in/`, shared with the integration
//! tests' Nix fixture) in the work dir: the stand-in sits at the program
//! boundary, the agent runs its one production code path. The store
//! directory is `/nix/store` (or `NIX_STORE_DIR`) when this user may write
//! it, else `store/` in the work dir, which the whole process then uses as
//! its store directory (`ids::init_store_dir`, as `NIX_STORE_DIR` would) and
//! hands to every program the agents run as `NIX_STORE_DIR`.
//! In both modes each closure's only other stand-in is
//! `bin/switch-to-configuration` (it repoints that host's `current-system`).

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::{setup, DemoError};
use crate::ids::{init_store_dir, Closure, StoreDir};

/// Stand-in `nix-store` (`--realise`, `--delete`, `--version`) for where Nix
/// is absent; the integration tests' Nix fixture runs the same script.
#[doc(hidden)]
pub const STANDIN_NIX_STORE: &str = include_str!("stand-in/nix-store.sh");

/// Stand-in `nix-env -p PROFILE --set P`: numbered generation links, as Nix
/// makes them; shared with the integration tests' Nix fixture.
#[doc(hidden)]
pub const STANDIN_NIX_ENV: &str = include_str!("stand-in/nix-env.sh");

/// Which Nix the demo runs with, decided once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NixMode {
    /// `nix-store` is on PATH; its `--version` line.
    Real { version: String },
    /// No `nix-store` on PATH: plain directories and stand-in scripts.
    StandIn,
}

impl NixMode {
    /// Real when an executable `nix-store` is on PATH, else stand-in.
    pub fn detect() -> NixMode {
        let found = std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).map(|dir| dir.join("nix-store")).find(|p| is_executable(p)));
        match found.flatten() {
            Some(program) => {
                let version = std::process::Command::new(&program)
                    .arg("--version")
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map_or_else(
                        || program.display().to_string(),
                        |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
                    );
                NixMode::Real { version }
            }
            None => NixMode::StandIn,
        }
    }
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether this user may create entries in `dir` (creating it if missing).
fn writable(dir: &Path) -> bool {
    use rustix::fs::{access, Access};
    std::fs::create_dir_all(dir).is_ok() && access(dir, Access::WRITE_OK | Access::EXEC_OK).is_ok()
}

/// Makes closures in one mode and remembers them for [`Store::remove_all`].
#[derive(Debug)]
pub struct Store {
    pub mode: NixMode,
    /// The process's store directory, fixed by [`Store::new`].
    dir: &'static StoreDir,
    /// The store directory is the work dir's `store/` (this user may not
    /// write `/nix/store`).
    own_dir: bool,
    work: PathBuf,
    nonce: String,
    made: Vec<Closure>,
}

impl Store {
    /// Fixes the process's store directory (`NIX_STORE_DIR` or `/nix/store`;
    /// without Nix, the work dir's `store/` when that one is not writable)
    /// and writes the stand-in scripts. Runs before any closure is parsed.
    pub fn new(mode: NixMode, work: &Path, nonce: &str) -> Result<Store, DemoError> {
        let from_env = StoreDir::from_env().map_err(|e| DemoError::Setup(e.to_string()))?;
        let (dir, own_dir) = match mode {
            NixMode::Real { .. } => (from_env, false),
            NixMode::StandIn => {
                let bin = work.join("bin");
                fs_err::create_dir_all(&bin)?;
                write_executable(&bin.join("nix-store"), STANDIN_NIX_STORE)?;
                write_executable(&bin.join("nix-env"), STANDIN_NIX_ENV)?;
                if writable(Path::new(from_env.as_str())) {
                    (from_env, false)
                } else if from_env.is_default() {
                    (own_store_dir(work)?, true)
                } else {
                    let err = format!("{}={from_env} is not writable by this user", StoreDir::ENV);
                    return Err(DemoError::NoStore(err));
                }
            }
        };
        let dir = init_store_dir(dir).map_err(|e| DemoError::Setup(e.to_string()))?;
        Ok(Store { mode, dir, own_dir, work: work.to_owned(), nonce: nonce.to_owned(), made: Vec::new() })
    }

    /// The first line's words for this run.
    pub fn headline(&self) -> String {
        match &self.mode {
            NixMode::Real { version } if self.dir.is_default() => {
                format!("with Nix ({version}): closures are real store paths")
            }
            NixMode::Real { version } => {
                format!("with Nix ({version}): closures are real store paths in {} ({})", self.dir, StoreDir::ENV)
            }
            NixMode::StandIn => format!(
                "WITHOUT Nix (no nix-store on PATH): STAND-IN closures, plain directories under {}{}, and stand-in \
                 nix-store/nix-env scripts",
                self.dir,
                self.own_note()
            ),
        }
    }

    /// The final table's words for this run.
    pub fn label(&self) -> String {
        match self.mode {
            NixMode::Real { .. } => "real Nix store paths".to_owned(),
            NixMode::StandIn if self.own_dir => {
                format!("STAND-IN closures: plain directories, no Nix; store dir {}{}", self.dir, self.own_note())
            }
            NixMode::StandIn => "STAND-IN closures: plain directories, no Nix".to_owned(),
        }
    }

    fn own_note(&self) -> String {
        if self.own_dir {
            format!(" (as {}: /nix/store is not writable by this user)", StoreDir::ENV)
        } else {
            String::new()
        }
    }

    /// `NIX_STORE_DIR=… ` before a command that reads what this run stored,
    /// when its store directory is not `/nix/store`.
    pub fn env_prefix(&self) -> String {
        if self.dir.is_default() {
            String::new()
        } else {
            format!("{}={} ", StoreDir::ENV, self.dir)
        }
    }

    /// The programs the agents run as `nix-store` and `nix-env`.
    pub fn programs(&self) -> (PathBuf, PathBuf) {
        match self.mode {
            NixMode::Real { .. } => ("nix-store".into(), "nix-env".into()),
            NixMode::StandIn => (self.work.join("bin/nix-store"), self.work.join("bin/nix-env")),
        }
    }

    /// The environment the agents give `nix-store` and `nix-env`: the store
    /// directory, when it is not `/nix/store`.
    pub fn nix_env_vars(&self) -> Vec<(OsString, OsString)> {
        if self.dir.is_default() {
            Vec::new()
        } else {
            vec![(StoreDir::ENV.into(), self.dir.as_str().into())]
        }
    }

    /// A closure for `host` (`old` or `new`) whose switch repoints `link` and
    /// whose probe exits with `probe_exit`.
    pub async fn add(&mut self, host: &str, which: &str, link: &Path, probe_exit: i32) -> Result<Closure, DemoError> {
        let name = format!("nixos-system-{host}-{}-{which}", self.nonce);
        let closure = match self.mode {
            NixMode::Real { .. } => {
                let dir = self.work.join("closures").join(&name);
                write_closure(&dir, link, probe_exit)?;
                add_to_store(&dir).await?
            }
            NixMode::StandIn => {
                let path = format!("{}/{}-{name}", self.dir, standin_hash()?);
                let closure = Closure::parse(&path).map_err(setup("stand-in store path"))?;
                self.made.push(closure.clone());
                write_closure(Path::new(&path), link, probe_exit).map_err(|e| DemoError::NoStore(e.to_string()))?;
                closure
            }
        };
        if matches!(self.mode, NixMode::Real { .. }) {
            self.made.push(closure.clone());
        }
        Ok(closure)
    }

    /// Removes every closure this run made: stand-in directories outright,
    /// real store paths with `nix-store --delete` (best effort: the Nix
    /// garbage collector takes what is left).
    pub async fn remove_all(&mut self) {
        let made = std::mem::take(&mut self.made);
        match self.mode {
            NixMode::StandIn => {
                for closure in made {
                    let _ = std::fs::remove_dir_all(closure.as_str());
                }
            }
            NixMode::Real { .. } if !made.is_empty() => {
                let mut delete = Command::new("nix-store");
                delete.arg("--delete").args(made.iter().map(Closure::as_str)).kill_on_drop(true);
                let _ = delete.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status().await;
            }
            NixMode::Real { .. } => {}
        }
    }
}

/// `store/` in the work dir, by its canonical path: the agent resolves
/// `current-system` to a path without symlinks, and a closure is compared
/// as text.
fn own_store_dir(work: &Path) -> Result<StoreDir, DemoError> {
    let store = work.join("store");
    fs_err::create_dir_all(&store)?;
    let canonical = fs_err::canonicalize(&store)?;
    let text = canonical.to_str().ok_or_else(|| DemoError::Setup(format!("{} is not UTF-8", canonical.display())))?;
    StoreDir::parse(text).map_err(|e| DemoError::Setup(format!("the work dir's store: {e}")))
}

fn write_executable(path: &Path, text: &str) -> Result<(), DemoError> {
    fs_err::write(path, text)?;
    fs_err::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// A closure's files: the switch stand-in and the health checks.
fn write_closure(dir: &Path, link: &Path, probe_exit: i32) -> Result<(), DemoError> {
    fs_err::create_dir_all(dir.join("bin"))?;
    fs_err::create_dir_all(dir.join("etc/nixfleet/agent"))?;
    let link = link.display().to_string().replace('\'', r"'\''");
    let script = format!(
        "#!/bin/sh\n# nixfleet demo stand-in for switch-to-configuration\nset -e\nPATH=/usr/bin:/bin\n\
         self=$(cd \"$(dirname \"$0\")/..\" && pwd)\n\
         case \"$1\" in\n  switch|test) ln -sfn \"$self\" '{link}.tmp' && mv -T '{link}.tmp' '{link}' ;;\n  boot) ;;\n  *) exit 2 ;;\nesac\n"
    );
    write_executable(&dir.join("bin/switch-to-configuration"), &script)?;
    let checks = format!(
        r#"{{"probes":[{{"name":"app-selftest","kind":"exec","mode":"enforce","interval_secs":1,"argv":["/bin/sh","-c","exit {probe_exit}"],"timeout_secs":5}}]}}"#
    );
    fs_err::write(dir.join("etc/nixfleet/agent/health-checks.json"), checks)?;
    Ok(())
}

async fn add_to_store(dir: &Path) -> Result<Closure, DemoError> {
    let mut add = Command::new("nix-store");
    add.arg("--add").arg(dir).kill_on_drop(true);
    let out = add.output().await.map_err(|e| DemoError::NoNix(e.to_string()))?;
    if !out.status.success() {
        return Err(DemoError::NoNix(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    Closure::parse(String::from_utf8_lossy(&out.stdout).trim()).map_err(setup("store path"))
}

/// 32 random characters of Nix's base32 alphabet.
fn standin_hash() -> Result<String, DemoError> {
    let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(setup("randomness"))?;
    Ok(bytes.iter().map(|b| char::from(alphabet[usize::from(*b) % alphabet.len()])).collect())
}

/// Points `link` at `closure`, replacing what was there.
pub fn repoint(link: &Path, closure: &Closure) -> Result<(), DemoError> {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(closure.as_str(), link)?;
    Ok(())
}
