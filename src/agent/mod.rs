//! The host agent (`nixfleet agent`). One reducer owns the per-rollout
//! records and is the only caller of `step`; workers (long-poll,
//! activation, probes, tick, heartbeat, drainer) feed it; commands run only
//! after the outbound event is durable in the queue. Reading order:
//! `rollouts` (pure bookkeeping), `reducer`, `admission`, `journal`, `rebuild`,
//! `activation`, `probes`, `workers`, `net`, `runtime`, `cmd`.

pub mod activation;
pub mod admission;
pub mod backoff;
pub mod channels;
pub mod cmd;
pub mod journal;
pub mod net;
pub mod probes;
pub mod rebuild;
pub mod reducer;
pub mod rollouts;
pub mod runtime;
pub mod workers;

/// Test support, compiled only for tests: the unit tests (`cfg(test)`) and
/// `tests/it` (the `testkit` feature, which the crate's dev-dependency on
/// itself turns on for `cargo test`); never in the product.
#[cfg(any(test, feature = "testkit"))]
#[doc(hidden)]
pub mod testkit;
