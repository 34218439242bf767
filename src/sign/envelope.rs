//! DSSE envelopes: the pre-authentication encoding, signing a manifest into
//! an envelope, parsing one, and verifying it against trusted keys.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::Signer as _;
use serde::{Deserialize, Serialize};

use super::keys::{PublicKey, SigningKey};

/// The DSSE `payloadType` of a rollout manifest. It is covered by the
/// signature, so an envelope signed for any other type never verifies as a
/// manifest.
pub const PAYLOAD_TYPE: &str = "application/vnd.nixfleet.rollout+json";

/// Length of an ed25519 signature.
const SIGNATURE_BYTES: usize = 64;

/// Upper bound on signatures in one envelope. A release is signed by one key,
/// by two during a key rotation; eight leaves headroom. Each signature may be
/// tried against every trusted key, so an envelope with thousands of entries
/// is only good for burning the verifier's CPU, and is refused.
pub const MAX_SIGNATURES: usize = 8;

/// A DSSE envelope as it appears on the wire and on disk.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// Standard base64 of the exact manifest bytes.
    pub payload: String,
    pub signatures: Vec<Signature>,
}

/// One signature inside an [`Envelope`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// Which key made the signature (see [`PublicKey::keyid`]); a hint only.
    pub keyid: String,
    /// Standard base64 of the 64-byte ed25519 signature over
    /// `pae(payloadType, payload)`.
    pub sig: String,
}

/// A secret ed25519 key that can sign manifests.
/// action (wrong file, wrong trust key, tampered manifest), so they stay
/// distinct.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("envelope is not a valid DSSE envelope: {reason}")]
    Malformed { reason: String },

    #[error("envelope payloadType is {got:?}, expected {expected:?}", expected = PAYLOAD_TYPE)]
    WrongPayloadType { got: String },

    #[error("envelope payload is not valid standard base64")]
    BadPayloadEncoding,

    #[error("envelope has no signatures")]
    NoSignatures,

    #[error("envelope has {count} signatures, more than the limit of {limit}")]
    TooManySignatures { count: usize, limit: usize },

    #[error("signature with keyid {keyid:?} is not 64 bytes of standard base64")]
    BadSignatureEncoding { keyid: String },

    #[error(
        "signature by trusted key {keyid} does not verify, so the payload or payloadType was changed after signing"
    )]
    BadSignature { keyid: String },

    #[error("no signature is from a trusted key (signature keyids: {keyids:?})")]
    UnknownKey { keyids: Vec<String> },
}

/// DSSE pre-authentication encoding: the exact bytes that get signed.
/// Length-prefixing both fields makes the encoding unambiguous, so no
/// (type, payload) pair can be re-split into another.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let type_len = payload_type.len().to_string();
    let payload_len = payload.len().to_string();
    let mut out = Vec::with_capacity(
        "DSSEv1".len() + 4 + type_len.len() + payload_type.len() + payload_len.len() + payload.len(),
    );
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(type_len.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_len.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

/// Sign `payload` (the exact manifest bytes) as a DSSE envelope.
pub fn sign_envelope(key: &SigningKey, payload: &[u8]) -> Envelope {
    let sig = key.0.sign(&pae(PAYLOAD_TYPE, payload));
    Envelope {
        payload_type: PAYLOAD_TYPE.to_owned(),
        payload: BASE64.encode(payload),
        signatures: vec![Signature { keyid: key.public_key().keyid(), sig: BASE64.encode(sig.to_bytes()) }],
    }
}

/// Parse an envelope from JSON. Unknown fields are ignored, as DSSE allows.
/// The caller bounds the size of `bytes` (HTTP body limit, file size).
pub fn parse_envelope(bytes: &[u8]) -> Result<Envelope, VerifyError> {
    serde_json::from_slice(bytes).map_err(|err| VerifyError::Malformed { reason: err.to_string() })
}

/// Check `env` against `trusted` and return the payload bytes it vouches for.
///
/// Accepted if any signature verifies (strictly) under any trusted key. A
/// signature's keyid only selects which trusted keys to try; when it names
/// none of them (empty, unknown) every trusted key is tried, so a keyid can
/// never make an untrusted key count. Every signature must be well formed,
/// even if another one verifies: a corrupt entry means the envelope was
/// damaged or crafted, and it is refused whole.
pub fn verify_envelope(env: &Envelope, trusted: &[PublicKey]) -> Result<Vec<u8>, VerifyError> {
    if env.payload_type != PAYLOAD_TYPE {
        return Err(VerifyError::WrongPayloadType { got: env.payload_type.clone() });
    }
    let payload = BASE64.decode(&env.payload).map_err(|_| VerifyError::BadPayloadEncoding)?;
    if env.signatures.is_empty() {
        return Err(VerifyError::NoSignatures);
    }
    if env.signatures.len() > MAX_SIGNATURES {
        return Err(VerifyError::TooManySignatures { count: env.signatures.len(), limit: MAX_SIGNATURES });
    }
    let decoded = env
        .signatures
        .iter()
        .map(|s| Ok((s.keyid.as_str(), decode_signature(s)?)))
        .collect::<Result<Vec<_>, VerifyError>>()?;

    let message = pae(&env.payload_type, &payload);
    let trusted_ids: Vec<(String, &PublicKey)> = trusted.iter().map(|k| (k.keyid(), k)).collect();
    let mut first_bad_trusted: Option<&str> = None;
    for (keyid, sig) in &decoded {
        let named: Vec<&PublicKey> = trusted_ids.iter().filter(|(id, _)| id == keyid).map(|(_, key)| *key).collect();
        let candidates: Vec<&PublicKey> = if named.is_empty() { trusted.iter().collect() } else { named.clone() };
        if candidates.iter().any(|key| key.0.verify_strict(&message, sig).is_ok()) {
            return Ok(payload);
        }
        if !named.is_empty() && first_bad_trusted.is_none() {
            first_bad_trusted = Some(keyid);
        }
    }
    match first_bad_trusted {
        Some(keyid) => Err(VerifyError::BadSignature { keyid: keyid.to_owned() }),
        None => Err(VerifyError::UnknownKey { keyids: env.signatures.iter().map(|s| s.keyid.clone()).collect() }),
    }
}

fn decode_signature(sig: &Signature) -> Result<ed25519_dalek::Signature, VerifyError> {
    let bad = || VerifyError::BadSignatureEncoding { keyid: sig.keyid.clone() };
    let bytes = BASE64.decode(&sig.sig).map_err(|_| bad())?;
    let bytes: [u8; SIGNATURE_BYTES] = bytes.try_into().map_err(|_| bad())?;
    Ok(ed25519_dalek::Signature::from_bytes(&bytes))
}
