//! Signing and public keys: their one-line text form, keyids, and reading
//! them from key files.

use std::io::Read;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha2::{Digest as _, Sha256};

/// First line of a secret key file. Versioned so that a future key type or
/// encoding is a clear "unknown format" instead of a silent misparse.
const SECRET_KEY_PREFIX: &str = "nixfleet-ed25519-secret-v1:";

/// First line of a public key file; see [`SECRET_KEY_PREFIX`].
const PUBLIC_KEY_PREFIX: &str = "nixfleet-ed25519-public-v1:";

/// Length of an ed25519 seed and of an encoded ed25519 public key.
pub(super) const KEY_BYTES: usize = 32;

/// How much of sha256(public key) forms the keyid. 128 bits cannot collide
/// by accident among a handful of trust keys, and the keyid is only a hint
/// for which key to try (never a reason to trust), so a shorter id that fits
/// on a log line is enough.
const KEYID_BYTES: usize = 16;

/// Upper bound on a key file. A key file is one line of about 72 bytes; the
/// limit only exists so that pointing `--key` at a large file by mistake (a
/// manifest, a closure) fails at once with "not a key" instead of reading it
/// all into memory.
const MAX_KEY_FILE_BYTES: u64 = 4096;

#[derive(Clone)]
pub struct SigningKey(pub(super) ed25519_dalek::SigningKey);

/// A public ed25519 key that manifests are verified against.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(pub(super) ed25519_dalek::VerifyingKey);

/// Failures while creating, reading or writing keys.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// Reading or writing a key file failed; fs_err puts the operation and
    /// the path into the message.
    #[error("key file I/O failed: {0}")]
    Io(#[from] std::io::Error),

    #[error("key file {path} is larger than {limit} bytes, so it is not a nixfleet key file")]
    KeyFileTooLarge { path: PathBuf, limit: u64 },

    /// `origin` is "key text" or "key file PATH".
    #[error("{origin} holds a nixfleet public key, but a secret key is needed here")]
    PublicKeyGivenAsSecret { origin: String },

    /// `origin` is "key text" or "key file PATH".
    #[error("{origin} holds a nixfleet secret key, but a public key is expected here")]
    SecretKeyGivenAsPublic { origin: String },

    /// `expected` is "secret" or "public"; `reason` never quotes secret
    /// material.
    #[error("{origin} is not a nixfleet {expected} key: {reason}")]
    BadKeyText { origin: String, expected: &'static str, reason: String },

    #[error("refusing to overwrite existing key file {path}")]
    KeyExists { path: PathBuf },

    #[error("cannot get randomness from the operating system for a new key: {0}")]
    Randomness(getrandom::Error),
}

/// Why an envelope was not accepted. Each variant is a different operator
impl SigningKey {
    /// A key from its 32-byte seed (the RFC 8032 "secret key").
    pub fn from_seed(seed: &[u8; KEY_BYTES]) -> Self {
        SigningKey(ed25519_dalek::SigningKey::from_bytes(seed))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Parse `nixfleet-ed25519-secret-v1:<base64 seed>`; trailing whitespace
    /// (the file's newline) is ignored.
    pub fn from_text(text: &str) -> Result<Self, SignError> {
        Self::parse(text, "key text")
    }

    /// The one-line text form, without a trailing newline.
    pub fn to_text(&self) -> String {
        format!("{SECRET_KEY_PREFIX}{}", BASE64.encode(self.0.to_bytes()))
    }

    /// Read a secret key file written by [`super::write_keypair`].
    pub fn load(path: &Path) -> Result<Self, SignError> {
        let text = read_key_file(path, "secret")?;
        Self::parse(&text, &file_origin(path))
    }

    fn parse(text: &str, origin: &str) -> Result<Self, SignError> {
        let line = text.trim_end();
        let Some(encoded) = line.strip_prefix(SECRET_KEY_PREFIX) else {
            if line.starts_with(PUBLIC_KEY_PREFIX) {
                return Err(SignError::PublicKeyGivenAsSecret { origin: origin.to_owned() });
            }
            return Err(missing_prefix(origin, "secret", SECRET_KEY_PREFIX));
        };
        let seed = decode_key_bytes(encoded, origin, "secret")?;
        Ok(Self::from_seed(&seed))
    }
}

impl std::fmt::Debug for SigningKey {
    // Print only the keyid: a secret key must never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("keyid", &self.public_key().keyid()).finish_non_exhaustive()
    }
}

impl PublicKey {
    /// Lowercase hex of the first 16 bytes of sha256(raw 32-byte key).
    pub fn keyid(&self) -> String {
        let digest = Sha256::digest(self.0.as_bytes());
        hex_lower(&digest[..KEYID_BYTES])
    }

    /// The raw 32-byte encoded point.
    pub fn to_bytes(&self) -> [u8; KEY_BYTES] {
        self.0.to_bytes()
    }

    /// Parse `nixfleet-ed25519-public-v1:<base64 key>`; trailing whitespace
    /// (the file's newline) is ignored.
    pub fn from_text(text: &str) -> Result<Self, SignError> {
        Self::parse(text, "key text")
    }

    /// The one-line text form, without a trailing newline.
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_KEY_PREFIX}{}", BASE64.encode(self.0.as_bytes()))
    }

    /// Read a public key file written by [`super::write_keypair`].
    pub fn load(path: &Path) -> Result<Self, SignError> {
        let text = read_key_file(path, "public")?;
        Self::parse(&text, &file_origin(path))
    }

    fn parse(text: &str, origin: &str) -> Result<Self, SignError> {
        let line = text.trim_end();
        let Some(encoded) = line.strip_prefix(PUBLIC_KEY_PREFIX) else {
            if line.starts_with(SECRET_KEY_PREFIX) {
                return Err(SignError::SecretKeyGivenAsPublic { origin: origin.to_owned() });
            }
            return Err(missing_prefix(origin, "public", PUBLIC_KEY_PREFIX));
        };
        let bytes = decode_key_bytes(encoded, origin, "public")?;
        let bad = |reason: &str| SignError::BadKeyText {
            origin: origin.to_owned(),
            expected: "public",
            reason: reason.to_owned(),
        };
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| bad("the 32 bytes are not a point on the ed25519 curve"))?;
        // A small-order point is never produced by key generation; trusting
        // one could only be a mistake or an attack, so say so at load time
        // rather than failing every verification later.
        if key.is_weak() {
            return Err(bad("the key is a small-order (weak) point"));
        }
        Ok(PublicKey(key))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey").field("keyid", &self.keyid()).finish()
    }
}

/// A fresh signing key from the operating system's randomness.
pub fn generate() -> Result<SigningKey, SignError> {
    let mut seed = [0u8; KEY_BYTES];
    getrandom::fill(&mut seed).map_err(SignError::Randomness)?;
    Ok(SigningKey::from_seed(&seed))
}

/// Generate a key pair and write `PREFIX.key` (mode 0600) and `PREFIX.pub`
fn file_origin(path: &Path) -> String {
    format!("key file {}", path.display())
}

fn missing_prefix(origin: &str, expected: &'static str, prefix: &str) -> SignError {
    SignError::BadKeyText { origin: origin.to_owned(), expected, reason: format!("it does not start with {prefix:?}") }
}

/// Decode the base64 part of a key line into exactly 32 bytes. The base64
/// error itself is not quoted: for a secret key it would echo key material.
fn decode_key_bytes(encoded: &str, origin: &str, expected: &'static str) -> Result<[u8; KEY_BYTES], SignError> {
    let bad = |reason: String| SignError::BadKeyText { origin: origin.to_owned(), expected, reason };
    let bytes =
        BASE64.decode(encoded).map_err(|_| bad("the text after the prefix is not valid standard base64".to_owned()))?;
    let len = bytes.len();
    bytes.try_into().map_err(|_| bad(format!("the key is {len} bytes long, expected {KEY_BYTES}")))
}

fn read_key_file(path: &Path, expected: &'static str) -> Result<String, SignError> {
    let file = fs_err::File::open(path)?;
    let mut bytes = Vec::new();
    // Read one byte past the limit so "exactly at the limit" and "over it"
    // are told apart without trusting metadata (the path may be a pipe).
    file.take(MAX_KEY_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(SignError::KeyFileTooLarge { path: path.to_owned(), limit: MAX_KEY_FILE_BYTES });
    }
    String::from_utf8(bytes).map_err(|_| SignError::BadKeyText {
        origin: file_origin(path),
        expected,
        reason: "the file is not UTF-8 text".to_owned(),
    })
}

/// `prefix` + `suffix` as a path. `Path::with_extension` would instead
/// replace a dotted prefix such as `release.2026`.
pub(super) fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}
