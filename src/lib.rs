//! nixfleet: roll NixOS system closures out to a fleet in waves, with health
//! probes and autonomous rollback. The modules are listed in reading order:
//! identifiers and time, the pure state machine, the formats that cross a
//! boundary (wire, signatures), what both roles share (TLS, the HTTP client,
//! the shutdown signal, service-manager notifications, stdout output), the
//! agent's durable queue, the two roles (control plane, agent; neither names
//! the other), then the operator tools and the command line.

pub mod ids;
pub mod clock;
pub mod machine;
pub mod wire;
pub mod sign;
pub mod tls;
pub mod client;
pub mod signal;
pub mod sdnotify;
pub mod output;
pub mod queue;
pub mod cp;
pub mod agent;
pub mod tools;
pub mod cli;
pub mod sim;
