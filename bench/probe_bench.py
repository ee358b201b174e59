#!/usr/bin/env python3
"""Side-by-side benchmark of the probe stage: PyTorch/torchvision vs `dnd probe`.

    python bench/probe_bench.py --dnd target/release/dnd [--images 64] [--batch-size 8]
        [--threads 2] [--arch resnet50|vit_b_16] [--workdir /tmp/dnd-bench] [--only torch|dnd|both]

What it does:

1. Creates a random-weight torchvision ``<arch>(weights=None)`` (torch.manual_seed(0)),
   eval mode, and saves its state_dict (float32, torchvision names, no
   ``num_batches_tracked``) as ``<workdir>/<arch>/model.safetensors`` plus
   ``config.json`` ``{"architecture": "<arch>", "num_classes": 1000}``. A ResNet is
   tapped at ``layer4`` (spatial mean), a ViT (``vit_b_16``, ``vit_l_16``, ...) after its
   last encoder block (``blocks.N``: the mean of the patch tokens, class token left out).
2. Generates ``--images`` procedural 500x375 JPEG scenes (seeded) in ``<workdir>/images/``.
3. PyTorch side, in a fresh subprocess (its own peak RSS): threads = --threads,
   interop threads = 1; for every image in sorted order: PIL open + convert RGB,
   Resize(256), CenterCrop(224), ToTensor, Normalize; batches of --batch-size;
   forward under inference_mode up to the tap (a forward hook stops the network
   there); spatial mean of the tap -> (B, C); running top-10 per neuron. One batch
   of warm-up (excluded), then the whole loop over all images, decode included,
   is timed with time.perf_counter.
4. dnd side, a subprocess:
   ``<dnd> probe --model <workdir>/<arch> --images <workdir>/images --layers <tap>
   --top-k 10 --batch-size B --threads T --out <workdir>/out --summary-json
   <workdir>/dnd-summary.json``, then reads that summary.
5. Prints a markdown table and writes the same data to ``<workdir>/probe_bench.json``.

The machine running this needs torch, torchvision, safetensors, pillow, numpy
(see tests/fixtures/requirements.txt for tested versions). No weights are
downloaded: every model is randomly initialised.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
TOP_K = 10
IMAGE_W, IMAGE_H = 500, 375
IMAGE_SEED = 12345
JPEG_QUALITY = 90
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SUMMARY_KEYS = ("images_per_second", "peak_rss_mib", "images_ok", "probe_seconds")


def tap_name(arch: str) -> str:
    """The tap dnd records for `arch`: a ResNet's last stage, a ViT's last block."""
    if arch.startswith("vit_"):
        layers = {"vit_b_16": 12, "vit_b_32": 12, "vit_l_16": 24, "vit_l_32": 24, "vit_h_14": 32}[arch]
        return f"blocks.{layers - 1}"
    return "layer4"


def log(msg: str) -> None:
    print(f"[probe_bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Setup: model + images
# --------------------------------------------------------------------------


def setup_model(workdir: Path, arch: str, force: bool) -> Path:
    import torch
    import torchvision
    from safetensors.torch import save_file

    model_dir = workdir / arch
    st = model_dir / "model.safetensors"
    cfg = {"architecture": arch, "num_classes": 1000}
    marker = model_dir / ".probe_bench_seed0"
    if st.exists() and marker.exists() and not force:
        log(f"reusing {st}")
        return model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ctor = getattr(torchvision.models, arch)
    model = ctor(weights=None, num_classes=1000).eval()
    sd = {
        k: v.detach().to(torch.float32).contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    save_file(sd, str(st), metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(cfg) + "\n")
    marker.write_text("torch.manual_seed(0); torchvision.models.%s(weights=None)\n" % arch)
    log(f"wrote {st} ({st.stat().st_size / 2**20:.1f} MiB, {len(sd)} tensors)")
    return model_dir


def _scene(rng, height: int, width: int):
    """Procedural 'scene': gradient background, filled shapes, soft blob, mild noise."""
    import numpy as np

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(30, 220, size=3), rng.uniform(30, 220, size=3)
    ang = rng.uniform(0, 2 * np.pi)
    p = np.cos(ang) * xx / width + np.sin(ang) * yy / height
    p = (p - p.min()) / (p.max() - p.min())
    img = c0[None, None, :] * (1 - p[..., None]) + c1[None, None, :] * p[..., None]
    scale = min(height, width)
    for _ in range(int(rng.integers(3, 8))):
        col = rng.uniform(0, 255, size=3)
        cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
        kind = int(rng.integers(0, 3))
        if kind == 0:
            hw, hh = rng.uniform(0.05, 0.25, size=2) * scale
            m = (np.abs(xx - cx) <= hw) & (np.abs(yy - cy) <= hh)
        elif kind == 1:
            a, b = rng.uniform(0.05, 0.2, size=2) * scale
            t = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
            v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
            m = (u / a) ** 2 + (v / b) ** 2 <= 1
        else:
            r = rng.uniform(0.05, 0.15) * scale
            per = rng.uniform(4, 14)
            m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            stripes = np.sin(2 * np.pi * (xx * np.cos(per) + yy * np.sin(per)) / per) > 0
            m = m & stripes
        img = np.where(m[..., None], col[None, None, :], img)
    bx, by = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    bs = rng.uniform(0.05, 0.15) * scale
    blob = np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * bs * bs))[..., None]
    img = img * (1 - 0.7 * blob) + rng.uniform(0, 255, size=3)[None, None, :] * 0.7 * blob
    img = img + rng.normal(0, 6.0, size=img.shape)  # texture -> realistic JPEG entropy
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def setup_images(workdir: Path, n: int, force: bool) -> Path:
    import numpy as np
    from PIL import Image

    img_dir = workdir / "images"
    manifest = workdir / "images.manifest.json"
    want = {"n": n, "seed": IMAGE_SEED, "size_wh": [IMAGE_W, IMAGE_H], "quality": JPEG_QUALITY, "version": 1}
    names = [f"img_{i:05d}.jpg" for i in range(n)]
    if (
        not force
        and manifest.exists()
        and json.loads(manifest.read_text()) == want
        and sorted(os.listdir(img_dir)) == names
    ):
        log(f"reusing {n} images in {img_dir}")
        return img_dir
    img_dir.mkdir(parents=True, exist_ok=True)
    stray = [f for f in os.listdir(img_dir) if not (f.startswith("img_") and f.endswith(".jpg"))]
    if stray:
        raise SystemExit(f"{img_dir} contains files this script did not create: {stray[:5]}; use another --workdir")
    for f in os.listdir(img_dir):
        (img_dir / f).unlink()
    total = 0
    for i, name in enumerate(names):
        rng = np.random.default_rng([IMAGE_SEED, i])
        Image.fromarray(_scene(rng, IMAGE_H, IMAGE_W), "RGB").save(img_dir / name, quality=JPEG_QUALITY)
        total += (img_dir / name).stat().st_size
    manifest.write_text(json.dumps(want) + "\n")
    log(f"wrote {n} JPEGs {IMAGE_W}x{IMAGE_H} to {img_dir} (mean {total / max(n, 1) / 1024:.1f} KiB)")
    return img_dir


# --------------------------------------------------------------------------
# PyTorch worker (runs in its own process)
# --------------------------------------------------------------------------


def vmhwm_mib() -> float | None:
    """Peak resident set of this process's address space, from /proc/self/status."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


class _StopForward(Exception):
    pass


def setup_worker(args: argparse.Namespace) -> int:
    """Runs in a subprocess so that the driver never holds torch (see vmhwm_mib)."""
    import torch
    import torchvision

    workdir = Path(args.workdir)
    model_dir = setup_model(workdir, args.arch, args.force_setup)
    img_dir = setup_images(workdir, args.images, args.force_setup)
    info = {
        "model_dir": str(model_dir),
        "images_dir": str(img_dir),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    Path(args.result_json).write_text(json.dumps(info) + "\n")
    return 0


def torch_worker(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    import torchvision
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from torchvision import transforms

    model_dir = Path(args.model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    model = getattr(torchvision.models, cfg["architecture"])(weights=None, num_classes=cfg["num_classes"])
    missing, unexpected = model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    model.eval()

    captured = {}
    vit = cfg["architecture"].startswith("vit_")

    def hook(_m, _i, out):
        # A ViT's patch tokens (the class token, first, left out), as dnd's patch grid.
        captured["out"] = out[:, 1:, :].mean(dim=1) if vit else out.mean(dim=(2, 3))
        raise _StopForward  # everything after the tap is skipped

    (model.encoder.layers[-1] if vit else model.layer4).register_forward_hook(hook)
    pre = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    files = sorted(p for p in Path(args.images_dir).iterdir() if p.is_file())
    bs = args.batch_size

    def load(p: Path):
        with Image.open(p) as im:
            return pre(im.convert("RGB"))

    def pooled(batch_files):
        x = torch.stack([load(p) for p in batch_files])
        try:
            model(x)
        except _StopForward:
            pass
        return captured.pop("out")

    def run_all():
        top_v = top_i = None
        for start in range(0, len(files), bs):
            batch = files[start : start + bs]
            feats = pooled(batch)  # (B, C)
            idx = torch.arange(start, start + len(batch)).unsqueeze(1).expand_as(feats)
            if top_v is None:
                cat_v, cat_i = feats, idx
            else:
                cat_v, cat_i = torch.cat([top_v, feats]), torch.cat([top_i, idx])
            top_v, pos = torch.topk(cat_v, k=min(TOP_K, cat_v.shape[0]), dim=0)
            top_i = torch.gather(cat_i, 0, pos)
        return top_v, top_i

    with torch.inference_mode():
        pooled(files[:bs])  # warm-up batch, not timed
        t0 = time.perf_counter()
        top_v, top_i = run_all()
        seconds = time.perf_counter() - t0

    # Linux: KiB -> MiB. NB ru_maxrss is inherited across fork+exec (it starts at the parent's
    # high-water mark), which is why the driver process never imports torch; VmHWM (per address
    # space, reset by exec) is recorded as a cross-check.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out = {
        "implementation": "pytorch",
        "images": len(files),
        "images_ok": len(files),
        "batch_size": bs,
        "threads": args.threads,
        "seconds": seconds,
        "images_per_second": len(files) / seconds if seconds > 0 else None,
        "peak_rss_mib": peak,
        "vmhwm_mib": vmhwm_mib(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
    }
    if args.topk_out:
        save_file(
            {"values": top_v.contiguous(), "indices": top_i.contiguous()},
            args.topk_out,
            metadata={"format": "pt"},
        )
        out["topk_out"] = args.topk_out
    Path(args.result_json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


# --------------------------------------------------------------------------
# Subprocess helpers
# --------------------------------------------------------------------------


def cpu_busy_seconds() -> float | None:
    """System-wide busy CPU time (all CPUs) from /proc/stat, in seconds."""
    try:
        f = Path("/proc/stat").read_text().splitlines()[0].split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def contention(busy0, busy1, ru, wall: float) -> dict:
    """CPU time used by *other* processes while the child ran: a benchmark taken
    while e.g. a compiler runs on the same cores is not worth much."""
    if busy0 is None or busy1 is None or wall <= 0:
        return {}
    own = ru.ru_utime + ru.ru_stime
    other = max(0.0, (busy1 - busy0) - own)
    return {
        "child_cpu_seconds": own,
        "other_cpu_seconds": other,
        "other_cpu_share": other / (wall * (os.cpu_count() or 1)),
    }


def run_measured(cmd: list[str], log_path: Path, timeout: float | None) -> dict:
    """Run cmd, stdout+stderr to log_path; return rc, wall seconds, the child's
    own peak RSS from wait4 (independent of what the child reports) and how much
    CPU other processes used meanwhile."""
    busy0 = cpu_busy_seconds()
    t0 = time.perf_counter()
    with open(log_path, "wb") as logf:
        try:
            p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        except OSError as e:
            return {"rc": None, "error": f"could not start {cmd[0]!r}: {e}", "wall_seconds": 0.0}
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                p.returncode = -9
                return {
                    "rc": None,
                    "error": f"timed out after {timeout:.0f}s",
                    "wall_seconds": time.perf_counter() - t0,
                    "wait4_peak_rss_mib": ru.ru_maxrss / 1024.0,
                }
            time.sleep(0.02)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return {
        "rc": p.returncode,
        "wall_seconds": wall,
        "wait4_peak_rss_mib": ru.ru_maxrss / 1024.0,
        **contention(busy0, cpu_busy_seconds(), ru, wall),
    }


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def run_torch_side(args, model_dir: Path, img_dir: Path, workdir: Path) -> dict:
    result_json = workdir / "torch-result.json"
    if result_json.exists():
        result_json.unlink()
    cmd = [
        sys.executable,
        str(HERE),
        "--_torch-worker",
        "--model-dir",
        str(model_dir),
        "--images-dir",
        str(img_dir),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--result-json",
        str(result_json),
        "--topk-out",
        str(workdir / "torch-top10.safetensors"),
    ]
    log("torch: " + shlex.join(cmd))
    m = run_measured(cmd, workdir / "torch.log", args.timeout)
    if m.get("rc") != 0 or not result_json.exists():
        msg = m.get("error") or f"exit status {m.get('rc')}"
        log(f"torch side FAILED ({msg}); last lines of {workdir / 'torch.log'}:\n{tail(workdir / 'torch.log')}")
        return {"implementation": "pytorch", "error": msg, "command": shlex.join(cmd), **m}
    res = json.loads(result_json.read_text())
    res.update({k: v for k, v in m.items() if k != "rc"}, command=shlex.join(cmd))
    return res


def run_dnd_side(args, model_dir: Path, img_dir: Path, workdir: Path) -> dict:
    summary = workdir / "dnd-summary.json"
    if summary.exists():
        summary.unlink()
    cmd = [
        str(args.dnd),
        "probe",
        "--model",
        str(model_dir),
        "--images",
        str(img_dir),
        "--layers",
        tap_name(args.arch),
        "--top-k",
        str(TOP_K),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--out",
        str(workdir / "out"),
        "--summary-json",
        str(summary),
    ]
    base = {"implementation": "dnd", "command": shlex.join(cmd), "batch_size": args.batch_size, "threads": args.threads}
    dnd_path = Path(args.dnd)
    if not dnd_path.is_file() and shutil.which(str(args.dnd)):
        dnd_path = Path(shutil.which(str(args.dnd)))
        cmd[0] = str(dnd_path)
        base["command"] = shlex.join(cmd)
    if not (dnd_path.is_file() and os.access(dnd_path, os.X_OK)):
        msg = f"dnd binary not found or not executable: {dnd_path} (build it first, e.g. cargo build --release)"
        log("dnd side FAILED: " + msg)
        return {**base, "error": msg}
    log("dnd: " + shlex.join(cmd))
    m = run_measured(cmd, workdir / "dnd.log", args.timeout)
    if m.get("rc") != 0:
        msg = m.get("error") or f"exit status {m.get('rc')}"
        log(f"dnd side FAILED ({msg}); last lines of {workdir / 'dnd.log'}:\n{tail(workdir / 'dnd.log')}")
        return {**base, **m, "error": msg}
    if not summary.exists():
        msg = f"dnd exited 0 but did not write {summary}"
        log("dnd side FAILED: " + msg)
        return {**base, **m, "error": msg}
    try:
        s = json.loads(summary.read_text())
    except json.JSONDecodeError as e:
        log(f"dnd side FAILED: {summary} is not valid JSON: {e}")
        return {**base, **m, "error": f"bad summary json: {e}"}
    missing = [k for k in SUMMARY_KEYS if k not in s]
    res = {**base, **m, "images": s.get("images_ok"), "summary": s}
    for k in SUMMARY_KEYS:
        if k in s:
            res[k] = s[k]
    if missing:
        res["error"] = f"summary lacks keys {missing}"
        log(f"dnd summary {summary} lacks keys {missing}")
    if s.get("images_ok") is not None and s["images_ok"] != args.images:
        log(f"warning: dnd reports images_ok={s['images_ok']}, expected {args.images}")
    return res


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "n/a"


def markdown(report: dict) -> str:
    rows = [
        "| implementation | images | batch | threads | images/s | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        name = r["implementation"] + (" (FAILED)" if r.get("error") else "")
        rows.append(
            f"| {name} | {fmt(r.get('images'), 'd')} | {r.get('batch_size', report['batch_size'])} | "
            f"{r.get('threads', report['threads'])} | {fmt(r.get('images_per_second'), '.2f')} | "
            f"{fmt(r.get('peak_rss_mib'), '.1f')} |"
        )
    lines = [
        f"## probe-stage benchmark: {report['arch']}, {report['layer']}, top-{report['top_k']}",
        "",
        *rows,
        "",
        f"- CPU: {report['cpu_model']} ({report['cpu_count']} logical CPUs)",
        f"- torch {report['torch']}, torchvision {report['torchvision']}, Python {report['python']}",
        f"- images: {report['images']} procedural JPEGs {IMAGE_W}x{IMAGE_H} (quality {JPEG_QUALITY}), "
        f"decode + Resize(256) + CenterCrop(224) + Normalize included in the timing; PyTorch excludes "
        f"1 warm-up batch, dnd's figure includes its first batch",
        f"- command: `{report['command']}`",
    ]
    a = report.get("agreement")
    if a:
        lines.append(
            f"- same answers: top-1 image equal for {100 * a['top1_same_image']:.1f}% of neurons, top-10 sets "
            f"overlap {100 * a['top10_set_overlap']:.1f}%, top-10 values within {a['max_abs_diff_top10_values']:.3g} "
            f"(values up to {a['max_top10_value']:.3g}); JPEG decoders differ (zune-jpeg vs libjpeg-turbo)"
        )
    for r in report["results"]:
        if r.get("error"):
            lines.append(f"- {r['implementation']} error: {r['error']}")
        share = r.get("other_cpu_share")
        if isinstance(share, float) and share > 0.05:
            lines.append(
                f"- WARNING: other processes used {100 * share:.0f}% of the CPUs while the "
                f"{r['implementation']} side ran; its numbers are not reliable"
            )
    return "\n".join(lines)


AGREEMENT_SCRIPT = """
import json, os, sys
import numpy as np, pyarrow.parquet as pq
from safetensors.numpy import load_file
workdir, images = sys.argv[1], sys.argv[2]
t = load_file(os.path.join(workdir, "torch-top10.safetensors"))
files = np.array(sorted(os.listdir(images)))
d = pq.read_table(os.path.join(workdir, "out", "topk", sys.argv[3] + ".parquet"))
rank, neuron = d.column("rank").to_numpy(), d.column("neuron").to_numpy()
vals = np.zeros((rank.max() + 1, neuron.max() + 1), dtype=np.float32)
ids = np.empty(vals.shape, dtype=object)
vals[rank, neuron] = d.column("activation").to_numpy()
ids[rank, neuron] = d.column("image_id").to_pylist()
tid = files[t["indices"]]
print(json.dumps({
    "max_abs_diff_top10_values": float(np.abs(vals - t["values"]).max()),
    "max_top10_value": float(t["values"].max()),
    "top1_same_image": float((ids[0] == tid[0]).mean()),
    "top10_set_overlap": float(np.mean([len(set(ids[:, n]) & set(tid[:, n])) / ids.shape[0] for n in range(ids.shape[1])])),
}))
"""


def compare_topk(workdir: Path, img_dir: Path, layer: str) -> dict | None:
    """How far dnd's top-10 lists are from PyTorch's (JPEG decoders differ slightly)."""
    r = subprocess.run([sys.executable, "-c", AGREEMENT_SCRIPT, str(workdir), str(img_dir), layer],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        log(f"top-K comparison skipped: {r.stderr.strip().splitlines()[-1:]}")
        return None
    agreement = json.loads(r.stdout)
    log(f"top-K agreement dnd vs PyTorch: {agreement}")
    return agreement


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dnd", type=Path, help="path to the dnd binary (required unless --only torch)")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arch", default="resnet50", help="torchvision constructor name: resnet18..resnet152, vit_b_16, vit_l_16, ...")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dnd-bench"))
    ap.add_argument("--only", choices=["torch", "dnd", "both"], default="both")
    ap.add_argument("--force-setup", action="store_true", help="regenerate the model and images even if present")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per-side wall-clock limit in seconds")
    # internal: the PyTorch worker subprocess
    ap.add_argument("--_torch-worker", dest="torch_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_setup", dest="setup_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--images-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result-json", help=argparse.SUPPRESS)
    ap.add_argument("--topk-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.torch_worker:
        return torch_worker(args)
    if args.setup_worker:
        return setup_worker(args)
    if args.only != "torch" and args.dnd is None:
        ap.error("--dnd is required unless --only torch")
    if args.images < 1 or args.batch_size < 1 or args.threads < 1:
        ap.error("--images, --batch-size and --threads must be >= 1")

    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # The driver itself stays small (stdlib only): children inherit its ru_maxrss.
    setup_json = workdir / "setup.json"
    if setup_json.exists():
        setup_json.unlink()
    setup_cmd = [
        sys.executable,
        str(HERE),
        "--_setup",
        "--workdir",
        str(workdir),
        "--arch",
        args.arch,
        "--images",
        str(args.images),
        "--result-json",
        str(setup_json),
    ] + (["--force-setup"] if args.force_setup else [])
    if subprocess.run(setup_cmd, stdin=subprocess.DEVNULL).returncode != 0 or not setup_json.exists():
        log("setup (model + images) failed, see the messages above")
        return 2
    setup = json.loads(setup_json.read_text())
    model_dir, img_dir = Path(setup["model_dir"]), Path(setup["images_dir"])

    results = []
    if args.only in ("torch", "both"):
        results.append(run_torch_side(args, model_dir, img_dir, workdir))
    if args.only in ("dnd", "both"):
        results.append(run_dnd_side(args, model_dir, img_dir, workdir))

    agreement = compare_topk(workdir, img_dir, tap_name(args.arch)) if args.only == "both" else None

    report = {
        "agreement": agreement,
        "arch": args.arch,
        "layer": tap_name(args.arch),
        "top_k": TOP_K,
        "images": args.images,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": setup["torch"],
        "torchvision": setup["torchvision"],
        "python": platform.python_version(),
        "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "command": command,
        "workdir": str(workdir),
        "results": results,
    }
    md = markdown(report)
    report["markdown"] = md
    (workdir / "probe_bench.json").write_text(json.dumps(report, indent=1) + "\n")
    print(md)
    print(f"\n(JSON: {workdir / 'probe_bench.json'})")
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
