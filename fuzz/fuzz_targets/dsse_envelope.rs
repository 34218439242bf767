//! The DSSE envelope parser and verifier as `POST /v1/rollouts` and the
//! agent's admission run them (`parse_envelope`, then `verify_envelope`
//! against trusted keys). Any input gives a value or an error, never a
//! panic; an envelope that parses, re-signed over its own payload with a
//! trusted key, verifies and gives back exactly that payload.
#![no_main]

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use nixfleet::sign;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = sign::parse_envelope(data) else { return };
    let key = sign::SigningKey::from_seed(&[7u8; 32]);
    let trusted = [key.public_key()];
    let _ = sign::verify_envelope(&envelope, &trusted);
    if let Ok(payload) = BASE64.decode(&envelope.payload) {
        let resigned = sign::sign_envelope(&key, &payload);
        assert_eq!(sign::verify_envelope(&resigned, &trusted).expect("verifies"), payload);
    }
});
