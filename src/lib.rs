//! nixfleet: roll NixOS system closures out to a fleet in waves, with health
//! probes and autonomous rollback. The modules are listed in reading order:
//! identifiers and time first, then the pure state machine, then the formats
//! that cross a boundary (wire, signatures), then the tools.

pub mod agent;
pub mod cli;
pub mod clock;
pub mod cp;
pub mod ids;
pub mod machine;
pub mod queue;
pub mod sign;
pub mod tools;
pub mod wire;
