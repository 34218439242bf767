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

/// An error and its causes on one line: "a: b: c".
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}
