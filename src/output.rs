//! Writing command output and errors: stdout is data, and a closed
//! stdout (`| head`) is not an error. Shared by the operator tools and the
//! `cp` commands.

use std::io::{self, Write};

/// Writes to stdout, treating a broken pipe as success: the reader has all
/// it wanted.
pub fn print_stdout(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// An error and its causes on one line ("a: b: c"): the top-level message
/// of a library error alone often hides the reason (an I/O error, a bad
/// certificate).
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
