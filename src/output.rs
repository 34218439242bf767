//! Writing command output: stdout is data, and a closed
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
