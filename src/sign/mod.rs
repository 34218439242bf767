//! Signed rollout manifests: DSSE envelopes over ed25519, and the key files
//! that go with them.
//!
//! A rollout manifest tells every host which closure to switch to, so the
//! control plane must not be able to invent one: the release key signs the
//! exact manifest bytes and both the CP and each agent check that signature
//! against their own trust keys (`docs/protocol.md` §2). The signed form is a DSSE envelope
//! (the in-toto / sigstore "Dead Simple Signing Envelope") because it signs
//! the payload *type* together with the bytes, which stops a signature made
//! for some other document from being replayed as a manifest, and because it
//! never re-serialises the payload, so there is no canonical-JSON problem.
//!
//! Everything here is pure except the explicitly named file helpers
//! (`load`, `write_keypair`), which the `keygen` and `manifest` tools call.

mod envelope;
mod keyfile;
mod keys;
#[cfg(test)]
mod tests;

pub use envelope::{
    pae, parse_envelope, sign_envelope, verify_envelope, Envelope, Signature, VerifyError, MAX_SIGNATURES, PAYLOAD_TYPE,
};
pub use keyfile::write_keypair;
pub use keys::{generate, PublicKey, SignError, SigningKey};
