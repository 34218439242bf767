#!/usr/bin/env bash
# Installs real Nix (Debian's nix-bin, Nix 2.8) for the activation tests and
# configures it for a single-user root store without a sandbox or build users
# (docs/protocol.md §6). Idempotent: safe to run on every CI run. Without root or apt the
# script says so and exits 0; the tests then use stand-in nix-store/nix-env.
set -euo pipefail

if ! command -v nix-store >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "nix-setup: nix-store missing and cannot install (need root + apt-get); tests will use stand-ins" >&2
        exit 0
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nix-bin >/dev/null
fi

if [ "$(id -u)" = 0 ]; then
    mkdir -p /etc/nix /nix/var/nix/profiles
    conf=/etc/nix/nix.conf
    want='# written by .ci/nix-setup.sh: root-only local store for tests
build-users-group =
sandbox = false
experimental-features = nix-command
substituters =
require-sigs = true'
    if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$want" ]; then
        printf '%s\n' "$want" > "$conf"
    fi
fi

echo "nix-setup: $(nix-store --version)"
