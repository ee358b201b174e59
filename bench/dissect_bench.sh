#!/usr/bin/env bash
# Seconds per neuron of `dnd dissect` with the tiny fixture models, cold cache and warm
# cache, and the share of model work (captions, generated images, LLM replies) the caches
# saved. Usage: bench/dissect_bench.sh [LAYER4_NEURONS]   (from the repository root; all 10 fc units too)
# Needs a release build: cargo build --release -p dnd-cli
set -euo pipefail
n="${1:-16}"
bin="${CARGO_TARGET_DIR:-target}/release/dnd"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
run() {
  "$bin" dissect --config tests/fixtures/tiny-job.toml --out "$out" --name "$1" \
    --neurons "layer4=0..$n" --neurons "fc=all" --summary-json "$out/$1.json" > /dev/null
  python3 - "$out/$1.json" "$1" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
c = s["cache"]
calls = {k: c[k]["misses"] for k in c}
reused = {k: c[k]["hits"] for k in c}
total = sum(calls.values()) + sum(reused.values())
print(f"{sys.argv[2]:>5}: {s['neurons']} neurons, {s['seconds_per_neuron']:.3f} s/neuron (describe {s['describe_seconds']:.1f} s, "
      f"probe {s['probe_seconds']:.1f} s, load {s['load_seconds']:.1f} s), peak {s['peak_rss_mib']:.0f} MiB; "
      f"model calls {calls}, served from cache {reused} = {100 * s['cache_hit_rate']:.0f}% of {total}")
PY
}
run cold
run warm
