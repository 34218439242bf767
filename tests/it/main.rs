//! The one integration-test binary: runs the real `nixfleet` executable for
//! CLI, crash and fleet tests (STYLE.md §11), and the agent's parts against
//! real Nix, real processes and real sockets.

mod activation;
mod cli;
mod cp;
mod harness;
pub mod nixenv;
mod probes;
mod queue;
mod workers;
