//! The manifest validator on arbitrary payload bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixfleet::wire::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = Manifest::parse(data) {
        // A valid manifest serialises back and parses to itself.
        let again = serde_json::to_vec(&manifest.to_json()).expect("serialises");
        assert_eq!(Manifest::parse(&again).expect("round trip"), manifest);
    }
});
