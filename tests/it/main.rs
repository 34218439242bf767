//! The one integration-test binary: runs the real `nixfleet` executable.

mod cp;
mod harness;
