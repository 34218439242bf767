//! Identifiers that cross every boundary (`docs/protocol.md` §1): hostnames, rollout ids
//! and store-path closures. Each is a newtype that can only be built through
//! its parser, so a value of the type is always well-formed and the rest of
//! the code never re-validates. A closure's store directory is the
//! process's ([`store_dir`]: `/nix/store` or Nix's `NIX_STORE_DIR`).

mod store_dir;

pub use store_dir::{init_store_dir, store_dir, StoreDir, StoreDirError};

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A syntax error in an identifier, naming the kind of identifier and the
/// offending input so the message is actionable on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {why}")]
pub struct IdError {
    pub what: &'static str,
    pub input: String,
    pub why: Cow<'static, str>,
}

fn id_error(what: &'static str, input: &str, why: impl Into<Cow<'static, str>>) -> IdError {
    // Cap the echoed input: an identifier field may carry megabytes of junk.
    const MAX_ECHO_CHARS: usize = 80;
    let input = input.chars().take(MAX_ECHO_CHARS).collect();
    IdError { what, input, why: why.into() }
}

/// `[a-z0-9][a-z0-9-]{0,62}` (`docs/protocol.md` §1); with mTLS it equals the certificate CN.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Hostname(String);

/// The order of the bytes (the derived order), compared in a loop: a
/// hostname is a few bytes, and the CP's and the simulator's maps keyed
/// by host compare ~14 of them per lookup, where a call into libc's
/// `memcmp` cost more than the comparison (a fifth of a 10,000-host
/// simulation, `docs/simulator.md`).
impl Ord for Hostname {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        short_cmp(self.0.as_bytes(), other.0.as_bytes())
    }
}

/// The order of two byte strings (as `<[u8]>::cmp`), compared in a loop.
fn short_cmp(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    for (x, y) in a.iter().zip(b) {
        if x != y {
            return x.cmp(y);
        }
    }
    a.len().cmp(&b.len())
}

impl PartialOrd for Hostname {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Hostname {
    pub const MAX_LEN: usize = 63;

    pub fn parse(input: &str) -> Result<Hostname, IdError> {
        let bytes = input.as_bytes();
        if bytes.is_empty() {
            return Err(id_error("hostname", input, "must not be empty"));
        }
        if bytes.len() > Self::MAX_LEN {
            return Err(id_error("hostname", input, "longer than 63 characters"));
        }
        if !(bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit()) {
            return Err(id_error("hostname", input, "must start with [a-z0-9]"));
        }
        if !bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-') {
            return Err(id_error("hostname", input, "may only contain [a-z0-9-]"));
        }
        Ok(Hostname(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `{channel}@{ref}` (`docs/protocol.md` §1): channel `[a-z0-9_-]{1,64}`, ref
/// `[A-Za-z0-9._-]{1,128}`, exactly one `@`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RolloutId {
    full: String,
    at: usize,
}

/// The derived order (the text, then the `@`'s position, which the text
/// fixes), compared in a loop like [`Hostname`]'s: the CP's and the
/// agent's maps are keyed by rollout.
impl Ord for RolloutId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        short_cmp(self.full.as_bytes(), other.full.as_bytes()).then(self.at.cmp(&other.at))
    }
}

impl PartialOrd for RolloutId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl RolloutId {
    pub const MAX_CHANNEL_LEN: usize = 64;
    pub const MAX_REF_LEN: usize = 128;

    pub fn parse(input: &str) -> Result<RolloutId, IdError> {
        let what = "rollout id";
        let mut parts = input.split('@');
        let (Some(channel), Some(git_ref), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(id_error(what, input, "must contain exactly one '@' (channel@ref)"));
        };
        validate_channel(channel).map_err(|e| id_error(what, input, e.why))?;
        validate_ref(git_ref).map_err(|e| id_error(what, input, e.why))?;
        Ok(RolloutId { full: input.to_owned(), at: channel.len() })
    }

    pub fn new(channel: &str, git_ref: &str) -> Result<RolloutId, IdError> {
        RolloutId::parse(&format!("{channel}@{git_ref}"))
    }

    pub fn channel(&self) -> &str {
        &self.full[..self.at]
    }

    pub fn git_ref(&self) -> &str {
        &self.full[self.at + 1..]
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }
}

/// Checks a channel name: `[a-z0-9_-]{1,64}`.
pub fn validate_channel(channel: &str) -> Result<(), IdError> {
    let ok_len = !channel.is_empty() && channel.len() <= RolloutId::MAX_CHANNEL_LEN;
    if !ok_len {
        return Err(id_error("channel", channel, "must be 1 to 64 characters"));
    }
    let ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-';
    if !channel.as_bytes().iter().all(ok) {
        return Err(id_error("channel", channel, "may only contain [a-z0-9_-]"));
    }
    Ok(())
}

/// Checks a rollout ref: `[A-Za-z0-9._-]{1,128}`.
pub fn validate_ref(git_ref: &str) -> Result<(), IdError> {
    let ok_len = !git_ref.is_empty() && git_ref.len() <= RolloutId::MAX_REF_LEN;
    if !ok_len {
        return Err(id_error("ref", git_ref, "must be 1 to 128 characters"));
    }
    let ok = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if !git_ref.as_bytes().iter().all(ok) {
        return Err(id_error("ref", git_ref, "may only contain [A-Za-z0-9._-]"));
    }
    Ok(())
}

/// A full Nix store path of a system closure:
/// `/nix/store/<32 chars of nix base32>-<name>` (`docs/protocol.md` §1), in
/// this process's store directory ([`store_dir`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Closure(String);

impl Closure {
    const HASH_LEN: usize = 32;
    /// Nix limits store path names to 211 characters.
    const MAX_NAME_LEN: usize = 211;
    /// Nix's base32 alphabet (no e, o, u, t).
    const HASH_ALPHABET: &'static [u8] = b"0123456789abcdfghijklmnpqrsvwxyz";

    /// A store path in this process's store directory.
    pub fn parse(input: &str) -> Result<Closure, IdError> {
        Closure::parse_in(store_dir(), input)
    }

    /// A store path in `store`.
    pub fn parse_in(store: &StoreDir, input: &str) -> Result<Closure, IdError> {
        let what = "closure";
        let rest = input.strip_prefix(store.as_str()).and_then(|rest| rest.strip_prefix('/'));
        let Some(rest) = rest else {
            let why = if store.is_default() {
                Cow::Borrowed("must start with /nix/store/")
            } else {
                Cow::Owned(format!("must start with {store}/ (the store directory {} names)", StoreDir::ENV))
            };
            return Err(id_error(what, input, why));
        };
        let (hash, name) = match (rest.get(..Self::HASH_LEN), rest.get(Self::HASH_LEN..)) {
            (Some(hash), Some(name)) => (hash, name),
            _ => return Err(id_error(what, input, "store hash must be 32 characters")),
        };
        if !hash.bytes().all(|b| Self::HASH_ALPHABET.contains(&b)) {
            return Err(id_error(what, input, "store hash must be 32 characters of nix base32"));
        }
        let Some(name) = name.strip_prefix('-') else {
            return Err(id_error(what, input, "expected '-' and a name after the store hash"));
        };
        if name.is_empty() || name.len() > Self::MAX_NAME_LEN {
            return Err(id_error(what, input, "name must be 1 to 211 characters"));
        }
        let ok = |b: u8| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b);
        if name.starts_with('.') || !name.bytes().all(ok) {
            return Err(id_error(what, input, "name has characters Nix does not allow in a store path"));
        }
        Ok(Closure(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_id_impls {
    ($ty:ty, $as_str:expr) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str($as_str(self))
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str($as_str(self))
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                <$ty>::parse(&raw).map_err(serde::de::Error::custom)
            }
        }
        impl std::str::FromStr for $ty {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                <$ty>::parse(s)
            }
        }
    };
}

string_id_impls!(Hostname, Hostname::as_str);
string_id_impls!(RolloutId, RolloutId::as_str);
string_id_impls!(Closure, Closure::as_str);

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD_CLOSURE: &str = "/nix/store/0c3n4iv2w9ab1p6lq0yzf3d8k2m5r7s9-nixos-system-web-1-26.05";

    #[test]
    fn hostnames_follow_the_spec_grammar() {
        for ok in ["web-1", "a", "0", "db-primary-01", &"a".repeat(63)] {
            assert!(Hostname::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-web", "Web-1", "web_1", "web.example", &"a".repeat(64), "wéb"] {
            let err = Hostname::parse(bad).expect_err(bad);
            assert_eq!(err.what, "hostname");
        }
    }

    /// The hand-written order is the strings' order (prefixes, lengths,
    /// every byte position, the 63-byte bound).
    #[test]
    fn hostnames_order_as_their_strings() {
        let long = "a".repeat(63);
        let mut names =
            vec!["a", "a-", "a0", "ab", "b", "0", "9", "h00001", "h00010", "h0001", "web-1", "web-10", "web-2"];
        names.extend([long.as_str(), &long[..62], "z"]);
        for x in &names {
            for y in &names {
                let (hx, hy) = (Hostname::parse(x).expect("valid"), Hostname::parse(y).expect("valid"));
                assert_eq!(hx.cmp(&hy), x.cmp(y), "{x} vs {y}");
                assert_eq!(hx.partial_cmp(&hy), Some(x.cmp(y)), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn rollout_ids_order_as_their_text() {
        let ids = ["a@1", "a@10", "a@2", "a-b@1", "ab@1", "stable@r1", "stable@r10", "stable@r2", "z@0"];
        for x in ids {
            for y in ids {
                let (ix, iy) = (RolloutId::parse(x).expect("valid"), RolloutId::parse(y).expect("valid"));
                assert_eq!(ix.cmp(&iy), x.cmp(y), "{x} vs {y}");
                assert_eq!(ix.partial_cmp(&iy), Some(x.cmp(y)), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn rollout_ids_need_exactly_one_at() {
        let id = RolloutId::parse("stable@2026-11-25.1").expect("valid");
        assert_eq!(id.channel(), "stable");
        assert_eq!(id.git_ref(), "2026-11-25.1");
        for bad in ["stable", "a@b@c", "@ref", "chan@", "Stable@x", "s@ref/x", "s@ a"] {
            assert!(RolloutId::parse(bad).is_err(), "{bad}");
        }
        assert!(RolloutId::parse(&format!("{}@r", "c".repeat(65))).is_err());
        assert!(RolloutId::parse(&format!("c@{}", "r".repeat(129))).is_err());
        assert!(RolloutId::parse(&format!("{}@{}", "c".repeat(64), "R".repeat(128))).is_ok());
    }

    #[test]
    fn closures_are_full_store_paths() {
        assert!(Closure::parse(GOOD_CLOSURE).is_ok());
        for bad in [
            "nix/store/0c3n4iv2w9ab1p6lq0yzf3d8k2m5r7s9-x",
            "/nix/store/short-x",
            "/nix/store/0c3n4iv2w9ab1p6lq0yzf3d8k2m5r7s9",
            "/nix/store/0c3n4iv2w9ab1p6lq0yzf3d8k2m5r7s9-",
            "/nix/store/0c3n4iv2w9ab1p6lq0yzf3d8k2m5r7se-x", // 'e' is not nix base32
            "/nix/store/0c3n4iv2w9ab1p6lq0yzf3d8k2m5r7s9-a/b",
            "/nix/store/0c3n4iv2w9ab1p6lq0yzf3d8k2m5r7s9-a b",
        ] {
            let err = Closure::parse(bad).expect_err(bad);
            assert_eq!(err.what, "closure");
        }
    }

    #[test]
    fn closures_follow_the_store_directory_they_are_parsed_in() {
        let other = StoreDir::parse("/tmp/demo-1/store").expect("valid");
        let path = "/tmp/demo-1/store/0c3n4iv2w9ab1p6lq0yzf3d8k2m5r7s9-nixos-system-web-1";
        assert_eq!(Closure::parse_in(&other, path).expect("in its store").as_str(), path);
        let err = Closure::parse_in(&other, GOOD_CLOSURE).expect_err("a /nix/store path elsewhere");
        assert!(
            err.to_string().contains("must start with /tmp/demo-1/store/ (the store directory NIX_STORE_DIR"),
            "{err}"
        );
        // A prefix is a whole directory: /tmp/demo-1/storeX/... is not in /tmp/demo-1/store.
        for bad in [
            "/tmp/demo-1/storex/0c3n4iv2w9ab1p6lq0yzf3d8k2m5r7s9-x",
            "/tmp/demo-1/store0c3n4iv2w9ab1p6lq0yzf3d8k2m5r7s9-x",
        ] {
            assert!(Closure::parse_in(&other, bad).is_err(), "{bad}");
        }
        // This process never sets another store dir: parse is /nix/store's.
        assert!(Closure::parse(path).is_err());
        let err = Closure::parse("/gnu/store/0c3n4iv2w9ab1p6lq0yzf3d8k2m5r7s9-x").expect_err("other store");
        assert!(err.to_string().contains("must start with /nix/store/"), "{err}");
    }

    #[test]
    fn serde_rejects_malformed_ids_with_the_reason() {
        let err = serde_json::from_str::<Hostname>("\"Bad_Host\"").expect_err("must fail");
        assert!(err.to_string().contains("invalid hostname"), "{err}");
        let ok: Closure = serde_json::from_str(&format!("\"{GOOD_CLOSURE}\"")).expect("valid");
        assert_eq!(serde_json::to_string(&ok).expect("serialise"), format!("\"{GOOD_CLOSURE}\""));
    }
}
