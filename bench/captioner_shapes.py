#!/usr/bin/env python3
"""Why the zoo captioner does not name shapes: two measurements (issue 21).

    python bench/captioner_shapes.py caption [--dnd PATH] [--captioner DIR] [--scales 1.4,0.7]
    python bench/captioner_shapes.py classify [--dnd PATH] [--size 64] [--patch 16] [--steps 1000]

Both render scenes of the world with `dnd synth images` (128 px, `scenes.jsonl` holds
every object's shape, centre and size) and cut one square crop per object, centred on
it, of half-side `size x scale` of the image (the object's radius times `scale`): at 1.4
the whole object with a margin, at 0.7 its inside only.

`caption`: the committed captioner (transformers' BlipForConditionalGeneration on the
same files dnd loads, greedy, min 5 / max 32 new tokens as dnd decodes) captions each
crop; a crop counts as right when a shape word of the caption (synonyms included) is the
object's shape. Prints the share right and how often each shape is said first.

`classify`: a ViT of the captioner's vision size (patch `--patch` at `--size` px, width
128, 4 pre-norm layers, 4 heads, MLP 512: what BlipVisionModel computes) with a linear
head on its class token, trained on shape alone (6 classes) on whole-object crops (scale
uniform in 1.1-1.5) of 4,000 scenes, tested on 200 other scenes' objects. It says whether
this tower, with a clean shape signal, sees shape at all.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import tempfile
from pathlib import Path

import torch
from PIL import Image

SHAPES = ["circle", "square", "triangle", "star", "ring", "cross"]
# Every noun the world's grammar and parser use for a shape (crates/dnd-synth/src/vocab.rs).
SHAPE_WORDS = {
    **{s: s for s in SHAPES},
    **{s + "s": s for s in ["circle", "square", "triangle", "star", "ring"]},
    "crosses": "cross", "disc": "circle", "discs": "circle", "disk": "circle",
    "disks": "circle", "donut": "ring", "donuts": "ring", "doughnut": "ring",
    "doughnuts": "ring", "plus": "cross",
}


def render(dnd: str, out: Path, count: int, seed: int) -> list[dict]:
    subprocess.run([dnd, "synth", "images", "--out", str(out), "--count", str(count),
                    "--size", "128", "--seed", str(seed)], check=True, capture_output=True)
    return [json.loads(line) for line in (out / "scenes.jsonl").open()]


def object_crops(world: Path, scenes: list[dict], scale, side: int):
    """(crop resized to side x side, shape) for every object of every scene."""
    for i, scene in enumerate(scenes):
        image = Image.open(world / f"{i:05d}.png").convert("RGB")
        w, h = image.size
        for o in scene["objects"]:
            r = o["size"] * min(w, h) * scale()
            cx, cy = o["centre"]["x"] * w, o["centre"]["y"] * h
            box = (max(0, int(cx - r)), max(0, int(cy - r)), min(w, int(cx + r)), min(h, int(cy + r)))
            yield image.crop(box).resize((side, side), Image.BICUBIC), o["shape"]


def to_tensor(image: Image.Image, mean, std) -> torch.Tensor:
    s = image.size[0]
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(s, s, 3)
    x = x.permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def caption(args, world: Path, scenes: list[dict]) -> None:
    from tokenizers import Tokenizer
    from transformers import BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(args.captioner).eval()
    tokenizer = Tokenizer.from_file(str(Path(args.captioner) / "tokenizer.json"))
    pre = json.loads((Path(args.captioner) / "preprocessor_config.json").read_text())
    side = pre["size"]["height"]
    for scale in [float(s) for s in args.scales.split(",")]:
        crops = list(object_crops(world, scenes, lambda: scale, side))
        pixels = torch.stack([to_tensor(c, pre["image_mean"], pre["image_std"]) for c, _ in crops])
        said = []
        with torch.no_grad():
            for k in range(0, len(pixels), 64):
                ids = model.generate(pixel_values=pixels[k:k + 64], max_new_tokens=32,
                                     min_new_tokens=5, num_beams=1, do_sample=False)
                said += [tokenizer.decode(x.tolist(), skip_special_tokens=True) for x in ids]
        right, first = 0, {}
        for (_, shape), text in zip(crops, said):
            named = [SHAPE_WORDS[w] for w in re.findall(r"[a-z]+", text) if w in SHAPE_WORDS]
            right += shape in named
            if named:
                first[named[0]] = first.get(named[0], 0) + 1
        print(f"scale {scale}: shape right {right / len(crops):.1%} of {len(crops)} crops; "
              f"said first: {dict(sorted(first.items(), key=lambda kv: -kv[1]))}")


def classify(args, work: Path) -> None:
    torch.manual_seed(0)
    random.seed(0)
    train_world, test_world = work / "train", work / "test"
    train_scenes = render(args.dnd, train_world, 4000, 100000)
    test_scenes = render(args.dnd, test_world, 200, 0)
    mean, std = [0.45] * 3, [1.0] * 3

    def data(world, scenes):
        pairs = list(object_crops(world, scenes, lambda: random.uniform(1.1, 1.5), args.size))
        x = torch.stack([to_tensor(c, mean, std) for c, _ in pairs])
        return x, torch.tensor([SHAPES.index(s) for _, s in pairs])

    xtr, ytr = data(train_world, train_scenes)
    xte, yte = data(test_world, test_scenes)
    width, tokens = 128, (args.size // args.patch) ** 2

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = torch.nn.Conv2d(3, width, args.patch, args.patch)
            self.cls = torch.nn.Parameter(torch.zeros(1, 1, width))
            self.pos = torch.nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
            layer = torch.nn.TransformerEncoderLayer(width, 4, 512, 0.0, activation="gelu",
                                                     batch_first=True, norm_first=True)
            self.blocks = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
            self.norm = torch.nn.LayerNorm(width)
            self.head = torch.nn.Linear(width, len(SHAPES))

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
            return self.head(self.norm(self.blocks(x))[:, 0])

    model = Tower()
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.01)
    print(f"{len(ytr)} training crops, {len(yte)} test crops, {tokens} patches")
    for step in range(args.steps):
        batch = torch.randint(0, len(ytr), (64,))
        loss = torch.nn.functional.cross_entropy(model(xtr[batch]), ytr[batch])
        lr = 1e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            with torch.no_grad():
                accuracy = (model(xte).argmax(1) == yte).float().mean().item()
            print(f"step {step + 1}: loss {loss.item():.3f}, held-out shape accuracy {accuracy:.1%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["caption", "classify"])
    p.add_argument("--dnd", default="target/release/dnd")
    p.add_argument("--captioner", default="crates/dnd-synth/zoo/captioner")
    p.add_argument("--scales", default="1.4,0.7")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if args.what == "caption":
            world = work / "world"
            caption(args, world, render(args.dnd, world, 200, 0))
        else:
            classify(args, work)


if __name__ == "__main__":
    main()
