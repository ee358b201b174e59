#!/usr/bin/env python3
"""`dnd generate` against diffusers' StableDiffusionPipeline, side by side in one run.

    python bench/generate_bench.py --dnd $CARGO_TARGET_DIR/release/dnd [--model DIR | --sd15]
        [--count 10] [--batch-size 10] [--steps 50] [--size 64] [--guidance 7.5]
        [--threads 2] [--repeats 3] [--workdir /tmp/dnd-gen-bench] [--json FILE]
        [--device cpu|cuda]

Both sides load the same diffusers directory (default: the tiny random-weight fixture
tests/fixtures/multimodal/sd; --sd15 builds a random Stable Diffusion v1.5-sized one with
bench/multimodal_bench.py's recipe, about 4.3 GB, once) and generate --count images of one
prompt in batches of --batch-size, DDIM (eta 0, the model's noise schedule, the same
timestep spacing), classifier-free guidance --guidance, fp32 and --threads threads on the
CPU; with --device cuda, on the first GPU in fp16 (diffusers: torch_dtype float16; dnd
runs its UNet and text encoder in f16 on CUDA, the VAE in f32 as diffusers' force_upcast
asks, and diffusers is left as it is there). Each run
is a fresh process; runs alternate (diffusers, dnd, diffusers, dnd ...) so that a machine
whose speed drifts slows both alike.

Timed on each side, inside its process, from the first prompt to the last decoded image:
text encoding, the denoising loop, the VAE decode and the conversion to 8-bit images
(diffusers: one `pipe(...)` call per batch, `output_type="np"`; dnd: its `seconds` in
--summary-json). Model loading and imports are not timed (they are reported apart, from
the whole process' wall time). Peak RSS is each process' own high-water mark.

Prints a markdown table (median of each side, the ratio diffusers/dnd per pair and its
median: above 1 means dnd is faster) and writes everything to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "multimodal" / "sd"
PROMPT = "a red circle"


def worker(args: argparse.Namespace) -> int:
    """The diffusers side, in its own process."""
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    gpu = args.device.startswith("cuda")
    pipe = StableDiffusionPipeline.from_pretrained(
        args.model,
        torch_dtype=torch.float16 if gpu else torch.float32,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if gpu:
        pipe = pipe.to(args.device)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    started = time.perf_counter()
    done = 0
    with torch.inference_mode():
        while done < args.count:
            n = min(args.batch_size, args.count - done)
            generator = [torch.Generator(args.device).manual_seed(done + i) for i in range(n)]
            pipe(
                PROMPT,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=args.size,
                width=args.size,
                num_images_per_prompt=n,
                generator=generator,
                output_type="np",
            )
            done += n
    sync()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"seconds": seconds, "images": done, "peak_rss_mib": peak}))
    return 0


def run(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return wall, p.stdout


def diffusers_run(args, model: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", model] + common_flags(args)
    wall, out = run(cmd)
    r = json.loads(out.strip().splitlines()[-1])
    r["process_seconds"] = wall
    return r


def dnd_run(args, model: str, scratch: Path) -> dict:
    summary = scratch / "dnd.json"
    cmd = [
        str(args.dnd), "generate", "--model", model, "--prompt", PROMPT,
        "--count", str(args.count), "--batch-size", str(args.batch_size),
        "--steps", str(args.steps), "--guidance", str(args.guidance),
        "--width", str(args.size), "--height", str(args.size),
        "--threads", str(args.threads), "--device", args.device, "--out", str(scratch / "images"),
        "--summary-json", str(summary),
    ]  # fmt: skip
    wall, _ = run(cmd)
    s = json.loads(summary.read_text())
    return {"seconds": s["seconds"], "images": s["images"], "peak_rss_mib": s["peak_rss_mib"],
            "process_seconds": wall}


def common_flags(args) -> list[str]:
    return [
        "--count", str(args.count), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
        "--guidance", str(args.guidance), "--size", str(args.size), "--threads", str(args.threads),
        "--device", args.device,
    ]  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dnd", type=Path)
    ap.add_argument("--model", type=Path, default=FIXTURE)
    ap.add_argument("--sd15", action="store_true", help="build and use a random SD v1.5-sized model")
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N (fp16 on both sides)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dnd-gen-bench")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.dnd is None:
        ap.error("--dnd is required")
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model
    if args.sd15:
        sys.path.insert(0, str(ROOT / "bench"))
        import multimodal_bench

        model = Path(multimodal_bench.setup_sd(args.workdir, False)["dir"])
    pairs = []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
            ref = diffusers_run(args, str(model))
            ours = dnd_run(args, str(model), Path(scratch))
        pairs.append({"diffusers": ref, "dnd": ours, "ratio": ref["seconds"] / ours["seconds"]})
        print(f"run {r + 1}: diffusers {ref['seconds']:.2f} s, dnd {ours['seconds']:.2f} s, "
              f"ratio {pairs[-1]['ratio']:.2f}", file=sys.stderr)
    med = lambda side, key: statistics.median(p[side][key] for p in pairs)  # noqa: E731
    ratio = statistics.median(p["ratio"] for p in pairs)
    report = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "model": str(model), "settings": vars(args) | {"dnd": str(args.dnd), "model": str(model),
                                                        "workdir": str(args.workdir), "json": str(args.json)},
        "pairs": pairs, "ratio_median": ratio,
    }  # fmt: skip
    rows = [
        "| implementation | images | steps | size | s (median) | s/image | process s | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for side in ("diffusers", "dnd"):
        s = med(side, "seconds")
        rows.append(f"| {side} | {args.count} | {args.steps} | {args.size} | {s:.2f} | {s / args.count:.3f} | "
                    f"{med(side, 'process_seconds'):.1f} | {med(side, 'peak_rss_mib'):.0f} |")
    each = ", ".join(f"{p['ratio']:.2f}" for p in pairs)
    rows.append(f"\ndiffusers/dnd: median {ratio:.2f}x (pairs: {each})")
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
