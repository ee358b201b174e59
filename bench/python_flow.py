#!/usr/bin/env python3
"""The official Describe-and-Dissect flow, transcribed onto local models, as a timing baseline.

    python bench/python_flow.py --images DIR --out DIR --llm-url http://127.0.0.1:PORT/v1
        [--neurons 0,1,2,3] [--layer layer4] [--threads 2] [--seed 0] [--steps 50]
        [--size 64] [--guidance 7.5] [--probe-batch-size 200]

Our own transcription (no code copied) of the reference implementation's `describe_neurons.py`
with its helpers in `DnD_models.py`, `utils.py`, `scoring_function.py` and `data_utils.py`
(github.com/Trustworthy-ML-Lab/Describe-and-Dissect), step for step, on the repository's
random-weight fixture models, offline:

* target: torchvision's resnet18 with tests/fixtures/models/resnet18/model.safetensors (the
  float16 weights upcast to float32), ImageNet preprocessing (Resize 256, CenterCrop 224,
  Normalize); spatial channels average-pooled;
* captioner: BlipForConditionalGeneration + BlipProcessor from tests/fixtures/multimodal/blip;
* generator: StableDiffusionPipeline from tests/fixtures/multimodal/sd, fp32 on the CPU, the
  scheduler replaced by DPMSolverMultistepScheduler.from_config as the reference does;
* image similarity: CLIPModel + CLIPProcessor from tests/fixtures/multimodal/clip (the
  reference uses OpenAI's `clip.load`);
* language model: an OpenAI-compatible endpoint (--llm-url), the reference's prompts and
  few-shot turns (GPT_simplify, GPT_model_single with its re-feed), temperature 0.3.

The steps: stage 0 pools the layer's activations of every probe image and keeps the top 10
per neuron; stage 1 resizes each neuron's top images to 375x375 and crops them where the
neuron fires (the channel map through ToPILImage, resized to the image, Otsu threshold,
external contours, boxes by decreasing area, IoU <= 0.5 with the kept boxes and < 0.8 with
the whole image, at most 4 per image, each crop resized to 375x375); stage 2 re-ranks
originals and crops by the target's pooled activation, captions each neuron's top 10 with
BLIP (max_new_tokens 32, min_length 5), simplifies each caption with the LLM and asks it 5
times for a summary over shuffled simplified captions; the candidates are lower-cased,
stripped of a final '.', deduplicated, and "design(s)"/"graphic(s)" ones also tried as
"<label> background"; stage 3 generates 10 images per candidate ("One realistic image of
{}", 50 steps, guidance 7.5, one generator seeded 0 for the whole run, images resized to
32x32 as the reference does), ranks all of a neuron's generated images by its activation,
scores candidates by topk-sq-mean (beta 5) of their ranks, weighs that rank by the mean
CLIP cosine between the neuron's top images and the candidate's generated images among the
10 most activating, and keeps the top 3 labels.

Kept as the reference does them, because that is the script users run today: the target
model is loaded again in every call that needs it (get_attention_crops once per neuron,
get_target_activations for the re-ranking and once per neuron in stage 3, and
compare_images once per neuron, which also loads CLIP again each time); the target runs
one image at a time outside stage 0; BLIP captions the whole image list once per caption
batch (one batch of 10 here); every LLM call opens its own HTTP connection (requests.post);
stage 0's activations go through a file as utils.save_activations writes them.

Deliberate differences, none of which makes this side slower than the reference: no
matplotlib figure of the top images per neuron (utils.get_top_images draws and saves one);
stage 0 decodes in the main process (the reference's DataLoader uses 8 workers); progress
bars are off; the summary shuffles use random.Random(--seed) and the candidate set is
sorted (the reference's random.shuffle is unseeded and list(set(...)) follows hash order),
so that a run is reproducible; height/width are passed to the pipeline (the fixture SD is
64 px).

Timed (seconds, inside this process, written to --out/timings.json): `imports` (torch and
friends), `load` (BLIP and SD loaded up front, as the reference does), `probe` (stage 0,
its target load included), `crops` (stage 1 and stage 2's re-ranking activations, with
their target reloads: dnd counts its re-ranking in its crop stage too), `captions` (BLIP),
`llm` (every chat request, simplify and summary rounds, and the candidate clean-up),
`generation` (the SD pipeline calls), `scoring` (stage 3's target activations, ranking and
CLIP similarity, with their reloads), `total` (from the first import to the results
written), and the peak RSS of the process (MiB). Labels go to --out/labels.csv.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import csv  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torchvision import transforms  # noqa: E402
from transformers import (  # noqa: E402
    BlipForConditionalGeneration,
    BlipProcessor,
    CLIPModel,
    CLIPProcessor,
)
from transformers.utils import logging as hf_logging  # noqa: E402

_IMPORTS = time.perf_counter() - _T0

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}

# The reference's constants (describe_neurons.py).
NUM_IMAGES_TO_CHECK = 10
NUM_CROPS_PER_IMAGE = 4
BLIP_BATCH_SIZE = 10
CANVAS = 375
SUMMARY_ROUNDS = 5
REPLACE_SET = ("design", "designs", "graphic", "graphics")
IMAGES_PER_PROMPT = 10
TOP_K_PARAM = 10
BETA = 5
SD_PROMPT = "One realistic image of {}"
GENERATED_SIZE = 32
LLM_MODEL = "gpt-4-0125-preview"
TEMPERATURE = 0.3


class Stopwatch:
    """Seconds per stage, accumulated over every entry into it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# The target model (data_utils.get_target_model, utils.get_activation / get_target_activations)
# ---------------------------------------------------------------------------------------------

def imagenet_preprocess():
    return transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])


def load_target(model_dir: Path):
    """A fresh resnet18 with the fixture's weights, in eval mode, and its preprocessing."""
    model = torchvision.models.resnet18(num_classes=1000)
    state = {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise SystemExit(f"weights do not fit resnet18: missing {missing}, unexpected {unexpected}")
    return model.eval(), imagenet_preprocess()


def pooled_hook(outputs: list):
    """Average over space for conv layers, as the reference's 'avg' pool mode."""
    def hook(_module, _inputs, output):
        outputs.append(output.mean(dim=[2, 3]) if output.dim() == 4 else output)
    return hook


def map_hook(outputs: list):
    def hook(_module, _inputs, output):
        outputs.append(output.detach())
    return hook


def target_activations(model_dir: Path, layer: str, images: list) -> torch.Tensor:
    """utils.get_target_activations: load the target again, run it one image at a time."""
    model, preprocess = load_target(model_dir)
    feats: list = []
    handle = getattr(model, layer).register_forward_hook(pooled_hook(feats))
    with torch.no_grad():
        for image in images:
            model(preprocess(image).unsqueeze(0))
    handle.remove()
    return torch.cat(feats)


# ---------------------------------------------------------------------------------------------
# Stage 0: probe activations (utils.save_activations)
# ---------------------------------------------------------------------------------------------

class ProbeImages(torch.utils.data.Dataset):
    """The probe directory's images in name order, as PIL RGB (ImageFolder's loader)."""

    def __init__(self, directory: Path, transform=None) -> None:
        self.paths = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise SystemExit(f"no images in {directory}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with open(self.paths[index], "rb") as f:
            image = Image.open(f).convert("RGB")
        return (self.transform(image) if self.transform else image), 0


def probe(model_dir: Path, layer: str, images_dir: Path, batch_size: int, saved: Path):
    model, preprocess = load_target(model_dir)
    data = ProbeImages(images_dir, preprocess)
    feats: list = []
    handle = getattr(model, layer).register_forward_hook(pooled_hook(feats))
    with torch.no_grad():
        for batch, _ in torch.utils.data.DataLoader(data, batch_size, num_workers=0):
            model(batch)
    handle.remove()
    torch.save(torch.cat(feats), saved)
    return torch.load(saved, map_location="cpu")


# ---------------------------------------------------------------------------------------------
# Stage 1: attention crops (DnD_models.get_attention_crops)
# ---------------------------------------------------------------------------------------------

def iou(box, other) -> float:
    x1, y1, x2, y2 = box
    ox1, oy1, ox2, oy2 = other
    area = abs(x2 - x1) * abs(y2 - y1)
    other_area = abs(ox2 - ox1) * abs(oy2 - oy1)
    overlap = max(0, min(ox2, x2) - max(ox1, x1)) * max(0, min(oy2, y2) - max(oy1, y1))
    return overlap / (area + other_area - overlap)


def by_decreasing_area(a, b) -> int:
    area_a = abs(a[2] - a[0]) * abs(a[3] - a[1])
    area_b = abs(b[2] - b[0]) * abs(b[3] - b[1])
    return (area_a < area_b) - (area_a > area_b)


def attention_crops(model_dir: Path, layer: str, images: list, neuron: int) -> list:
    model, preprocess = load_target(model_dir)
    maps: list = []
    handle = getattr(model, layer).register_forward_hook(map_hook(maps))
    with torch.no_grad():
        for image in images:
            model(preprocess(image).unsqueeze(0))
    handle.remove()
    maps_t = torch.cat(maps)
    to_pil = transforms.ToPILImage()

    crops = []
    for image, fmap in zip(images, maps_t):
        # A float map through ToPILImage is scaled by 255 and cast to 8 bits, as the reference.
        heatmap = np.array(to_pil(fmap[neuron]).resize([image.size[0], image.size[1]]))
        _, thresh = cv2.threshold(heatmap, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        contours = cv2.findContours(thresh, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contours = contours[0] if len(contours) == 2 else contours[1]
        boxes = []
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            boxes.append((x, y, x + w, y + h))
        boxes.sort(key=functools.cmp_to_key(by_decreasing_area))
        whole = (0, 0, heatmap.shape[0], heatmap.shape[1])
        kept = []
        for box in boxes:
            if len(kept) == NUM_CROPS_PER_IMAGE:
                break
            if all(iou(box, k) <= 0.5 for k in kept) and iou(box, whole) < 0.8:
                crops.append(image.crop(box).resize([heatmap.shape[0], heatmap.shape[1]]))
                kept.append(box)
    return crops


# ---------------------------------------------------------------------------------------------
# Stage 2: captions (DnD_models.blip_caption) and the LLM (GPT_simplify, GPT_model_single)
# ---------------------------------------------------------------------------------------------

def blip_captions(model, processor, images: list) -> list[str]:
    """The reference captions the whole list once per batch of its DataLoader."""
    captions: list[str] = []
    for _ in range(math.ceil(len(images) / BLIP_BATCH_SIZE)):
        pixel_values = processor(images=images, return_tensors="pt").pixel_values
        with torch.no_grad():
            out = model.generate(pixel_values=pixel_values, max_new_tokens=32, min_length=5)
        captions.extend(processor.batch_decode(out, skip_special_tokens=True))
    # (The reference's clean-up of "output : ", "<|eos|>" and quotes does not write back.)
    return captions


class Chat:
    """POSTs to an OpenAI-compatible /chat/completions, one connection per call."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}
        self.calls = 0

    def __call__(self, messages: list[dict]) -> str:
        payload = {"model": LLM_MODEL, "messages": messages, "temperature": TEMPERATURE}
        response = requests.post(self.url, headers=self.headers, json=payload, timeout=120)
        response.raise_for_status()
        self.calls += 1
        return response.json()["choices"][0]["message"]["content"]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


SUMMARY_ASK = ("State one coherent and concise concept label that is 1-5 words long that can "
               "semantically summarize and represent most, not necessarily all, of the "
               "conceptual similarities in the following descriptions: ")
SUMMARY_SHOT_1 = ["a purple background with a very soft texture.",
                  "a brown background with a diagonal pattern of lines and lines.",
                  "a white windmill with a red door and a red door in the middle of the picture.",
                  "a beige background with a rough texture of linen.",
                  "a beige background with a rough texture and a very soft texture."]
SUMMARY_SHOT_2 = ["a little girl is sitting in a red tractor with the word sofy on the front.",
                  "a toy car sits on a red ottoman in a play room.",
                  "a red dress with silver studs and a silver belt.",
                  "a red chevrolet camaro is on display at a car show.",
                  "a red spool of a cable with the word red on it."]


def join_descriptions(descriptions: list[str]) -> str:
    """', ' between items, except after any item equal to the last one (the reference's rule)."""
    return "".join(d + (", " if d != descriptions[-1] else "") for d in descriptions)


def after_colon(reply: str) -> str:
    return reply.split(":")[1] if ":" in reply else reply


def gpt_simplify(chat: Chat, description: str) -> str:
    return chat([
        user("State one coherent and concise concept label that is 1-5 words long that "
             "simplifies the following description: a red background with a red background "
             "and a red background with a red background."),
        assistant("A red background"),
        user("Only state your answer without a period and quotation marks. Do not number your "
             "answer. State one coherent and concise concept label that simplifies the "
             "following description and deletes any unnecessary details: " + description),
    ])


def gpt_summary(chat: Chat, descriptions: list[str]) -> str:
    reply = chat([
        user(SUMMARY_ASK + ", ".join(SUMMARY_SHOT_1)),
        assistant("multicolored textiles"),
        user(SUMMARY_ASK + ", ".join(SUMMARY_SHOT_2)),
        assistant("red-themed scenes"),
        user("Only state your answer without a period and quotation marks and do not simply "
             "repeat the descriptions. State one coherent and concise concept label that is 1-5 "
             "words long and can semantically summarize and represent most, not necessarily "
             "all, of the conceptual similarities in the following descriptions: "
             + join_descriptions(descriptions)),
    ])
    reply = after_colon(reply)
    if "," in reply:  # a listing reply is fed back once to be merged
        reply = after_colon(chat([user(
            "Only state your answer without a period and do not simply repeat the "
            "descriptions. State one coherent and concise concept label that is 1-5 words long "
            "that can semantically summarize and represent most, not necessarily all, of the "
            "conceptual similarities in the following descriptions: "
            + join_descriptions(reply.split(",")))]))
    return reply


def candidates_of(labels: list[str]) -> list[str]:
    """describe_neurons.py's step-3 clean-up (sorted instead of set order, for reproducibility)."""
    words = [label.lower() for label in labels]
    for i, word in enumerate(words):  # the list grows while it is walked, as in the reference
        if word[-1] == ".":
            words[i] = word[:-1]
        if word.split()[-1] in REPLACE_SET:
            words.append(word + " background")
    return sorted(set(words))


# ---------------------------------------------------------------------------------------------
# Stage 3: scoring (utils.rank_images, scoring_function.topk_sq_mean / compare_images)
# ---------------------------------------------------------------------------------------------

def rank_images(feats: torch.Tensor, neuron: int, image_ids: dict[int, list[int]], images: list):
    order = torch.sort(feats, dim=0, descending=True).indices[:, neuron].tolist()
    ranks, highest = {}, {}
    for label_id, ids in image_ids.items():
        members = set(ids)
        ranks[label_id] = sorted(i for i, img in enumerate(order) if img in members)
        highest[label_id] = [images[img] for i, img in enumerate(order)
                             if img in members and i < TOP_K_PARAM]
    return ranks, highest


def topk_sq_mean(ranks: dict[int, list[int]], k: int) -> list[tuple[float, int]]:
    values = []
    for label_id, r in ranks.items():
        if not r:
            values.append((len(ranks) + 1, label_id))
        else:
            top = r[:k]
            values.append((sum(v * v for v in top) / len(top), label_id))
    return sorted(values)


def clip_image_features(model, processor, images: list) -> torch.Tensor:
    """utils.get_clip_image_features: one image at a time."""
    features = []
    with torch.no_grad():
        for image in images:
            out = model.get_image_features(pixel_values=processor(images=image,
                                                                  return_tensors="pt").pixel_values)
            features.append(out if torch.is_tensor(out) else out.pooler_output)
    return torch.cat(features).float()


def compare_images(clip_dir: Path, target_dir: Path, top_images: list,
                   generated: dict[int, list]) -> list[tuple[float, int]]:
    """Loads CLIP and (unused, as the reference) the target again; mean cosine per label."""
    clip_model = CLIPModel.from_pretrained(clip_dir).eval()
    clip_processor = CLIPProcessor.from_pretrained(clip_dir)
    load_target(target_dir)
    target = clip_image_features(clip_model, clip_processor, top_images)
    target /= target.norm(dim=-1, keepdim=True)
    values = []
    for label_id, images in generated.items():
        if not images:
            values.append((-1.0, label_id))
            continue
        feats = clip_image_features(clip_model, clip_processor, images)
        feats /= feats.norm(dim=-1, keepdim=True)
        values.append((float((target @ feats.T).mean()), label_id))
    return sorted(values, reverse=True)


# ---------------------------------------------------------------------------------------------
# The flow (describe_neurons.py's main)
# ---------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="the probe images (a directory)")
    parser.add_argument("--out", type=Path, required=True, help="labels.csv and timings.json go here")
    parser.add_argument("--llm-url", required=True, help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--llm-key", default="stub", help="bearer token sent to the endpoint")
    parser.add_argument("--target", type=Path, default=FIXTURES / "models" / "resnet18")
    parser.add_argument("--blip", type=Path, default=FIXTURES / "multimodal" / "blip")
    parser.add_argument("--clip", type=Path, default=FIXTURES / "multimodal" / "clip")
    parser.add_argument("--sd", type=Path, default=FIXTURES / "multimodal" / "sd")
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--neurons", default="0,1,2,3", help="comma-separated channel ids")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seeds the summary shuffles")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--size", type=int, default=64, help="generated image side (pixels)")
    parser.add_argument("--probe-batch-size", type=int, default=200)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    for logging in (hf_logging, diffusers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    neurons = [int(n) for n in args.neurons.split(",")]
    layer = args.layer
    watch = Stopwatch()
    rng = random.Random(args.seed)
    chat = Chat(args.llm_url, args.llm_key)

    with watch.stage("load"):
        blip_processor = BlipProcessor.from_pretrained(args.blip)
        blip = BlipForConditionalGeneration.from_pretrained(args.blip).eval()
        pipe = StableDiffusionPipeline.from_pretrained(args.sd, dtype=torch.float32,
                                                       safety_checker=None)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)

    # Stage 0.
    with watch.stage("probe"):
        feats = probe(args.target, layer, args.images, args.probe_batch_size,
                      args.out / f"activations_{layer}.pt")
        probe_images = ProbeImages(args.images)
        top_ids = torch.topk(feats, k=NUM_IMAGES_TO_CHECK, dim=0).indices

    # Stage 1, then stage 2's re-ranking of originals and crops together.
    with watch.stage("crops"):
        all_imgs: list = []
        img_ids: dict[int, list[int]] = {n: [] for n in neurons}
        for neuron in neurons:
            activating = []
            for top_id in top_ids[:, neuron].tolist():
                image = probe_images[top_id][0].resize([CANVAS, CANVAS])
                img_ids[neuron].append(len(all_imgs))
                all_imgs.append(image)
                activating.append(image)
            for crop in attention_crops(args.target, layer, activating, neuron):
                img_ids[neuron].append(len(all_imgs))
                all_imgs.append(crop)
        order = torch.sort(target_activations(args.target, layer, all_imgs), dim=0,
                           descending=True).indices

    candidates: dict[int, list[str]] = {}
    top_images: dict[int, list] = {}
    captions_of: dict[int, list[str]] = {}
    summaries: dict[int, list[str]] = {}
    for neuron in neurons:
        own = set(img_ids[neuron])
        top_images[neuron] = [all_imgs[i] for i in order[:, neuron].tolist()
                              if i in own][:min(BLIP_BATCH_SIZE, NUM_IMAGES_TO_CHECK)]
        with watch.stage("captions"):
            captions_of[neuron] = blip_captions(blip, blip_processor, top_images[neuron])
        with watch.stage("llm"):
            descriptions = [gpt_simplify(chat, c) for c in captions_of[neuron]]
            summaries[neuron] = []
            for _ in range(SUMMARY_ROUNDS):
                summaries[neuron].append(gpt_summary(chat, descriptions))
                rng.shuffle(descriptions)
            candidates[neuron] = candidates_of(summaries[neuron])

    # Stage 3.
    labels: dict[int, list[str]] = {}
    generated_count = 0
    for neuron in neurons:
        words = candidates[neuron]
        sd_images: list = []
        image_ids: dict[int, list[int]] = {}
        with watch.stage("generation"):
            for label_id, word in enumerate(words):
                out = pipe(SD_PROMPT.format(word), generator=generator,
                           num_images_per_prompt=IMAGES_PER_PROMPT,
                           num_inference_steps=args.steps, guidance_scale=args.guidance,
                           height=args.size, width=args.size)
                image_ids[label_id] = []
                for image in out.images:
                    image_ids[label_id].append(len(sd_images))
                    sd_images.append(image.resize([GENERATED_SIZE, GENERATED_SIZE]))
        generated_count += len(sd_images)
        with watch.stage("scoring"):
            feats = target_activations(args.target, layer, sd_images)
            ranks, highest = rank_images(feats, neuron, image_ids, sd_images)
            weights = compare_images(args.clip, args.target, top_images[neuron], highest)
            by_rank = topk_sq_mean(ranks, BETA)
            position = {label_id: i for i, (_, label_id) in enumerate(by_rank)}
            combined = sorted(((len(by_rank) - position[label_id]) * weight, label_id)
                              for weight, label_id in weights)[::-1]
            labels[neuron] = [words[label_id] for _, label_id in combined[:3]]

    with open(args.out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["neuron", "label_1", "label_2", "label_3", "candidates"])
        for neuron in neurons:
            row = labels[neuron] + [""] * (3 - len(labels[neuron]))
            writer.writerow([neuron, *row, "|".join(candidates[neuron])])
    total = time.perf_counter() - _T0
    timings = {
        "total": total,
        "imports": _IMPORTS,
        **{k: watch.seconds.get(k, 0.0) for k in
           ("load", "probe", "crops", "captions", "llm", "generation", "scoring")},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": args.threads,
        "neurons": neurons,
        "probe_images": len(probe_images),
        "crops_and_originals": len(all_imgs),
        "llm_calls": chat.calls,
        "candidates": sum(len(c) for c in candidates.values()),
        "images_generated": generated_count,
        "caption_texts": captions_of,
        "summaries": summaries,
        "labels": labels,
    }
    (args.out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(json.dumps({k: v for k, v in timings.items()
                      if k not in ("caption_texts", "summaries", "labels")}))


if __name__ == "__main__":
    main()
