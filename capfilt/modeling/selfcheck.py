"""Load-time self-check: capfilt's fast path against the stock transformers / open_clip forward.

Every model stage, when it loads (once per process or Ray actor), runs a tiny probe through its
own fast path and through the stock reference, and refuses to start when they disagree:
two images that differ, two texts per image (so a text scored against the wrong image shows),
a few greedy decoder steps on two rows per image, and for the captioner a `generate`-level probe:
capfilt's greedy ids (its own prompt path) against stock `generate` (the processor's prompt).
Scores are compared where a drift is visible: ITM as logits and ITC as raw cosines, not as
probabilities (a 0.05 logit drift at p = 0.01 moves p by 5e-4), and the captioner's logits per
row, each against its own largest magnitude (not one global maximum that hides small rows).
The probe runs in fp32 whatever the run's precision: it checks the computation, not the rounding
of bf16. A run in bf16 (or fp16) gets a second probe in that precision: capfilt's fast path under
the run's autocast against the stock fp32 reference, with a tolerance measured for that rounding
(`LOW_PRECISION_TOLERANCE`), so a kernel that only the low-precision path takes is checked too.
A disagreement raises `ModelMismatch` with one line naming the model and the size of the
difference; a non-finite value counts as a disagreement.

What it costs is measured in docs/benchmarks.md (a fraction of a second on the tiny presets;
a few ViT passes on two images for the large ones). `self_check: false` in a run config turns it
off, for people who know why.
"""

from __future__ import annotations

import contextlib
import functools
import time

import numpy as np
import torch
import torch.nn.functional as F

from capfilt.modeling.loading import inference_autocast

# On logits (relative to each row's largest magnitude, at least 1) and cosines. Measured fp32
# fast path vs stock: <= 1e-6 on the tiny presets (tests/test_selfcheck.py), 3e-7 (ITM) and 6e-8
# (ITC) at BLIP-base (docs/benchmarks.md): 1e-3 leaves 1000x for other kernels and devices,
# and is 50x under a 0.05 logit drift; the 5.24 break was 2e-2 and more.
TOLERANCE = 1e-3
# The second probe's, in a run's lower precision (fast path under bf16 autocast vs stock in fp32),
# measured on a CPU with native bf16 (2026-12-08, docs/benchmarks.md): captioner logits 3.3e-3
# (tiny) / 8.6e-3 (BLIP-base), ITM logits 9.0e-4 / 7.1e-3, ITC cosines 4.2e-4 / 3.7e-4, CLIP
# cosines 1.9e-3 / 1.4e-3. 3e-2 is 3.5x the largest; a drift of its size or more is refused there
# (smaller ones are the fp32 probe's, which always runs). fp16 rounds 8x finer than bf16: its
# bound is bf16's (no fp16 kernel on this machine to measure it).
LOW_PRECISION_TOLERANCE = {"bf16": 3e-2, "fp16": 3e-2}
PROBE_TEXTS = ["a picture of a red circle at the top left", "two small dogs"]
PROBE_STEPS = 4


class ModelMismatch(ValueError):
    """capfilt's fast path and the stock model disagree on the load-time probe."""


def probe_images(count: int = 2) -> list[np.ndarray]:
    """Deterministic RGB images that differ from each other everywhere (uint8, H x W x 3)."""
    rng = np.random.default_rng(20221)
    ramp = np.linspace(0, 255, 48, dtype=np.float64)
    images = []
    for i in range(count):
        base = np.stack([np.add.outer(ramp * (i + 1) % 256, ramp[::-1]) % 256] * 3, axis=-1)
        noise = rng.integers(0, 96, size=base.shape)
        images.append(((base + noise) % 256).astype(np.uint8))
    return images


def _tolerance(key: str) -> float:
    """A difference's tolerance: "ids" none; "<name>@<precision>" the low-precision probe's."""
    if key == "ids":
        return 0.0
    return LOW_PRECISION_TOLERANCE[key.split("@")[1]] if "@" in key else TOLERANCE


def _refuse(what: str, stock_name: str, diffs: dict[str, float]) -> None:
    # "ids": the share of greedy tokens that differ from stock generate's; any is a disagreement
    bad = {k: v for k, v in diffs.items() if not np.isfinite(v) or v > _tolerance(k)}
    if bad:
        sizes = ", ".join(
            f"greedy ids differ from generate's in {v:.0%}" if k == "ids" else f"max |Δ{k}| = {v:.1e}"
            for k, v in diffs.items()
        )
        tolerances = ", ".join(sorted({f"{_tolerance(k):.0e}" for k in diffs if k != "ids"}))
        raise ModelMismatch(
            f"{what}: capfilt's fast path disagrees with {stock_name} on the load-time probe "
            f"({sizes}; tolerance {tolerances}); refusing to run with it. Check the installed "
            f"versions against the lock (requirements.lock); `self_check: false` skips this check"
        )


def _timed(check):
    """The check's differences plus how long it took: {"diffs": {...}, "seconds": s}."""

    @functools.wraps(check)
    def run(*args) -> dict:
        start = time.perf_counter()
        diffs = check(*args)
        return {"diffs": diffs, "seconds": time.perf_counter() - start}

    return run


def max_diff(a: torch.Tensor, b: torch.Tensor, per_row: bool = False) -> float:
    """Largest |a - b|; ``per_row``: each last-dim row's difference over that row's largest |b|
    (at least 1), so a row of small logits is not judged against another row's large ones."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    if not a.numel():
        return 0.0
    diff = (a - b).abs()
    if per_row:
        diff = diff / b.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)
    return float(diff.max())


@contextlib.contextmanager
def _fp32(wrapper):
    saved, wrapper.precision = wrapper.precision, "fp32"
    try:
        yield
    finally:
        wrapper.precision = saved


def _low_precision(wrapper) -> str | None:
    """The run's precision when it is not fp32 (the second probe runs in it), else None."""
    return None if wrapper.precision == "fp32" else wrapper.precision


def _name(wrapper) -> str:
    ident = wrapper.identity
    return str(ident.get("preset") or ident.get("hub_id") or ident.get("path") or ident.get("open_clip") or ident)


@_timed
@torch.inference_mode()
def check_filter(filt, stock) -> dict[str, float]:
    """`ItmFilter.score_detailed` (ITC cosines, ITM probabilities) and its ITM logits vs the
    stock model per (image, text) pair.

    The stock side is `BlipForImageTextRetrieval.forward`'s own few lines over its stock
    submodules, with the ViT run once per image rather than once per pair: on a CPU that is the
    difference between 4 and 10 ViT passes at load (tests compare with the full forward)."""
    images = probe_images()
    texts = [PROBE_TEXTS, PROBE_TEXTS[::-1]]
    with _fp32(filt):
        fast = filt.score_detailed(images, texts)
    owner = [i for i, ts in enumerate(texts) for _ in ts]
    tokens = filt.tokenize([t for ts in texts for t in ts])
    pixels = filt.processor.image_processor(images=images, return_tensors="pt").pixel_values.to(filt.device)
    embeds = stock.vision_model(pixel_values=pixels).last_hidden_state[owner]
    ids, mask = tokens.input_ids, tokens.attention_mask
    grounded = stock.text_encoder(
        input_ids=ids,
        attention_mask=mask,
        encoder_hidden_states=embeds,
        encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device),
    ).last_hidden_state
    itm_logits = stock.itm_head(grounded[:, 0, :]).float()
    fast_embeds = filt.image_embeds(images)
    kv = filt.model.text_encoder.image_keys_values(fast_embeds, owner)
    fast_logits = filt.model.itm_logits(ids, mask, kv)
    text = stock.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    itc = (
        F.normalize(stock.vision_proj(embeds[:, 0, :]).float(), dim=-1)
        * F.normalize(stock.text_proj(text[:, 0, :]).float(), dim=-1)
    ).sum(dim=-1)
    diffs = {  # ITM as (no match, match) logits; the served probabilities must agree too
        "itm": max_diff(fast_logits, itm_logits, per_row=True),
        "itc": max_diff(torch.from_numpy(np.concatenate(fast.itc)), itc),
        "p": max_diff(torch.from_numpy(np.concatenate(fast.itm)), itm_logits.softmax(dim=-1)[:, 1]),
    }
    low = _low_precision(filt)
    if low:  # the same scores from the run's own precision, against the same fp32 reference
        low_scores = filt.score_detailed(images, texts)
        with inference_autocast(filt.device, low):
            kv = filt.model.text_encoder.image_keys_values(filt.image_embeds(images), owner)
            low_logits = filt.model.itm_logits(ids, mask, kv)
        diffs[f"itm@{low}"] = max_diff(low_logits, itm_logits, per_row=True)
        diffs[f"itc@{low}"] = max_diff(torch.from_numpy(np.concatenate(low_scores.itc)), itc)
    _refuse(f"filter {_name(filt)}", "transformers' BlipForImageTextRetrieval", diffs)
    return diffs


@_timed
@torch.inference_mode()
def check_captioner(cap, stock) -> dict[str, float]:
    """Greedy cached decoding (two rows per image) vs the stock decoder's full forward on the
    same tokens: every step's next-token logits, each row relative to its own largest magnitude.
    Then the `generate`-level probe: the first row of each image against stock `generate` with
    the prompt as the processor tokenizes it, so a change in either side's prompt handling or in
    stock decoding shows as different ids."""
    from transformers import LogitsProcessorList

    pixels = cap.pixel_values(probe_images())
    rows = [0, 0, 1, 1]
    record: list[torch.Tensor] = []
    embeds = cap.model.vision_model(pixels)
    images = cap.model.text_decoder.bert.image_keys_values(embeds, rows)
    seeds = torch.zeros(len(rows), dtype=torch.long, device=cap.device)
    new = cap.decode(
        images, seeds, LogitsProcessorList(), sample=False, steps=PROBE_STEPS, compact=False, record=record
    )
    prompt = torch.tensor(cap.prompt_ids, device=cap.device).expand(len(rows), -1)
    tokens = torch.cat([prompt, new], dim=1)
    stock_embeds = stock.vision_model(pixel_values=pixels).last_hidden_state[rows]
    ref = stock.text_decoder(input_ids=tokens, encoder_hidden_states=stock_embeds).logits
    start = len(cap.prompt_ids) - 1
    ref = ref[:, start : start + len(record)]
    prompt_ids = cap.processor(text=cap.decoding.prompt, return_tensors="pt").input_ids.to(cap.device)
    stock_ids = stock.generate(
        pixel_values=pixels,
        input_ids=prompt_ids.repeat(len(pixels), 1),
        max_new_tokens=PROBE_STEPS,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        min_length=0,
    )
    given = prompt_ids.shape[1] - 1  # stock generate drops the processor's trailing [SEP]
    stock_new = F.pad(stock_ids[:, given:], (0, max(0, new.shape[1] - stock_ids.shape[1] + given)), value=cap.pad)
    same = stock_ids[:, :given].shape == prompt[:2].shape and bool((stock_ids[:, :given] == prompt[:2]).all())
    diffs = {
        "logit": max_diff(torch.stack(record, dim=1), ref, per_row=True),
        "image": max_diff(embeds, stock_embeds[::2]),
        "ids": float((stock_new[:, : new.shape[1]] != new[::2]).float().mean()) if same else 1.0,
    }
    low = _low_precision(cap)
    if low:  # the cached greedy decode in the run's precision vs the stock fp32 decoder on its tokens
        low_record: list[torch.Tensor] = []
        with inference_autocast(cap.device, low):
            low_images = cap.model.text_decoder.bert.image_keys_values(cap.model.vision_model(pixels), rows)
            low_new = cap.decode(
                low_images,
                seeds,
                LogitsProcessorList(),
                sample=False,
                steps=PROBE_STEPS,
                compact=False,
                record=low_record,
            )
        low_ref = stock.text_decoder(input_ids=torch.cat([prompt, low_new], dim=1), encoder_hidden_states=stock_embeds)
        low_ref = low_ref.logits[:, start : start + len(low_record)]
        diffs[f"logit@{low}"] = max_diff(torch.stack(low_record, dim=1), low_ref, per_row=True)
    _refuse(f"captioner {_name(cap)}", "transformers' BlipForConditionalGeneration", diffs)
    return diffs


@_timed
@torch.inference_mode()
def check_clip(clip) -> dict[str, float]:
    """`ClipReranker.score` (image once, trimmed text batches) vs open_clip's `encode_image` /
    `encode_text` per (image, text) pair at full context."""
    from PIL import Image

    images = probe_images()
    texts = [PROBE_TEXTS, PROBE_TEXTS[::-1]]
    with _fp32(clip):
        fast = np.concatenate(clip.score(images, texts))
    ref = []
    for image, ts in zip(images, texts):
        pixel = clip.preprocess(Image.fromarray(image))[None].to(clip.device)
        image_feat = F.normalize(clip.model.encode_image(pixel).float(), dim=-1)
        for text in ts:
            text_feat = F.normalize(clip.model.encode_text(clip.tokenizer([text]).to(clip.device)).float(), dim=-1)
            ref.append(float((image_feat * text_feat).sum()))
    diffs = {"clip": max_diff(torch.from_numpy(fast), torch.tensor(ref))}
    low = _low_precision(clip)
    if low:  # the run's own precision against the same fp32 reference
        diffs[f"clip@{low}"] = max_diff(torch.from_numpy(np.concatenate(clip.score(images, texts))), torch.tensor(ref))
    _refuse(f"clip {_name(clip)}", "open_clip's encode_image/encode_text", diffs)
    return diffs
