#!/usr/bin/env python3
"""Side-by-side benchmark of the multimodal stages: transformers/diffusers vs `dnd caption` / `dnd generate`.

    python bench/multimodal_bench.py --dnd target/release/dnd [--only caption|unet|both]
        [--images 16] [--batch-size 8] [--steps 4] [--threads 2] [--workdir /tmp/dnd-mm-bench]
        [--torch-only | --dnd-only] [--force-setup] [--timeout 3600]

Both sides run on the same CPU, with the same thread count, in the same invocation, each
in its own subprocess (its own peak RSS, from wait4 and from what the side reports).
While each side runs, the CPU time used by *other* processes is recorded; the report
warns when it exceeds 5% of the machine (numbers taken next to a compiler are not
worth much).

No weights are downloaded: every model is randomly initialised from a config written
out below (real architecture sizes), saved once into --workdir and reused afterwards
(a marker file records the exact recipe; a changed recipe or --force-setup rebuilds).

1. Captioning (``--only caption``), BLIP-base sized ``BlipForConditionalGeneration``
   (the Salesforce/blip-image-captioning-base architecture: ViT-B/16 at 384x384 +
   BERT-base decoder with cross-attention, vocab 30524), ``<workdir>/blip-base/``:
   ``config.json``, ``model.safetensors``, ``generation_config.json``,
   ``preprocessor_config.json`` (BlipImageProcessor 384x384 bicubic, CLIP mean/std),
   ``processor_config.json``, ``tokenizer.json`` + ``tokenizer_config.json`` (a
   BERT-style WordPiece vocabulary of exactly 30524 entries: [PAD]=0, [UNK]=100,
   [CLS]=101, [SEP]=102, [MASK]=103, pseudo-word fillers, [DEC]=30522, [ENC]=30523).
   Every caption is exactly ``CAPTION_TOKENS`` (20) new tokens on both sides
   (min_new_tokens = max_new_tokens = 20: [SEP] is masked at every step), so both do the
   same amount of decoding whatever the random weights prefer; no [SEP] bias is added.
   ``initializer_range`` is the HF default 0.02 for the text and vision towers (HF's
   vision default is 1e-10); that gives varied, image-dependent captions at this size.
   * transformers: ``BlipProcessor`` + ``model.generate(pixel_values,
     min_new_tokens=20, max_new_tokens=20, num_beams=1, do_sample=False)`` +
     ``batch_decode``, batches of --batch-size over --images procedural 500x375 JPEGs
     (the scenes of bench/probe_bench.py); JPEG decode + preprocessing included in the
     timing; one warm-up batch excluded.
   * dnd: ``<dnd> caption --model <workdir>/blip-base --batch-size B --min-new-tokens 20
     --max-new-tokens 20 --threads T --summary-json <file> <images...>``.
2. UNet steps (``--only unet``), a Stable Diffusion v1.5 sized pipeline directory
   ``<workdir>/sd15/`` (``StableDiffusionPipeline.save_pretrained``): ``unet/`` (SD v1.5
   UNet2DConditionModel config), ``vae/`` (SD v1.5 AutoencoderKL config), ``text_encoder/``
   (CLIP ViT-L/14 text tower: CLIPTextModel 768 x 12 layers, quick_gelu, 77 positions,
   vocab 49408), ``tokenizer/`` (a CLIP-format byte-level BPE tokenizer.json with
   49408 ids: 256 byte chars, 256 byte chars + '</w>', merges that make the prompt words
   single tokens, fillers, <|startoftext|>=49406, <|endoftext|>=49407; RobertaProcessing
   puts bos/eos around the text; pad = <|endoftext|>), ``scheduler/`` (DDIMScheduler, SD
   v1.5 betas) and ``model_index.json``. About 4.3 GB of float32 weights.
   * diffusers: ``StableDiffusionPipeline.from_pretrained`` (float32); the prompt
     "a red circle" and "" encoded as the pipeline does (2 x 77 x 768); 64x64 latents
     (512x512 image); one guided UNet evaluation on the batch of 2 as warm-up (excluded),
     then --steps DDIM steps are timed, each = cat([x, x]) + scale_model_input + UNet on
     batch 2 + guidance (7.5) + scheduler.step, exactly the pipeline's loop. Text encoding
     and one VAE decode (512x512) are timed separately, for context.
   * dnd: ``<dnd> generate --model <workdir>/sd15 --prompt "a red circle" --count 1
     --steps S --guidance 7.5 --width 512 --height 512 --threads T --out <workdir>/gen
     --summary-json <file>``; dnd's seconds_per_step includes its first step (no warm-up).

A markdown table per benchmark is printed (and the CPU model, versions, the exact
command); everything is also written to ``<workdir>/multimodal_bench.json``. When the
dnd side fails (e.g. its subcommand is missing), the error is reported and the
reference rows are still printed; the exit status is then 1.

Needs torch, torchvision, transformers, diffusers, tokenizers, safetensors, pillow, numpy
(tests/fixtures/requirements-multimodal.txt has the tested versions). Model creation
takes about half a minute (2-core AMD EPYC, AVX-512: BLIP 6 s, SD 24 s) and 5 GB of
disk; the defaults (--images 16, --steps 4) take a few minutes in all on 2 cores, most
of it the two 512x512 VAE decodes and the UNet steps.
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
sys.path.insert(0, str(HERE.parent))
import probe_bench as pb  # noqa: E402  (stdlib-only at import time: images, RSS and contention helpers)

# Children: no hub access, quiet libraries. (dnd ignores these.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RECIPE_VERSION = 1
MARKER = ".multimodal_bench.json"
MODEL_SEED = 0
CAPTION_TOKENS = 20
# initializer_range of BlipConfig, text_config and vision_config (HF: 0.02, 0.02, 1e-10). At BLIP-base size 0.02
# gives varied, image-dependent greedy captions (17-20 distinct tokens out of 20); 0.05 already collapses every
# caption into one repeated token. The caption length is forced (CAPTION_TOKENS), so no [SEP] bias is needed.
INIT_RANGE = 0.02
SD_PROMPT = "a red circle"
SD_GUIDANCE = 7.5
SD_HW = 512
LATENT_SEED = 0

CAPTION_SUMMARY_KEYS = ("images", "seconds", "captions_per_second", "peak_rss_mib")
GENERATE_SUMMARY_KEYS = ("images", "steps", "denoise_seconds", "seconds_per_step", "peak_rss_mib")


def log(msg: str) -> None:
    print(f"[multimodal_bench] {msg}", file=sys.stderr, flush=True)


pb.log = log  # pb.setup_images logs through this


# --------------------------------------------------------------------------
# Model recipes (configs written out by hand: nothing is downloaded)
# --------------------------------------------------------------------------

BLIP_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, "[DEC]": 30522, "[ENC]": 30523}
BLIP_VOCAB = 30524
BLIP_WORDS = (
    "a an the and on of with in is picture image photo background striped dotted small large red green blue "
    "yellow orange purple black white gray brown pink circle square triangle ring dot dots stripes shape gradient"
).split()

# Salesforce/blip-image-captioning-base, written out.
BLIP_CONFIG = dict(
    vision_config=dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=384,
        patch_size=16,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=512,
        initializer_range=INIT_RANGE,
    ),
    text_config=dict(
        vocab_size=BLIP_VOCAB,
        hidden_size=768,
        encoder_hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=512,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        projection_dim=768,
        bos_token_id=30522,
        sep_token_id=102,
        eos_token_id=102,
        pad_token_id=0,
        initializer_range=INIT_RANGE,
    ),
    projection_dim=512,
    image_text_hidden_size=256,
    initializer_range=INIT_RANGE,
)
BLIP_IMAGE_PROCESSOR = dict(size={"height": 384, "width": 384}, resample="BICUBIC", mean_std="OPENAI_CLIP_MEAN/STD")

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_VOCAB = 49408
CLIP_SPLIT_REGEX = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# runwayml/stable-diffusion-v1-5 unet/config.json, written out.
SD_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD_TEXT = dict(
    vocab_size=CLIP_VOCAB,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
DDIM_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


def recipe(kind: str) -> dict:
    """What a saved model directory was made from; a mismatch means 'rebuild'."""
    if kind == "blip":
        r = {"config": BLIP_CONFIG, "image_processor": BLIP_IMAGE_PROCESSOR, "specials": BLIP_SPECIALS, "words": BLIP_WORDS}
    else:
        r = {"unet": SD_UNET, "vae": SD_VAE, "text": SD_TEXT, "ddim": DDIM_CONFIG, "split": CLIP_SPLIT_REGEX}
    return json.loads(json.dumps({"version": RECIPE_VERSION, "kind": kind, "seed": MODEL_SEED, **r}))


def _pseudo_words():
    """Deterministic filler vocabulary: consonant-vowel syllable words, every 8th also as a '##' piece."""
    import itertools

    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    n = 0
    for k in (1, 2, 3):
        for combo in itertools.product(syllables, repeat=k):
            w = "".join(combo)
            yield w
            n += 1
            if n % 8 == 0:
                yield "##" + w


def build_blip_tokenizer():
    """BERT-style WordPiece tokenizer.json with exactly BLIP_VOCAB ids (only decoding matters here)."""
    import itertools

    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizer

    vocab_list: list = [None] * BLIP_VOCAB
    for t, i in BLIP_SPECIALS.items():
        vocab_list[i] = t
    for i in range(1, 100):
        vocab_list[i] = f"[unused{i - 1}]"
    seen = {t for t in vocab_list if t is not None}
    words = itertools.chain(BLIP_WORDS, _pseudo_words())
    for i in range(BLIP_VOCAB):
        if vocab_list[i] is None:
            w = next(words)
            while w in seen:
                w = next(words)
            vocab_list[i] = w
            seen.add(w)
    vocab = {t: i for i, t in enumerate(vocab_list)}
    assert len(vocab) == BLIP_VOCAB
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BLIP_SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 101), ("[SEP]", 102)],
    )
    assert tok.get_vocab_size() == BLIP_VOCAB and all(tok.token_to_id(t) == i for t, i in BLIP_SPECIALS.items())
    return BertTokenizer(
        tokenizer_object=tok, bos_token="[DEC]", additional_special_tokens=["[ENC]"], do_lower_case=True, model_max_length=512
    )


def _bytes_to_unicode() -> list:
    """GPT-2 / CLIP byte -> printable unicode table, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(
        range(ord("\u00ae"), ord("\u00ff") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_clip_tokenizer():
    """CLIP-format byte-level BPE with CLIP_VOCAB ids; the prompt words are single tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPTokenizer

    alphabet = _bytes_to_unicode()
    vocab_list = alphabet + [a + "</w>" for a in alphabet]
    seen = set(vocab_list)
    merges = []
    # Left-to-right merges per word: r+e -> re, re+d</w> -> red</w>. Words sharing pieces may end up as
    # 2-3 tokens; any valid ids will do.
    for word in BLIP_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        cur = pieces[0]
        for p in pieces[1:]:
            if (cur, p) not in merges:
                merges.append((cur, p))
            cur = cur + p
            if cur not in seen:
                vocab_list.append(cur)
                seen.add(cur)
    i = 0
    while len(vocab_list) < CLIP_VOCAB - 2:
        vocab_list.append(f"filler{i}</w>")
        i += 1
    vocab_list += [CLIP_BOS, CLIP_EOS]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    assert len(vocab) == CLIP_VOCAB
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="</w>",
                   fuse_unk=False, unk_token=CLIP_EOS)
    )
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_REGEX), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (CLIP_BOS, CLIP_EOS)])
    tok.post_processor = processors.RobertaProcessing(
        (CLIP_EOS, CLIP_VOCAB - 1), (CLIP_BOS, CLIP_VOCAB - 2), trim_offsets=False, add_prefix_space=False
    )
    assert tok.token_to_id(CLIP_BOS) == 49406 and tok.token_to_id(CLIP_EOS) == 49407
    return CLIPTokenizer(
        tokenizer_object=tok, bos_token=CLIP_BOS, eos_token=CLIP_EOS, pad_token=CLIP_EOS, unk_token=CLIP_EOS, model_max_length=77
    )


def _prepare_dir(d: Path, kind: str, force: bool) -> bool:
    """True when d already holds this recipe (reuse). Otherwise empties d (only if this script made it)."""
    marker = d / MARKER
    if marker.exists() and not force:
        try:
            if json.loads(marker.read_text()).get("recipe") == recipe(kind):
                return True
        except json.JSONDecodeError:
            pass
    if d.exists():
        if not marker.exists() and any(d.iterdir()):
            raise SystemExit(f"{d} exists and was not made by this script; use another --workdir")
        shutil.rmtree(d)
    return False


def setup_blip(workdir: Path, force: bool) -> dict:
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    d = workdir / "blip-base"
    if _prepare_dir(d, "blip", force):
        log(f"reusing {d}")
        return {"dir": str(d), "reused": True}
    t0 = time.perf_counter()
    tok = build_blip_tokenizer()
    torch.manual_seed(MODEL_SEED)
    model = BlipForConditionalGeneration(BlipConfig(**BLIP_CONFIG)).eval()
    n_params = sum(p.numel() for p in model.parameters())
    t_init = time.perf_counter() - t0
    ip = BlipImageProcessor(
        size={"height": 384, "width": 384},
        resample=PILImageResampling.BICUBIC,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    model.save_pretrained(d)
    BlipProcessor(image_processor=ip, tokenizer=tok).save_pretrained(d)  # processor_config.json, tokenizer files
    ip.save_pretrained(d)  # the flat preprocessor_config.json real checkpoints carry
    for f in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"):
        if not (d / f).is_file():
            raise SystemExit(f"save_pretrained did not write {d / f} (sharded?): {sorted(os.listdir(d))}")
    seconds = time.perf_counter() - t0
    (d / MARKER).write_text(json.dumps({"recipe": recipe("blip"), "seconds": seconds}, indent=1) + "\n")
    size = sum(p.stat().st_size for p in d.iterdir()) / 2**20
    log(f"wrote {d} ({n_params / 1e6:.1f} M parameters, {size:.0f} MiB) in {seconds:.1f}s (init {t_init:.1f}s)")
    return {"dir": str(d), "reused": False, "seconds": seconds, "parameters": n_params, "mib": size}


def setup_sd(workdir: Path, force: bool) -> dict:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tokenizers import Tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    d = workdir / "sd15"
    if _prepare_dir(d, "sd", force):
        log(f"reusing {d}")
        return {"dir": str(d), "reused": True}
    t0 = time.perf_counter()
    tok = build_clip_tokenizer()
    torch.manual_seed(MODEL_SEED)
    unet = UNet2DConditionModel(**SD_UNET).eval()
    torch.manual_seed(MODEL_SEED)
    vae = AutoencoderKL(**SD_VAE).eval()
    torch.manual_seed(MODEL_SEED)
    text = CLIPTextModel(CLIPTextConfig(**SD_TEXT)).eval()
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in (("unet", unet), ("vae", vae), ("text_encoder", text))}
    t_init = time.perf_counter() - t0
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=DDIMScheduler(**DDIM_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(d, safe_serialization=True)
    for f in (
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
    ):
        if not (d / f).is_file():
            raise SystemExit(f"save_pretrained did not write {d / f} (sharded?)")
    # The saved tokenizer must put bos/eos around the prompt, both through transformers and the raw file.
    ids = CLIPTokenizer.from_pretrained(d / "tokenizer")(SD_PROMPT).input_ids
    raw = Tokenizer.from_file(str(d / "tokenizer" / "tokenizer.json")).encode(SD_PROMPT).ids
    assert ids == raw and ids[0] == 49406 and ids[-1] == 49407 and max(ids) < CLIP_VOCAB, (ids, raw)
    seconds = time.perf_counter() - t0
    (d / MARKER).write_text(json.dumps({"recipe": recipe("sd"), "seconds": seconds}, indent=1) + "\n")
    size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) / 2**20
    log(f"wrote {d} ({ {k: f'{v / 1e6:.1f} M' for k, v in params.items()} }, {size:.0f} MiB) in {seconds:.1f}s "
        f"(init {t_init:.1f}s); prompt ids {ids}")
    return {"dir": str(d), "reused": False, "seconds": seconds, "parameters": params, "mib": size, "prompt_ids": ids}


def versions() -> dict:
    import diffusers
    import numpy
    import PIL
    import safetensors
    import tokenizers
    import torch
    import torchvision
    import transformers

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "pillow": PIL.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def setup_worker(args: argparse.Namespace) -> int:
    """Runs in a subprocess so that the driver never holds torch (children inherit ru_maxrss)."""
    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    info = {"versions": versions()}
    if args.only in ("caption", "both"):
        t0 = time.perf_counter()
        info["images_dir"] = str(pb.setup_images(workdir, args.images, args.force_setup))
        info["images_seconds"] = time.perf_counter() - t0
        info["blip"] = setup_blip(workdir, args.force_setup)
    if args.only in ("unet", "both"):
        info["sd"] = setup_sd(workdir, args.force_setup)
    Path(args.result_json).write_text(json.dumps(info, indent=1) + "\n")
    return 0


# --------------------------------------------------------------------------
# Reference workers (each in its own process)
# --------------------------------------------------------------------------


def _torch_threads(n: int):
    import torch

    torch.set_num_threads(n)
    torch.set_num_interop_threads(1)
    return torch


def _peak() -> dict:
    # Linux: KiB -> MiB. ru_maxrss is inherited across fork+exec (starts at the parent's high-water mark),
    # which is why the driver never imports torch; VmHWM (per address space, reset by exec) as a cross-check.
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "vmhwm_mib": pb.vmhwm_mib()}


def caption_worker(args: argparse.Namespace) -> int:
    torch = _torch_threads(args.threads)
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    t0 = time.perf_counter()
    model_dir = Path(args.model_dir)
    processor = BlipProcessor.from_pretrained(model_dir)
    model = BlipForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    load_seconds = time.perf_counter() - t0
    files = sorted(p for p in Path(args.images_dir).iterdir() if p.is_file())
    bs, n_tok = args.batch_size, CAPTION_TOKENS
    gen_kwargs = dict(min_new_tokens=n_tok, max_new_tokens=n_tok, num_beams=1, do_sample=False)

    def load(p: Path):
        with Image.open(p) as im:
            return im.convert("RGB")

    def run_batch(batch):
        pv = processor(images=[load(p) for p in batch], return_tensors="pt")["pixel_values"]
        ids = model.generate(pixel_values=pv, **gen_kwargs)
        return ids, processor.batch_decode(ids, skip_special_tokens=True)

    with torch.inference_mode():
        t0 = time.perf_counter()
        run_batch(files[:bs])  # warm-up batch, not in `seconds`
        warmup_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        ids_all, captions = [], []
        for start in range(0, len(files), bs):
            ids, texts = run_batch(files[start : start + bs])
            ids_all += ids.tolist()
            captions += texts
        seconds = time.perf_counter() - t0

    # ids include the leading [DEC]; exactly n_tok new tokens, never [SEP]/[PAD].
    new = [row[1:] for row in ids_all]
    sep, pad = model.config.text_config.sep_token_id, model.config.text_config.pad_token_id
    bad = [i for i, row in enumerate(new) if len(row) != n_tok or sep in row or pad in row]
    out = {
        "implementation": "transformers",
        "images": len(files),
        "batch_size": bs,
        "threads": args.threads,
        "new_tokens_per_caption": n_tok,
        "seconds": seconds,
        "captions_per_second": len(files) / seconds if seconds > 0 else None,
        "tokens_per_second": len(files) * n_tok / seconds if seconds > 0 else None,
        "warmup_batch_seconds": warmup_seconds,
        "load_seconds": load_seconds,
        **_peak(),
        "distinct_captions": len(set(captions)),
        "captions": {p.name: c for p, c in zip(files, captions)},
        "token_ids": {p.name: row for p, row in zip(files, ids_all)},
        "attn_implementation": model.config._attn_implementation,
        "image_processor": type(processor.image_processor).__name__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
    }
    if bad:
        out["error"] = f"captions {bad} do not have exactly {n_tok} new tokens"
    Path(args.result_json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


def unet_worker(args: argparse.Namespace) -> int:
    torch = _torch_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        args.model_dir, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    load_seconds = time.perf_counter() - t0
    unet, sched, vae = pipe.unet, pipe.scheduler, pipe.vae
    lh, lw = SD_HW // pipe.vae_scale_factor, SD_HW // pipe.vae_scale_factor

    with torch.inference_mode():
        t0 = time.perf_counter()
        cond, uncond = pipe.encode_prompt(SD_PROMPT, "cpu", 1, True, negative_prompt=None)
        text_seconds = time.perf_counter() - t0
        emb = torch.cat([uncond, cond])  # [uncond, cond], as the pipeline
        assert tuple(emb.shape) == (2, 77, 768), emb.shape
        sched.set_timesteps(args.steps)
        timesteps = sched.timesteps
        g = torch.Generator().manual_seed(LATENT_SEED)
        x = torch.randn((1, unet.config.in_channels, lh, lw), generator=g, dtype=torch.float32) * sched.init_noise_sigma

        # warm-up: one guided UNet evaluation, not in `seconds`
        t0 = time.perf_counter()
        unet(sched.scale_model_input(torch.cat([x, x]), timesteps[0]), timesteps[0], encoder_hidden_states=emb).sample
        warmup_seconds = time.perf_counter() - t0

        per_step = []
        t0 = time.perf_counter()
        for t in timesteps:
            ts = time.perf_counter()
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            eps = unet(inp, t, encoder_hidden_states=emb, return_dict=False)[0]
            eu, ec = eps.chunk(2)
            eps = eu + SD_GUIDANCE * (ec - eu)
            x = sched.step(eps, t, x, eta=0.0, return_dict=False)[0]
            per_step.append(time.perf_counter() - ts)
        seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        img = vae.decode(x / vae.config.scaling_factor, return_dict=False)[0]
        decode_seconds = time.perf_counter() - t0

    steps = len(timesteps)
    out = {
        "implementation": "diffusers",
        "steps": steps,
        "threads": args.threads,
        "latents": [2, unet.config.in_channels, lh, lw],
        "encoder_hidden_states": list(emb.shape),
        "seconds": seconds,
        "seconds_per_step": seconds / steps,
        "steps_per_second": steps / seconds if seconds > 0 else None,
        "per_step_seconds": per_step,
        "warmup_eval_seconds": warmup_seconds,
        "text_encode_seconds": text_seconds,
        "vae_decode_seconds": decode_seconds,
        "end_to_end_seconds": text_seconds + seconds + decode_seconds,
        "load_seconds": load_seconds,
        **_peak(),
        "timesteps": [int(t) for t in timesteps],
        "final_latents_finite": bool(torch.isfinite(x).all()),
        "image_shape": list(img.shape),
        "attn_processor": sorted({type(p).__name__ for p in unet.attn_processors.values()}),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
    }
    Path(args.result_json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


# --------------------------------------------------------------------------
# Running the sides
# --------------------------------------------------------------------------


def run_reference(args, name: str, worker_flag: str, model_dir: Path, extra: list, workdir: Path) -> dict:
    result_json = workdir / f"{name}-reference-result.json"
    if result_json.exists():
        result_json.unlink()
    cmd = [
        sys.executable,
        str(HERE),
        worker_flag,
        "--model-dir",
        str(model_dir),
        "--threads",
        str(args.threads),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--result-json",
        str(result_json),
        *extra,
    ]
    impl = "transformers" if name == "caption" else "diffusers"
    log(f"{name} / {impl}: " + shlex.join(cmd))
    logf = workdir / f"{name}-reference.log"
    m = pb.run_measured(cmd, logf, args.timeout)
    if m.get("rc") != 0 or not result_json.exists():
        msg = m.get("error") or f"exit status {m.get('rc')}"
        log(f"{name} reference side FAILED ({msg}); last lines of {logf}:\n{pb.tail(logf)}")
        return {"implementation": impl, "error": msg, "command": shlex.join(cmd), **m}
    res = json.loads(result_json.read_text())
    res.update({k: v for k, v in m.items() if k != "rc"}, command=shlex.join(cmd))
    if res.get("error"):
        log(f"{name} reference side: {res['error']}")
    return res


def resolve_dnd(dnd: Path) -> tuple[Path | None, str | None]:
    p = dnd
    if not p.is_file() and shutil.which(str(dnd)):
        p = Path(shutil.which(str(dnd)))
    if not (p.is_file() and os.access(p, os.X_OK)):
        return None, f"dnd binary not found or not executable: {dnd} (build it first, e.g. cargo build --release)"
    return p.resolve(), None


def dnd_version(dnd: Path | None) -> str | None:
    if dnd is None:
        return None
    try:
        r = subprocess.run([str(dnd), "--version"], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def run_dnd(args, name: str, cmd_tail: list, summary: Path, keys: tuple, workdir: Path) -> dict:
    if summary.exists():
        summary.unlink()
    dnd, err = resolve_dnd(args.dnd)
    cmd = [str(dnd or args.dnd), *cmd_tail]
    base = {"implementation": "dnd", "command": shlex.join(cmd), "threads": args.threads}
    if err:
        log(f"{name} dnd side FAILED: {err}")
        return {**base, "error": err}
    log(f"{name} / dnd: " + shlex.join(cmd))
    logf = workdir / f"{name}-dnd.log"
    m = pb.run_measured(cmd, logf, args.timeout)
    if m.get("rc") != 0:
        msg = m.get("error") or f"exit status {m.get('rc')}"
        last = [ln.strip() for ln in pb.tail(logf, 12).splitlines() if ln.strip()]
        errs = [ln for ln in last if "error" in ln.lower()]
        if errs or last:
            msg += f": {(errs or last)[-1][:300]}"
        log(f"{name} dnd side FAILED ({msg}); last lines of {logf}:\n{pb.tail(logf)}")
        return {**base, **m, "error": msg}
    if not summary.exists():
        msg = f"dnd exited 0 but did not write {summary}"
        log(f"{name} dnd side FAILED: {msg}")
        return {**base, **m, "error": msg}
    try:
        s = json.loads(summary.read_text())
    except json.JSONDecodeError as e:
        log(f"{name} dnd side FAILED: {summary} is not valid JSON: {e}")
        return {**base, **m, "error": f"bad summary json: {e}"}
    res = {**base, **m, "summary": s, **{k: s[k] for k in keys if k in s}}
    missing = [k for k in keys if k not in s]
    if missing:
        res["error"] = f"summary lacks keys {missing}"
        log(f"{name} dnd summary {summary} lacks keys {missing}")
    return res


def caption_side_by_side(args, setup: dict, workdir: Path) -> dict:
    model_dir, img_dir = Path(setup["blip"]["dir"]), Path(setup["images_dir"])
    files = sorted(str(p) for p in img_dir.iterdir() if p.is_file())
    results = []
    if not args.dnd_only:
        results.append(run_reference(args, "caption", "--_caption-worker", model_dir, ["--images-dir", str(img_dir)], workdir))
    if not args.torch_only:
        summary = workdir / "caption-dnd-summary.json"
        tail = [
            "caption",
            "--model", str(model_dir),
            "--batch-size", str(args.batch_size),
            "--min-new-tokens", str(CAPTION_TOKENS),
            "--max-new-tokens", str(CAPTION_TOKENS),
            "--threads", str(args.threads),
            "--summary-json", str(summary),
            *files,
        ]  # fmt: skip
        r = run_dnd(args, "caption", tail, summary, CAPTION_SUMMARY_KEYS, workdir)
        r["batch_size"] = args.batch_size
        if isinstance(r.get("seconds"), (int, float)) and r["seconds"] > 0 and isinstance(r.get("images"), int):
            r["tokens_per_second"] = r["images"] * CAPTION_TOKENS / r["seconds"]
        if isinstance(r.get("images"), int) and r["images"] != args.images and not r.get("error"):
            r["error"] = f"dnd captioned {r['images']} images, expected {args.images}"
        results.append(r)
    agreement = None
    ref = next((r for r in results if r["implementation"] == "transformers" and "captions" in r), None)
    dnd_r = next((r for r in results if r["implementation"] == "dnd" and not r.get("error")), None)
    if ref and dnd_r:
        # dnd prints "<path>\t<caption>" per image; compare whole captions.
        got = {}
        for line in (workdir / "caption-dnd.log").read_text(errors="replace").splitlines():
            if "\t" in line:
                path, text = line.split("\t", 1)
                got[Path(path).name] = text.strip()
        same = sum(got.get(k) == v for k, v in ref["captions"].items())
        first_diff = {}  # image -> index of the first differing word (greedy decoding diverges from there on)
        for k, v in ref["captions"].items():
            if k in got and got[k] != v:
                a, b = v.split(), got[k].split()
                first_diff[k] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        agreement = {"identical_captions": same, "of": len(ref["captions"]), "dnd_captions_parsed": len(got),
                     "first_differing_word": first_diff}  # fmt: skip
        log(f"caption agreement: {agreement}")
    return {
        "settings": {"images": args.images, "batch_size": args.batch_size, "new_tokens": CAPTION_TOKENS,
                     "threads": args.threads, "model_dir": str(model_dir)},
        "agreement": agreement,
        "results": results,
    }  # fmt: skip


def unet_side_by_side(args, setup: dict, workdir: Path) -> dict:
    model_dir = Path(setup["sd"]["dir"])
    results = []
    if not args.dnd_only:
        results.append(run_reference(args, "unet", "--_unet-worker", model_dir, [], workdir))
    if not args.torch_only:
        summary = workdir / "unet-dnd-summary.json"
        gen_dir = workdir / "gen"
        if gen_dir.exists():
            shutil.rmtree(gen_dir)
        tail = [
            "generate",
            "--model", str(model_dir),
            "--prompt", SD_PROMPT,
            "--count", "1",
            "--steps", str(args.steps),
            "--guidance", str(SD_GUIDANCE),
            "--width", str(SD_HW),
            "--height", str(SD_HW),
            "--threads", str(args.threads),
            "--out", str(gen_dir),
            "--summary-json", str(summary),
        ]  # fmt: skip
        r = run_dnd(args, "unet", tail, summary, GENERATE_SUMMARY_KEYS, workdir)
        sps = r.get("seconds_per_step")
        if isinstance(sps, (int, float)) and sps > 0:
            r["steps_per_second"] = 1.0 / sps
        if isinstance(r.get("steps"), int) and r["steps"] != args.steps and not r.get("error"):
            r["error"] = f"dnd reports {r['steps']} steps, expected {args.steps}"
        results.append(r)
    return {
        "settings": {"steps": args.steps, "batch": 2, "latents": "2x4x64x64", "text": "2x77x768", "guidance": SD_GUIDANCE,
                     "threads": args.threads, "model_dir": str(model_dir)},
        "results": results,
    }  # fmt: skip


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

fmt = pb.fmt


def _name(r: dict, label: str) -> str:
    return label + (" (FAILED)" if r.get("error") else "")


def _ratio_line(results: list, key: str, what: str, higher_is_better: bool) -> str | None:
    vals = {r["implementation"]: r.get(key) for r in results if not r.get("error")}
    ref = vals.get("transformers", vals.get("diffusers"))
    d = vals.get("dnd")
    if isinstance(ref, (int, float)) and isinstance(d, (int, float)) and ref > 0 and d > 0:
        speed = d / ref if higher_is_better else ref / d
        return f"- dnd {what}: {speed:.2f}x the reference's throughput"
    return None


def _notes(results: list) -> list:
    lines = []
    busy = [
        f"{r['implementation']} {r['child_cpu_seconds'] / r['wall_seconds']:.2f}"
        for r in results
        if not r.get("error") and r.get("wall_seconds") and isinstance(r.get("child_cpu_seconds"), float)
    ]
    if busy:
        lines.append(f"- cores busy on average over each side's whole process (loading included): {', '.join(busy)}")
    for r in results:
        if r.get("error"):
            lines.append(f"- {r['implementation']} error: {r['error']}")
        share = r.get("other_cpu_share")
        if isinstance(share, float) and share > 0.05 and not r.get("error"):
            lines.append(
                f"- WARNING: other processes used {100 * share:.0f}% of the CPUs while the {r['implementation']} side "
                "ran; its numbers are not reliable"
            )
    return lines


def markdown(report: dict) -> str:
    out = []
    cap = report.get("caption")
    if cap:
        s = cap["settings"]
        out += [
            f"## captioning: BLIP-base (random weights), {s['images']} images, {s['new_tokens']} new tokens each",
            "",
            "| implementation | setting | throughput | timed s | peak RSS MiB |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for r in cap["results"]:
            label = "transformers `generate`" if r["implementation"] == "transformers" else "dnd caption"
            setting = f"{fmt(r.get('images'), 'd')} images, batch {s['batch_size']}, {s['threads']} threads"
            tp = f"{fmt(r.get('captions_per_second'), '.3f')} captions/s ({fmt(r.get('tokens_per_second'), '.1f')} tokens/s)"
            secs, rss = fmt(r.get("seconds"), ".2f"), fmt(r.get("peak_rss_mib"), ".0f")
            out.append(f"| {_name(r, label)} | {setting} | {tp} | {secs} | {rss} |")
        out.append("")
        ratio = _ratio_line(cap["results"], "captions_per_second", "captioning", True)
        out += [ratio] if ratio else []
        ref = next((r for r in cap["results"] if r["implementation"] == "transformers" and not r.get("error")), None)
        warm = f" ({fmt(ref.get('warmup_batch_seconds'), '.2f')} s)" if ref else ""
        out += [
            "- reference: PIL decode + BlipProcessor (torchvision backend) + `generate(min_new_tokens=max_new_tokens="
            f"{s['new_tokens']}, num_beams=1, do_sample=False)` + batch_decode, 1 warm-up batch{warm} excluded; dnd: its "
            "summary's seconds (preprocess + decoding + detokenise, first batch included, images decoded before its timer)",
        ]
        a = cap.get("agreement")
        if a:
            diff = ", ".join(f"{k} from word {i}" for k, i in sorted(a.get("first_differing_word", {}).items()))
            out.append(
                f"- identical captions: {a['identical_captions']}/{a['of']}"
                + (f" (the others diverge: {diff})" if diff else "")
                + "; random weights give near-tied logits, so a late divergence is expected"
            )
        out += _notes(cap["results"])
        out.append("")
    un = report.get("unet")
    if un:
        s = un["settings"]
        out += [
            f"## Stable Diffusion v1.5 UNet (random weights), {s['steps']} guided DDIM steps, 512x512",
            "",
            "| implementation | setting | throughput | timed s | peak RSS MiB |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for r in un["results"]:
            label = "diffusers UNet2DConditionModel" if r["implementation"] == "diffusers" else "dnd generate"
            steps = r.get("steps", s["steps"])
            setting = f"{fmt(steps, 'd')} steps, batch 2 (CFG), latents 64x64, {s['threads']} threads"
            tp = f"{fmt(r.get('seconds_per_step'), '.2f')} s/step ({fmt(r.get('steps_per_second'), '.3f')} steps/s)"
            secs = r.get("seconds", r.get("denoise_seconds"))
            out.append(f"| {_name(r, label)} | {setting} | {tp} | {fmt(secs, '.2f')} | {fmt(r.get('peak_rss_mib'), '.0f')} |")
        out.append("")
        ratio = _ratio_line(un["results"], "seconds_per_step", "UNet steps", False)
        out += [ratio] if ratio else []
        ref = next((r for r in un["results"] if r["implementation"] == "diffusers" and not r.get("error")), None)
        out.append(
            "- a step = cat([x, x]) + scale_model_input + UNet on batch 2 (text states 2x77x768, [uncond, cond]) + "
            f"guidance {s['guidance']} + DDIM step. diffusers: 1 warm-up UNet evaluation excluded; dnd: its "
            "summary's seconds_per_step = denoise_seconds / steps, first step included (no warm-up)"
        )
        if ref:
            out.append(
                f"- diffusers, not in the step time: the warm-up UNet evaluation {fmt(ref.get('warmup_eval_seconds'), '.2f')} s, "
                f"text encoding {fmt(ref.get('text_encode_seconds'), '.2f')} s, one VAE "
                f"decode 512x512 {fmt(ref.get('vae_decode_seconds'), '.2f')} s; encode + steps + decode = "
                f"{fmt(ref.get('end_to_end_seconds'), '.2f')} s. Both sides hold the UNet, VAE and text encoder "
                "(peak RSS includes the VAE decode)"
            )
        d = next((r for r in un["results"] if r["implementation"] == "dnd" and not r.get("error")), None)
        total = d.get("summary", {}).get("seconds") if d else None
        if isinstance(total, (int, float)):
            ref_e2e = f"; diffusers encode + steps + decode: {fmt(ref.get('end_to_end_seconds'), '.2f')} s" if ref else ""
            out.append(
                f"- dnd's whole generate call (its summary's `seconds`: text encoding + steps + VAE decode + to RGB): "
                f"{total:.2f} s{ref_e2e}"
            )
        out += _notes(un["results"])
        out.append("")
    v = report["versions"]
    out += [
        f"- CPU: {report['cpu_model']} ({report['cpu_count']} logical CPUs, torch capability {v.get('torch_cpu_capability')})",
        f"- torch {v['torch']}, torchvision {v['torchvision']}, transformers {v['transformers']}, diffusers "
        f"{v['diffusers']}, tokenizers {v['tokenizers']}, Python {v['python']}; dnd: {report.get('dnd_version') or 'n/a'}",
        f"- command: `{report['command']}`",
    ]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dnd", type=Path, help="path to the dnd binary (required unless --torch-only)")
    ap.add_argument("--only", choices=["caption", "unet", "both"], default="both", help="which benchmark(s)")
    ap.add_argument("--images", type=int, default=16, help="captioning: number of procedural 500x375 JPEGs")
    ap.add_argument("--batch-size", type=int, default=8, help="captioning: images per batch")
    ap.add_argument("--steps", type=int, default=4, help="UNet: guided denoising steps timed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dnd-mm-bench"))
    side = ap.add_mutually_exclusive_group()
    side.add_argument("--torch-only", action="store_true", help="run only the transformers/diffusers side")
    side.add_argument("--dnd-only", action="store_true", help="run only the dnd side")
    ap.add_argument("--force-setup", action="store_true", help="rebuild the models and images even if present")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per-side wall-clock limit in seconds")
    # internal: worker subprocesses
    ap.add_argument("--_setup", dest="setup_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_caption-worker", dest="caption_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_unet-worker", dest="unet_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--images-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result-json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.setup_worker:
        return setup_worker(args)
    if args.caption_worker:
        return caption_worker(args)
    if args.unet_worker:
        return unet_worker(args)
    if not args.torch_only and args.dnd is None:
        ap.error("--dnd is required unless --torch-only")
    if args.images < 1 or args.batch_size < 1 or args.threads < 1 or args.steps < 1:
        ap.error("--images, --batch-size, --steps and --threads must be >= 1")

    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # The driver itself stays small (stdlib only): children inherit its ru_maxrss.
    setup_json = workdir / "setup.json"
    if setup_json.exists():
        setup_json.unlink()
    setup_cmd = [
        sys.executable, str(HERE), "--_setup",
        "--workdir", str(workdir),
        "--only", args.only,
        "--images", str(args.images),
        "--threads", str(args.threads),
        "--result-json", str(setup_json),
    ] + (["--force-setup"] if args.force_setup else [])  # fmt: skip
    t0 = time.perf_counter()
    if subprocess.run(setup_cmd, stdin=subprocess.DEVNULL).returncode != 0 or not setup_json.exists():
        log("setup (models + images) failed, see the messages above")
        return 2
    setup = json.loads(setup_json.read_text())
    setup["wall_seconds"] = time.perf_counter() - t0
    log(f"setup took {setup['wall_seconds']:.1f}s")

    dnd_path = None if args.torch_only else resolve_dnd(args.dnd)[0]
    report = {
        "command": command,
        "cpu_model": pb.cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": setup["versions"],
        "dnd": str(dnd_path or args.dnd) if not args.torch_only else None,
        "dnd_version": dnd_version(dnd_path),
        "threads": args.threads,
        "workdir": str(workdir),
        "setup": setup,
    }
    if args.only in ("caption", "both"):
        report["caption"] = caption_side_by_side(args, setup, workdir)
    if args.only in ("unet", "both"):
        report["unet"] = unet_side_by_side(args, setup, workdir)
    report["driver_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    md = markdown(report)
    report["markdown"] = md
    out_json = workdir / "multimodal_bench.json"
    out_json.write_text(json.dumps(report, indent=1) + "\n")
    print(md)
    print(f"\n(JSON: {out_json})")
    failed = [r for k in ("caption", "unet") for r in report.get(k, {}).get("results", []) if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
