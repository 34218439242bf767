//! Read-mostly operator commands (manifest tools, queue inspection, replay,
//! the demo) and `error_chain` for `main.rs`. stdout is data, stderr is
//! diagnostics; a closed stdout (`| head`) is not an error ([`crate::output`]).

pub mod demo;
pub mod manifest_cmd;
pub mod pki;
pub mod queue_cmd;
pub mod replay;

/// Moved to [`crate::output`] (the control plane prints too); kept here
/// for `queue_cmd` and `replay`, which import it from this path.
pub use crate::output::print_stdout;

/// Moved to [`crate::output`] (the agent's probes use it too).
pub use crate::output::error_chain;
