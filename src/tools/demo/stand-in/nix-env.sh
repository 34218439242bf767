#!/bin/sh
# nixfleet stand-in for `nix-env -p PROFILE --set PATH`, where Nix is absent
# (`nixfleet demo`, the integration tests' Nix fixture): numbered
# generation links, as Nix makes them.
PATH=/usr/bin:/bin
[ "$1" = "-p" ] && [ "$3" = "--set" ] || { echo "nixfleet stand-in nix-env: unsupported: $*" >&2; exit 2; }
profile="$2"; p="$4"
[ -d "$p" ] || { echo "error: path '$p' is not valid" >&2; exit 1; }
n=1
while [ -e "$profile-$n-link" ] || [ -L "$profile-$n-link" ]; do n=$((n+1)); done
ln -s "$p" "$profile-$n-link"
ln -sfn "$(basename "$profile")-$n-link" "$profile.tmp" && mv -T "$profile.tmp" "$profile"
