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

# Benchmarks: each prints its own baseline measured in the same run. Their
# printed lines, dated, then replace the generated section at the end of
# docs/performance.md (the table above it is collected from them by hand).
bench:
    #!/usr/bin/env bash
    set -euo pipefail
    out=$(mktemp)
    trap 'rm -f "$out"' EXIT
    cargo bench | tee "$out"
    just bench-record "$out"

# Writes the stdout of a `cargo bench` run (a saved FILE), dated, into the
# generated section of docs/performance.md, replacing what was there.
bench-record FILE:
    #!/usr/bin/env bash
    set -euo pipefail
    doc=docs/performance.md
    marker='<!-- Everything below this line is written by `just bench`. -->'
    if ! grep -qxF "$marker" "$doc"; then
        echo "$doc has no line: $marker" >&2
        exit 1
    fi
    tmp=$(mktemp)
    {
        awk -v m="$marker" '{ print } $0 == m { exit }' "$doc"
        echo
        echo "## Latest \`just bench\` output"
        echo
        echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') at $(git rev-parse --short HEAD 2>/dev/null || echo 'an unknown commit')" \
            "on $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) when it was recorded."
        echo
        echo '```text'
        cat "{{FILE}}"
        echo '```'
    } > "$tmp"
    mv "$tmp" "$doc"
    echo "wrote the bench output into $doc"

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

# Fuzz each byte parser (wire decoders, manifest validator, DSSE envelope,
# queue record reader, health-checks file, the CP's answers to the agent)
# for SECS seconds with cargo-fuzz on the nightly toolchain. Without
# either, says so and exits 0 (`cargo test` never needs them). A crash
# leaves its input in fuzz/artifacts/TARGET/; make it a regression test in
# `cargo test`.
fuzz SECS="60":
    #!/usr/bin/env bash
    set -uo pipefail
    if ! cargo +nightly --version >/dev/null 2>&1; then
        echo "just fuzz: no nightly toolchain (rustup toolchain install nightly); skipped"
        exit 0
    fi
    if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
        echo "just fuzz: cargo-fuzz is not installed (cargo install cargo-fuzz); skipped"
        exit 0
    fi
    failed=0
    for target in wire_decoders manifest dsse_envelope queue_record health_checks agent_answers; do
        echo "== fuzz $target for {{SECS}} s"
        # Valid inputs to start from (fuzz/seeds/TARGET/, in git) next to the
        # grown corpus (fuzz/corpus/TARGET/, not in git).
        mkdir -p "fuzz/corpus/$target"
        dirs=("fuzz/corpus/$target")
        [ -d "fuzz/seeds/$target" ] && dirs+=("fuzz/seeds/$target")
        if ! cargo +nightly fuzz run "$target" "${dirs[@]}" -- -max_total_time={{SECS}} -rss_limit_mb=2048 -max_len=65536; then
            echo "fuzz $target: crash; the input is in fuzz/artifacts/$target/"
            failed=1
        fi
    done
    exit $failed
