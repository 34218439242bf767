//! Read-mostly operator commands (manifest tools, queue inspection, replay,
//! the demo, pki). stdout is data, stderr is
//! diagnostics; a closed stdout (`| head`) is not an error ([`crate::output`]).

pub mod demo;
pub mod manifest_cmd;
pub mod pki;
pub mod pki_export;
pub mod queue_cmd;
pub mod replay;
