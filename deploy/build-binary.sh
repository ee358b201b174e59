#!/usr/bin/env bash
# Builds the `dnd` binary the container images ship, exactly as CI checks it:
#   deploy/build-binary.sh [cpu|cuda] OUT_DIR
# The Dockerfiles call this script, so the image recipe cannot drift from what is tested.
set -euo pipefail
flavour="${1:-cpu}"
out="${2:-dist}"
cd "$(dirname "$0")/.."
features=()
case "$flavour" in
  cpu) ;;
  cuda) features=(--features cuda) ;;
  *) echo "usage: $0 [cpu|cuda] OUT_DIR" >&2; exit 2 ;;
esac
cargo build --release --locked -p dnd-cli "${features[@]}"
mkdir -p "$out"
target="${CARGO_TARGET_DIR:-target}"
install -m 0755 "$target/release/dnd" "$out/dnd"
"$out/dnd" --version
