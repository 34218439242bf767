//! The agent's queue record reader and its sidecars, on arbitrary file bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixfleet::queue::record;

fuzz_target!(|data: &[u8]| {
    let _ = record::decode_header(data);
    let _ = record::decode(data);
    let _ = record::DeadReason::decode(data);
    let _ = record::RevivedNote::decode(data);
});
