//! The demo's closures and the Nix it runs with. With `nix-store` on PATH the
//! closures are real store paths (`nix-store --add`) and the agents run the
//! real `nix-store`/`nix-env`. Without it the closures are plain directories
//! written under `/nix/store` (a closure is a `/nix/store` path on the wire,
//! `docs/protocol.md` §1), and the agents are configured with the demo's own
//! `nix-store`/`nix-env` stand-in scripts in the work dir: the stand-in sits
//! at the program boundary, the agent runs its one production code path.
//! In both modes each closure's only other stand-in is
//! `bin/switch-to-configuration` (it repoints that host's `current-system`).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::{setup, DemoError};
use crate::ids::Closure;

/// Where stand-in closures go: closures are `/nix/store` paths.
const STORE_DIR: &str = "/nix/store";

/// Stand-in `nix-store`: `--realise P` succeeds when the directory exists.
const STANDIN_NIX_STORE: &str = r#"#!/bin/sh
# nixfleet demo stand-in for nix-store (no Nix on this machine)
PATH=/usr/bin:/bin
case "$1" in
--version) echo "nix-store (nixfleet demo stand-in)" ;;
--realise) [ -d "$2" ] && echo "$2" || { echo "error: path '$2' does not exist" >&2; exit 1; } ;;
*) echo "nixfleet demo stand-in nix-store: unsupported: $*" >&2; exit 2 ;;
esac
"#;

/// Stand-in `nix-env -p PROFILE --set P`: numbered generation links, as Nix makes.
const STANDIN_NIX_ENV: &str = r#"#!/bin/sh
# nixfleet demo stand-in for nix-env (no Nix on this machine)
PATH=/usr/bin:/bin
[ "$1" = "-p" ] && [ "$3" = "--set" ] || { echo "nixfleet demo stand-in nix-env: unsupported: $*" >&2; exit 2; }
profile="$2"; p="$4"
[ -d "$p" ] || { echo "error: path '$p' is not valid" >&2; exit 1; }
n=1
while [ -e "$profile-$n-link" ] || [ -L "$profile-$n-link" ]; do n=$((n+1)); done
ln -s "$p" "$profile-$n-link"
ln -sfn "$(basename "$profile")-$n-link" "$profile.tmp" && mv -T "$profile.tmp" "$profile"
"#;

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

    /// The first line's words for this mode.
    pub fn headline(&self) -> String {
        match self {
            NixMode::Real { version } => format!("with Nix ({version}): closures are real store paths"),
            NixMode::StandIn => "WITHOUT Nix (no nix-store on PATH): STAND-IN closures, plain directories under \
                                 /nix/store, and stand-in nix-store/nix-env scripts"
                .to_owned(),
        }
    }

    /// The final table's words for this mode.
    pub fn label(&self) -> &'static str {
        match self {
            NixMode::Real { .. } => "real Nix store paths",
            NixMode::StandIn => "STAND-IN closures: plain directories, no Nix",
        }
    }
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Makes closures in one mode and remembers them for [`Store::remove_all`].
#[derive(Debug)]
pub struct Store {
    pub mode: NixMode,
    work: PathBuf,
    nonce: String,
    made: Vec<Closure>,
}

impl Store {
    pub fn new(mode: NixMode, work: &Path, nonce: &str) -> Result<Store, DemoError> {
        if mode == NixMode::StandIn {
            let bin = work.join("bin");
            fs_err::create_dir_all(&bin)?;
            write_executable(&bin.join("nix-store"), STANDIN_NIX_STORE)?;
            write_executable(&bin.join("nix-env"), STANDIN_NIX_ENV)?;
            fs_err::create_dir_all(STORE_DIR).map_err(|e| DemoError::NoStore(e.to_string()))?;
        }
        Ok(Store { mode, work: work.to_owned(), nonce: nonce.to_owned(), made: Vec::new() })
    }

    /// The programs the agents run as `nix-store` and `nix-env`.
    pub fn programs(&self) -> (PathBuf, PathBuf) {
        match self.mode {
            NixMode::Real { .. } => ("nix-store".into(), "nix-env".into()),
            NixMode::StandIn => (self.work.join("bin/nix-store"), self.work.join("bin/nix-env")),
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
                let path = format!("{STORE_DIR}/{}-{name}", standin_hash()?);
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
