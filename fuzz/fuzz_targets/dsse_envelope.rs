//! The DSSE envelope parser (the body of `POST /v1/rollouts` and the agent's
//! cached envelopes), then verification against a fixed key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixfleet::sign;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = sign::parse_envelope(data) {
        let key = sign::SigningKey::from_seed(&[7u8; 32]);
        let _ = sign::verify_envelope(&envelope, &[key.public_key()]);
    }
});
