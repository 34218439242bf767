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

# Simulate thousands of seeds (release build) per fault profile; print the
# first failing seed with its report, or "all passed". SEEDS and HOSTS tune it.
sim-soak SEEDS="2000" HOSTS="12":
    #!/usr/bin/env bash
    set -uo pipefail
    cargo build --release --quiet
    for profile in light heavy; do
        for seed in $(seq 1 {{SEEDS}}); do
            if ! out=$(./target/release/nixfleet sim --seed "$seed" --hosts {{HOSTS}} --faults "$profile"); then
                echo "first failing seed: $seed (faults $profile)"
                echo "$out"
                exit 1
            fi
        done
        echo "faults $profile: seeds 1..{{SEEDS}} passed"
    done
    echo "all passed"
