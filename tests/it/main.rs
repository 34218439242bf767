//! The one integration-test binary: runs the real `nixfleet` executable for
//! CLI, crash and fleet tests (STYLE.md §11).

mod cli;
