//! The control plane's answers as the agent reads them: the body of a 2xx
//! through `HttpResponse::json` into each answer type the agent's wire
//! calls expect (`agent::net`: dispatch, event results, heartbeat), and
//! the body of an error status through `HttpResponse::error`. Network
//! bytes even behind mutual TLS: a value or an error, never a panic.
#![no_main]

use bytes::Bytes;
use hyper::{HeaderMap, StatusCode};
use libfuzzer_sys::fuzz_target;
use nixfleet::client::HttpResponse;
use nixfleet::wire::{Dispatch, EventBatchResponse, HeartbeatResponse};

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    let ok = HttpResponse { status: StatusCode::OK, headers: HeaderMap::new(), body: body.clone() };
    let _ = ok.json::<Dispatch>();
    let _ = ok.json::<EventBatchResponse>();
    let _ = ok.json::<HeartbeatResponse>();
    let refused = HttpResponse { status: StatusCode::BAD_REQUEST, headers: HeaderMap::new(), body };
    let _ = refused.error().to_string();
});
