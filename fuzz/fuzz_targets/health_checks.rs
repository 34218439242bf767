//! The health-checks file parser (and its topology) on arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixfleet::agent::probes::HealthChecks;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(checks) = HealthChecks::parse(text) {
            let _ = checks.topology();
        }
    }
});
