//! Seeded runs: a fixed list of seeds × fault profiles and scenarios.
