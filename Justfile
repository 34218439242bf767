# Developer entry points. CI runs .ci/run, which runs the same checks as `just ci`.

# Run the test suite (the README's test command).
test:
    cargo test

# Format check and clippy with warnings as errors.
lint:
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings

# Everything CI runs.
ci:
    bash .ci/run

# Benchmarks: each prints its own baseline measured in the same run.
bench:
    cargo bench

# A fully static release binary (glibc, crt-static), checked with ldd.
static:
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target x86_64-unknown-linux-gnu
    ldd target/x86_64-unknown-linux-gnu/release/nixfleet || true
    file target/x86_64-unknown-linux-gnu/release/nixfleet
