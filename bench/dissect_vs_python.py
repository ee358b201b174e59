#!/usr/bin/env python3
"""Whole dissections side by side: the official Describe-and-Dissect flow in Python against
`dnd dissect`, same tiny models, same probe images, same neurons, same LLM, same run.

    python bench/dissect_vs_python.py [--dnd PATH] [--repeats 2] [--threads 2]
        [--images 200] [--neurons 4] [--steps 50] [--size 64] [--guidance 7.5]
        [--summary-rule vary|common-pair] [--latency-ms 0] [--workdir DIR] [--json FILE]

Run it with a Python that has torch, torchvision, transformers, diffusers, opencv and
requests (bench/python_flow.py's imports; pyarrow too to print dnd's labels). It

1. renders the probe set once (`dnd synth images --count N`: 96x96 PNGs; both sides resize
   them the same way) into --workdir;
2. starts bench/llm_stub.py on a free port: one deterministic OpenAI-compatible endpoint
   for both sides (its reply rules are in its docstring);
3. writes a dnd job file for the same setup: target tests/fixtures/models/resnet18, layer4,
   neurons 0..N, top_k 10, 4 crops per image, 10 top images, captioner/embedder/generator
   the BLIP/CLIP/SD fixtures, summariser `openai` at the stub with 5 rounds, 10 images per
   concept (10 per UNet call, as the reference's one pipeline call per candidate),
   `--steps` steps, guidance `--guidance`, `--size` px, seed 0, one neuron task;
4. alternates, --repeats times, each in a fresh process: the Python flow
   (bench/python_flow.py, cold: nothing cached), `dnd dissect` cold (a fresh --out, so no
   cache), `dnd dissect` warm (the same --out under another --name: every caption,
   generated image and LLM reply comes from the cache; the probe and the scoring run again).

Timed, for each run: the wall time of the whole process, from spawn to exit (interpreter
start, imports and model loading included on the Python side; model loading and the HTML
report that `dnd dissect` writes at the end included on dnd's), and its peak RSS (the
child's ru_maxrss from wait4). Stages: the Python flow times its own (probe, crops with the
re-ranking pass, captions, llm, generation, scoring; see bench/python_flow.py). dnd's
summary JSON gives load, probe and describe seconds; an embedded run does not report its
describe stages apart, so the driver reconstructs them for the cold run from what dnd
writes as it goes: the neuron task's lease (its event log), the reply cache files (one
per LLM call, written as each reply arrives), the generated-image cache files (one per
image, written per batch) and the task's result files (written once it has scored).
crops+captions = lease to first reply, llm = first to last reply, generation = last reply
to last image, scoring = last image to results. (Crops and captions are written together,
so they are not split; the one neuron task makes the stages sequential.)

Prints a markdown table per run and a summary: median wall per side, the ratios Python /
dnd cold and Python / dnd warm per round and their medians (above 1: dnd is faster), the
work each side did (candidates, generated images, LLM calls the stub answered), and both
sides' labels for the record (they are not expected to agree: BLIP inputs, scheduler and
random number generators differ). Everything goes to --json too. The machine's load
average is recorded before and after every run: on a shared machine, read the ratios of
the same round, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TARGET = FIXTURES / "models" / "resnet18"
BLIP = FIXTURES / "multimodal" / "blip"
CLIP = FIXTURES / "multimodal" / "clip"
SD = FIXTURES / "multimodal" / "sd"
LAYER = "layer4"
TASK = f"{LAYER}-00000"


def default_dnd() -> Path:
    target = os.environ.get("CARGO_TARGET_DIR")
    return (Path(target) if target else ROOT / "target") / "release" / "dnd"


def load() -> str:
    return "%.2f %.2f %.2f" % os.getloadavg()


def run_process(argv: list[str], log: Path, env: dict | None = None) -> dict:
    """Runs argv to completion; wall seconds, peak RSS (MiB) and exit status."""
    with open(log, "w") as out:
        started = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{argv[0]} {argv[1]} failed (exit {child.returncode}); "
                         f"the end of {log}:\n{tail}")
    return {"wall": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


class Stub:
    """bench/llm_stub.py in a child process, on a free port."""

    def __init__(self, python: str, workdir: Path, rule: str, latency_ms: float) -> None:
        port_file = workdir / "stub.port"
        port_file.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [python, str(ROOT / "bench" / "llm_stub.py"), "--port", "0", "--port-file",
             str(port_file), "--summary-rule", rule, "--latency-ms", str(latency_ms)],
            stdout=subprocess.DEVNULL, stderr=open(workdir / "stub.log", "w"))
        for _ in range(100):
            if port_file.exists() and port_file.read_text().strip():
                break
            if self.process.poll() is not None:
                raise SystemExit(f"the LLM stub exited; see {workdir / 'stub.log'}")
            time.sleep(0.1)
        self.root = f"http://127.0.0.1:{port_file.read_text().strip()}"
        self.url = self.root + "/v1"

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(self.root + "/stats/reset", data=b"{}"))

    def stats(self) -> dict:
        return json.load(urllib.request.urlopen(self.root + "/stats"))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def job_toml(args, images: Path, llm_url: str) -> str:
    return f"""# Written by bench/dissect_vs_python.py: the Python flow's setup as a dnd job.
seed = 0

[target]
model = "{TARGET}"
layers = ["{LAYER}"]
neurons = "0..{args.neurons}"

[probe]
images = "{images}"
top_k = 10

[crops]
canvas_size = 375
max_crops = 4

[describe]
top_images = 10
neurons_per_task = {max(8, args.neurons)}

[captioner]
model = "{BLIP}"
[captioner.decoding]
min_new_tokens = 5
max_new_tokens = 32

[summarizer]
backend = "openai"
rounds = 5
[summarizer.openai]
base_url = "{llm_url}"
model = "stub"
api_key_env = ""

[generator]
model = "{SD}"
images_per_concept = 10
# The reference makes a candidate's 10 images in one pipeline call.
batch_size = 10
[generator.sampling]
prompt_template = "One realistic image of {{concept}}"
steps = {args.steps}
guidance_scale = {args.guidance}
width = {args.size}
height = {args.size}

[embedder]
model = "{CLIP}"

[scoring]
rank_score = "topk-sq-mean"
beta = 5
similarity_top = 10
labels = 3
"""


def mtimes(directory: Path) -> list[float]:
    return sorted(p.stat().st_mtime for p in directory.rglob("*") if p.is_file())


def dnd_stages(out: Path, name: str, summary: dict) -> dict:
    """A cold run's describe stages, from the files dnd wrote as it went (see the docstring)."""
    stages = {"probe": summary["probe_seconds"], "load": summary["load_seconds"]}
    job = out / "jobs" / name
    leased = []
    for log in sorted((job / "events").glob("*.jsonl")):
        leased += [json.loads(line)["unix_ms"] / 1000 for line in log.read_text().splitlines()
                   if f'"task":"{TASK}"' in line and '"kind":"leased"' in line]
    # The task's results are written right after its scoring; the probe's commit marker
    # stands in for the lease if the event log lacks it.
    results = [t for a in (job / "tasks" / TASK).glob("attempt-*") for t in mtimes(a)]
    probe_done = job / "tasks" / "probe-00000" / "_COMMITTED"
    started = leased[-1] if leased else (probe_done.stat().st_mtime if probe_done.exists() else None)
    replies, images = mtimes(out / "cache" / "replies"), mtimes(out / "cache" / "images")
    if started is None or not (results and replies and images):
        return stages
    stages["crops+captions"] = replies[0] - started
    stages["llm"] = replies[-1] - replies[0]
    stages["generation"] = images[-1] - replies[-1]
    stages["scoring"] = results[0] - images[-1]
    return stages


def dnd_labels(out: Path, name: str) -> dict:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return {"note": "install pyarrow to read dnd's labels"}
    rows = pq.read_table(out / "jobs" / name / "results" / "descriptions.parquet").to_pylist()
    candidates = pq.read_table(out / "jobs" / name / "results" / "candidates.parquet").to_pylist()
    return {
        "labels": {r["neuron"]: [r[k] for k in ("label", "label_2", "label_3") if r[k]]
                   for r in rows},
        "candidates": {r["neuron"]: [c["concept"] for c in candidates
                                     if c["neuron"] == r["neuron"]] for r in rows},
    }


def run_python(args, stub: Stub, images: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false",
               **{v: str(args.threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                  "OPENBLAS_NUM_THREADS")})
    stub.reset()
    before = load()
    result = run_process(
        [args.python, str(ROOT / "bench" / "python_flow.py"), "--images", str(images),
         "--out", str(out), "--llm-url", stub.url, "--neurons",
         ",".join(str(n) for n in range(args.neurons)), "--threads", str(args.threads),
         "--steps", str(args.steps), "--size", str(args.size), "--guidance", str(args.guidance)],
        out.with_suffix(".log"), env)
    timings = json.loads((out / "timings.json").read_text())
    return {
        **result, "side": "python", "load_before": before, "load_after": load(),
        "stages": {k: timings[k] for k in ("probe", "crops", "captions", "llm", "generation",
                                           "scoring", "load", "imports")},
        "candidates": timings["candidates"], "images_generated": timings["images_generated"],
        "llm_calls": stub.stats().get("requests", 0), "inner_peak_rss_mib": timings["peak_rss_mib"],
        "labels": {int(k): v for k, v in timings["labels"].items()},
    }


def run_dnd(args, stub: Stub, job: Path, out: Path, name: str) -> dict:
    if name == "cold":
        shutil.rmtree(out, ignore_errors=True)
    summary_file = out.parent / f"{out.name}-{name}.json"
    stub.reset()
    before = load()
    result = run_process(
        [str(args.dnd), "dissect", "--config", str(job), "--out", str(out), "--name", name,
         "--threads", str(args.threads), "--summary-json", str(summary_file)],
        out.parent / f"{out.name}-{name}.log")
    summary = json.loads(summary_file.read_text())
    cache = summary["cache"]
    stages = (dnd_stages(out, name, summary) if name == "cold" else
              {"probe": summary["probe_seconds"], "load": summary["load_seconds"],
               "describe": summary["describe_seconds"]})
    described = dnd_labels(out, name)
    return {
        **result, "side": f"dnd {name}", "load_before": before, "load_after": load(),
        "stages": stages, "summary": summary,
        "candidates": sum(len(c) for c in described.get("candidates", {}).values()) or None,
        "images_generated": cache.get("images", {}).get("misses", 0),
        "images_cached": cache.get("images", {}).get("hits", 0),
        "llm_calls": stub.stats().get("requests", 0),
        "labels": described.get("labels", described.get("note")),
    }


def fmt(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def report(runs: list[dict], args) -> str:
    columns = ["probe", "crops+captions", "llm", "generation", "scoring"]
    lines = [
        f"{args.neurons} neurons of {LAYER}, {args.images} probe images, {args.threads} threads, "
        f"{args.steps} steps at {args.size} px, summary rule `{args.summary_rule}`; "
        "seconds; load = 1/5/15-min load average before -> after the run.",
        "",
        "| round | run | wall | " + " | ".join(columns) +
        " | candidates | images made | LLM calls | peak RSS MiB | load |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in columns) +
        " | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in runs:
        s = dict(run["stages"])
        if run["side"] == "python":
            s["crops+captions"] = s["crops"] + s["captions"]
        cells = [fmt(s.get(c)) for c in columns]
        if run["side"] == "dnd warm":
            cells[1] = f"describe {fmt(s['describe'])}"
        lines.append(
            f"| {run['round']} | {run['side']} | {fmt(run['wall'])} | " + " | ".join(cells) +
            f" | {run['candidates'] or ''} | {run['images_generated']} | {run['llm_calls']} | "
            f"{fmt(run['peak_rss_mib'], 0)} | {run['load_before']} -> {run['load_after']} |")

    def walls(side):
        return [r["wall"] for r in runs if r["side"] == side]

    py, cold, warm = walls("python"), walls("dnd cold"), walls("dnd warm")
    cold_ratios = [p / c for p, c in zip(py, cold)]
    warm_ratios = [p / w for p, w in zip(py, warm)]
    rss = {side: statistics.median(r["peak_rss_mib"] for r in runs if r["side"] == side)
           for side in ("python", "dnd cold", "dnd warm")}
    per_image = {}
    for side in ("python", "dnd cold"):
        made = [r for r in runs if r["side"] == side and r["images_generated"]]
        if made:
            per_image[side] = statistics.median(
                r["stages"]["generation"] / r["images_generated"] for r in made)
    lines += [
        "",
        "| | python | dnd cold | dnd warm |",
        "| --- | ---: | ---: | ---: |",
        f"| median wall (s) | {fmt(statistics.median(py))} | {fmt(statistics.median(cold))} | "
        f"{fmt(statistics.median(warm))} |",
        f"| python / dnd, per round | | {', '.join(f'{r:.2f}x' for r in cold_ratios)} | "
        f"{', '.join(f'{r:.2f}x' for r in warm_ratios)} |",
        f"| python / dnd, median | | **{statistics.median(cold_ratios):.2f}x** | "
        f"**{statistics.median(warm_ratios):.2f}x** |",
        f"| median peak RSS (MiB) | {fmt(rss['python'], 0)} | {fmt(rss['dnd cold'], 0)} | "
        f"{fmt(rss['dnd warm'], 0)} |",
        f"| generation s per image made (median) | {fmt(per_image.get('python'), 3)} | "
        f"{fmt(per_image.get('dnd cold'), 3)} | |",
        "",
        "Labels (agreement is not expected: different BLIP inputs, schedulers and RNGs):",
    ]
    for run in runs:
        if run["round"] == 1 and run["side"] != "dnd warm":
            lines.append(f"- {run['side']}: {json.dumps(run['labels'])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dnd", type=Path, default=default_dnd(),
                        help="the dnd binary (default $CARGO_TARGET_DIR/release/dnd)")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter for the Python flow and the stub (default this one)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=200, help="probe images to render")
    parser.add_argument("--neurons", type=int, default=4, help="describe channels 0..N of layer4")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--summary-rule", choices=("vary", "common-pair"), default="vary",
                        help="the stub's summary replies (see bench/llm_stub.py)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="stub delay per LLM reply")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dnd-vs-python"))
    parser.add_argument("--json", type=Path, help="default WORKDIR/results.json")
    args = parser.parse_args()
    if not args.dnd.is_file():
        raise SystemExit(f"no dnd binary at {args.dnd} (cargo build --release -p dnd-cli, or --dnd)")
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    images = workdir / "probe"
    if len(list(images.glob("*.png"))) != args.images:
        shutil.rmtree(images, ignore_errors=True)
        subprocess.run([str(args.dnd), "synth", "images", "--out", str(images), "--count",
                        str(args.images), "--seed", "0"], check=True, stdout=subprocess.DEVNULL)
    stub = Stub(args.python, workdir, args.summary_rule, args.latency_ms)
    runs: list[dict] = []
    try:
        job = workdir / "job.toml"
        job.write_text(job_toml(args, images, stub.url))
        for round_ in range(1, args.repeats + 1):
            for side in ("python", "dnd cold", "dnd warm"):
                print(f"round {round_}: {side} (load {load()}) ...", file=sys.stderr, flush=True)
                if side == "python":
                    run = run_python(args, stub, images, workdir / f"python-{round_}")
                else:
                    run = run_dnd(args, stub, job, workdir / f"dnd-{round_}", side.split()[1])
                run["round"] = round_
                runs.append(run)
                print(f"  {run['wall']:.1f} s, peak {run['peak_rss_mib']:.0f} MiB",
                      file=sys.stderr, flush=True)
    finally:
        stub.stop()
    text = report(runs, args)
    print(text)
    out = args.json or workdir / "results.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                               "runs": runs, "report": text}, indent=2, default=str) + "\n")
    print(f"\n(everything in {out})", file=sys.stderr)


if __name__ == "__main__":
    main()
