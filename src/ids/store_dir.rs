//! The Nix store directory that closures live in: `/nix/store`, or what
//! Nix's own `NIX_STORE_DIR` says (Nix reads the same variable: "overrides
//! the location of the Nix store"). A process has one store directory,
//! fixed before the first closure is parsed: the command entry point
//! (`main`) reads it from the environment with [`StoreDir::from_env`] and
//! sets it with [`init_store_dir`]; code that never sets it (the library in
//! tests) gets `/nix/store`, whatever the environment says, so in-process
//! tests never depend on the shell they run in. A test that needs another
//! store directory runs the binary as a child with the variable set.

use std::sync::OnceLock;

/// An absolute directory without a trailing slash, `.`/`..` components,
/// empty components or control characters: a prefix that cannot be read two
/// ways.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StoreDir(String);

/// Why a store directory was refused, naming the variable and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreDirError {
    #[error("{var}={value:?} is not a usable Nix store directory: {why}", var = StoreDir::ENV)]
    Invalid { value: String, why: &'static str },
    #[error("the store directory of this process is already {current}; it cannot become {wanted}")]
    AlreadySet { current: String, wanted: String },
}

impl StoreDir {
    /// Nix's default store directory (its `store-dir` build option).
    pub const DEFAULT: &'static str = "/nix/store";
    /// The variable Nix reads, read here too.
    pub const ENV: &'static str = "NIX_STORE_DIR";
    /// A store path is at most 4096 bytes; its directory leaves room for the
    /// 33-byte hash part and a name.
    const MAX_LEN: usize = 1024;

    /// `/nix/store`.
    pub fn nix_default() -> StoreDir {
        StoreDir(Self::DEFAULT.to_owned())
    }

    pub fn parse(text: &str) -> Result<StoreDir, StoreDirError> {
        let bad = |why| Err(StoreDirError::Invalid { value: text.chars().take(200).collect(), why });
        if !text.starts_with('/') {
            return bad("must be an absolute path (start with /)");
        }
        if text.ends_with('/') {
            return bad("must not end with / (write /nix/store, not /nix/store/)");
        }
        if text.len() > Self::MAX_LEN {
            return bad("longer than 1024 bytes");
        }
        if text.chars().any(char::is_control) {
            return bad("must not contain control characters");
        }
        for part in text[1..].split('/') {
            match part {
                "" => return bad("must not contain an empty component (//)"),
                "." | ".." => return bad("must not contain . or .. components"),
                _ => {}
            }
        }
        Ok(StoreDir(text.to_owned()))
    }

    /// `NIX_STORE_DIR` when set (validated), else `/nix/store`.
    pub fn from_env() -> Result<StoreDir, StoreDirError> {
        match std::env::var_os(Self::ENV) {
            None => Ok(StoreDir::nix_default()),
            Some(value) => match value.to_str() {
                Some(text) => StoreDir::parse(text),
                None => Err(StoreDirError::Invalid {
                    value: value.to_string_lossy().into_owned(),
                    why: "must be valid UTF-8",
                }),
            },
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is `/nix/store`.
    pub fn is_default(&self) -> bool {
        self.0 == Self::DEFAULT
    }
}

impl std::fmt::Display for StoreDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

static PROCESS_STORE_DIR: OnceLock<StoreDir> = OnceLock::new();

/// This process's store directory: the one [`init_store_dir`] set, else
/// `/nix/store` (fixed from then on).
pub fn store_dir() -> &'static StoreDir {
    PROCESS_STORE_DIR.get_or_init(StoreDir::nix_default)
}

/// Fixes this process's store directory. Call it before anything parses a
/// closure; setting the same directory again is fine, another one is
/// [`StoreDirError::AlreadySet`].
pub fn init_store_dir(dir: StoreDir) -> Result<&'static StoreDir, StoreDirError> {
    let set = PROCESS_STORE_DIR.get_or_init(|| dir.clone());
    if *set == dir {
        Ok(set)
    } else {
        Err(StoreDirError::AlreadySet { current: set.0.clone(), wanted: dir.0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_dirs_are_absolute_and_have_one_spelling() {
        for ok in ["/nix/store", "/tmp/nixfleet-demo-1a2b/store", "/s", "/home/a b/store"] {
            assert_eq!(StoreDir::parse(ok).expect(ok).as_str(), ok);
        }
        for (bad, why) in [
            ("", "absolute"),
            ("nix/store", "absolute"),
            ("./store", "absolute"),
            ("/", "end with /"),
            ("/nix/store/", "end with /"),
            ("/nix//store", "empty component"),
            ("/nix/../etc", ". or .."),
            ("/nix/./store", ". or .."),
            ("/nix/store/..", ". or .."),
            ("/nix/st\nore", "control"),
        ] {
            let err = StoreDir::parse(bad).expect_err(bad);
            let text = err.to_string();
            assert!(text.starts_with("NIX_STORE_DIR="), "{text}");
            assert!(text.contains(why), "{bad:?}: {text}");
        }
        assert!(StoreDir::parse(&format!("/{}", "a".repeat(1024))).is_err());
    }

    #[test]
    fn a_process_that_never_sets_it_uses_nix_store() {
        // No test in this process sets another store dir (they run the binary
        // for that), so this holds whatever order the tests run in.
        assert_eq!(store_dir().as_str(), "/nix/store");
        assert!(init_store_dir(StoreDir::nix_default()).is_ok(), "setting the same dir again is fine");
        let other = StoreDir::parse("/tmp/other/store").expect("valid");
        let err = init_store_dir(other).expect_err("another dir once fixed");
        assert!(err.to_string().contains("already /nix/store"), "{err}");
    }
}
