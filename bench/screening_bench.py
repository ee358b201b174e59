#!/usr/bin/env python3
"""Screening (successive halving over candidates) against the full method, on the zoo.

    python bench/screening_bench.py [--dnd PATH] [--config crates/dnd-synth/zoo/dissect.toml]
        [--first 2,3,5] [--keep 0.5] [--labels 3] [--summarizer stub|job] [--workdir DIR]
        [--json FILE]

Runs `dnd dissect` on the zoo's job once as written (every candidate gets all of
`images_per_concept` images) and once per `[generator.screening]` setting (`first_images`
from --first, `keep` from --keep), each into a fresh output directory so nothing comes
from a cache. For each setting it prints the images generated (the image cache's misses),
the share saved against the full run, and how often the labels agree with the full
run's: the top label, and the reported labels as a set (same labels, any order). Needs
pyarrow to read the tables.

The zoo's own summariser (`consensus`) gives about 2 candidates per neuron, too few for
screening to drop any; by default the summariser is bench/llm_stub.py's `pick` rule
instead (each summary round answers with one of the neuron's own simplified captions, so
5 rounds give up to 5 candidates per neuron, as the method's LLM gives 3 to 5), for every
run alike. `--summarizer job` keeps the job's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from dissect_vs_python import Stub

ROOT = Path(__file__).resolve().parent.parent


def default_dnd() -> Path:
    target = os.environ.get("CARGO_TARGET_DIR")
    return (Path(target) if target else ROOT / "target") / "release" / "dnd"


def dissect(args, config: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    summary = out.parent / f"{out.name}.json"
    started = time.perf_counter()
    subprocess.run([str(args.dnd), "dissect", "--config", str(config), "--out", str(out),
                    "--name", "run", "--summary-json", str(summary)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    results = out / "jobs" / "run" / "results"
    labels = {}
    for row in pq.read_table(results / "descriptions.parquet").to_pylist():
        labels[(row["layer"], row["neuron"])] = [
            row[k] for k in ("label", "label_2", "label_3") if row[k] is not None]
    candidates = pq.read_table(results / "candidates.parquet").to_pylist()
    images = json.loads(summary.read_text())["cache"]["images"]["misses"]
    return {"wall": wall, "labels": labels, "images": images,
            "candidates": len(candidates), "neurons": len(labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dnd", type=Path, default=default_dnd())
    parser.add_argument("--config", type=Path, default=ROOT / "crates/dnd-synth/zoo/dissect.toml")
    parser.add_argument("--first", default="2,3,5", help="first_images settings to try")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--labels", type=int, default=3, help="scoring.labels for every run")
    parser.add_argument("--summarizer", choices=("stub", "job"), default="stub")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dnd-screening"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.dnd.is_file():
        raise SystemExit(f"no dnd binary at {args.dnd} (cargo build --release -p dnd-cli, or --dnd)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = args.config.read_text()
    if "[generator.screening]" in base:
        raise SystemExit(f"{args.config} already has [generator.screening]; give the full job")

    if "[scoring]" in base or "[summarizer." in base:
        raise SystemExit(f"{args.config}: this script writes [scoring] and [summarizer.openai]")
    stub = Stub(sys.executable, args.workdir, "pick", 0.0) if args.summarizer == "stub" else None
    extra = f"\n[scoring]\nlabels = {args.labels}\n"
    if stub:
        extra += (f"\n[summarizer.openai]\nbase_url = \"{stub.url}\"\nmodel = \"stub\"\n"
                  "api_key_env = \"\"\n")
        base = re.sub(r"(?m)^backend = .*$", 'backend = "openai"', base)
    try:
        config = args.workdir / "full.toml"
        config.write_text(base + extra)
        full = dissect(args, config, args.workdir / "full")
        rows = [("full", full)]
        for first in [int(f) for f in args.first.split(",")]:
            config = args.workdir / f"first-{first}.toml"
            config.write_text(f"{base}{extra}\n[generator.screening]\nfirst_images = {first}\n"
                              f"keep = {args.keep}\n")
            rows.append((f"first_images {first}, keep {args.keep}",
                         dissect(args, config, args.workdir / f"first-{first}")))
    finally:
        if stub:
            stub.stop()

    print(f"{full['neurons']} neurons, {full['candidates']} candidates "
          f"({full['candidates'] / full['neurons']:.1f} per neuron), {args.labels} labels; "
          f"{args.config}, summariser {args.summarizer}\n")
    print("| setting | images generated | saved | top label = full | labels = full (as a set) "
          "| wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    report = []
    for name, run in rows:
        keys = full["labels"].keys()
        top = sum(run["labels"][k][:1] == full["labels"][k][:1] for k in keys)
        same = sum(set(run["labels"][k]) == set(full["labels"][k]) for k in keys)
        saved = 1 - run["images"] / full["images"] if full["images"] else 0.0
        n = len(keys)
        print(f"| {name} | {run['images']} | {saved:.0%} | {top}/{n} ({top / n:.0%}) | "
              f"{same}/{n} ({same / n:.0%}) | {run['wall']:.1f} |")
        report.append({"setting": name, "images": run["images"], "saved": saved,
                       "top_label_agrees": top, "labels_agree": same, "neurons": n,
                       "wall": run["wall"]})
    out = args.json or args.workdir / "results.json"
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
