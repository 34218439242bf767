#!/bin/sh
# nixfleet stand-in for nix-store, where Nix is absent: `nixfleet demo`
# hands it to its agents, the integration tests' Nix fixture to theirs.
# Store paths are plain directories in ${NIX_STORE_DIR:-/nix/store}.
# --realise: present, or copied from a file:// substituter in NIX_CONFIG
# whose .sig names a trusted key; --delete; --version. Messages follow
# Nix 2.8's wording.
PATH=/usr/bin:/bin
store="${NIX_STORE_DIR:-/nix/store}"
in_store() {
  case "$1" in
  "$store"/*/* | "$store"/. | "$store"/..) return 1 ;;
  "$store"/?*) return 0 ;;
  *) return 1 ;;
  esac
}
case "$1" in
--version) echo "nix-store (nixfleet stand-in) 0"; exit 0 ;;
--delete)
  shift
  for p in "$@"; do
    in_store "$p" || { echo "error: path '$p' is not in the Nix store" >&2; exit 1; }
  done
  rm -rf -- "$@"; exit 0 ;;
--realise) p="$2" ;;
*) echo "nixfleet stand-in nix-store: unsupported: $*" >&2; exit 2 ;;
esac
in_store "$p" || { echo "error: path '$p' is not in the Nix store" >&2; exit 1; }
if [ -d "$p" ]; then echo "$p"; exit 0; fi
name=$(basename "$p")
subs=$(printf '%s\n' "$NIX_CONFIG" | sed -n 's/^substituters *= *//p')
keys=$(printf '%s\n' "$NIX_CONFIG" | sed -n 's/^trusted-public-keys *= *//p')
for s in $subs; do
  d="${s#file://}"
  [ -d "$d/$name" ] || continue
  signer=$(cat "$d/$name.sig")
  for k in $keys; do
    if [ "${k%%:*}" = "$signer" ]; then cp -a "$d/$name" "$p"; echo "$p"; exit 0; fi
  done
  echo "warning: the substitute for '$p' from '$s' is not signed by any of the keys in 'trusted-public-keys'" >&2
done
echo "error: path '$p' is required, but there is no substituter that can build it" >&2
exit 1
