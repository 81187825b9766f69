"""This machine's attainable rate, and each capfilt model part's share of it (`make bench`).

"Faster than stock" says nothing about how much is left; this measures against the hardware:

- `machine_peak`: a large `torch.matmul` (fp32, and bf16 where the CPU has native bf16 dot
  products) for the compute peak, a streaming copy of a buffer far larger than the caches for the
  memory bandwidth, with the same torch threads as every other measurement, best of a few runs.
- `model_parts`: the model compute of one workload, part by part (the ViT pass, the filter's text
  encoder, the captioner's decode loop, CLIP's image and text towers), each timed alone (best of
  ``reps``) and its FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` on the same inputs.

A share is achieved FLOP/s over the matmul peak of the precision the run computes in. Wall-clock
shares move with other load on a shared machine; the CPU-time share (FLOPs per CPU second of
this process, over the probe's FLOPs per CPU second) moves much less and is the one to read there.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import fastest, once
from capfilt.modeling.loading import cpu_has_bf16

MATMUL = 2048  # square fp32/bf16 matmul side: large enough to run at the BLAS kernel's peak
COPY_BYTES = 256 << 20  # streamed buffer: far beyond any cache


def _rate(fn, work: float, device, repeats: int) -> dict:
    fn()  # warm-up (allocations, kernel selection)
    best = fastest(once(fn, device)[0] for _ in range(repeats))
    return {"per_s": work / best.wall, "per_cpu_s": work / max(best.cpu, 1e-9), "wall": best.wall, "cpu": best.cpu}


def machine_peak(device: torch.device, repeats: int = 5) -> dict:
    """{'fp32': rate, 'bf16': rate or None, 'copy': rate}: FLOP/s (matmul) and bytes/s (copy)."""
    out = {}
    for name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        if name == "bf16" and device.type == "cpu" and not cpu_has_bf16():
            out[name] = None
            continue
        a = torch.randn(MATMUL, MATMUL, device=device).to(dtype)
        b = torch.randn(MATMUL, MATMUL, device=device).to(dtype)
        out[name] = _rate(lambda a=a, b=b: torch.matmul(a, b), 2.0 * MATMUL**3, device, repeats)
    src = torch.empty(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    src.fill_(1.0), dst.fill_(0.0)  # touch every page before timing
    out["copy"] = _rate(lambda: dst.copy_(src), 2.0 * COPY_BYTES, device, repeats)  # read + write
    return out


def _part(key: str, name: str, fn, device, reps: int, tokens: int | None = None) -> dict:
    with FlopCounterMode(display=False) as counter:  # also the untimed warm-up
        fn()
    best = fastest(once(fn, device)[0] for _ in range(max(1, reps)))
    return {
        "key": key,
        "part": name,
        "flops": counter.get_total_flops(),
        "wall": best.wall,
        "cpu": best.cpu,
        "tokens": tokens,
    }


@torch.inference_mode()
def decode_part(cap, pixels, seeds: list[int], device, reps: int, key: str) -> dict:
    """The captioner's decode loop alone with its current decoding (cross-attention K/V once per
    image included, the ViT not): FLOPs, time, tokens generated."""
    from capfilt.modeling.loading import inference_autocast as autocast
    from capfilt.modeling.sampling import row_seeds

    k, steps, d = cap.decoding.samples, cap.decoding.max_steps, cap.decoding
    with autocast(cap.device, cap.precision):
        embeds = cap.model.vision_model(pixels)
    rows = [i for i in range(len(pixels)) for _ in range(k)]

    def decode():
        with autocast(cap.device, cap.precision):
            kv = cap.model.text_decoder.bert.image_keys_values(embeds, rows)
            return cap.decode(
                kv,
                row_seeds(seeds, k, cap.device),
                cap.rules(len(pixels)),
                sample=d.sample,
                steps=steps,
                compact=cap.compact,
            )

    warps = f"top_p {d.top_p:g}" + (f", top_k {d.top_k}" if d.top_k else "")
    warps += f", penalty {d.repetition_penalty:g}" if d.repetition_penalty != 1.0 else ""
    label = f"decode loop, {len(pixels)} images x K = {k}, {steps} steps ({warps}; cross-attention K/V included)"
    return _part(key, label, decode, device, reps, tokens=len(rows) * steps)


@torch.inference_mode()
def model_parts(cap, filt, clip, work: dict, device, reps: int) -> list[dict]:
    """Each model part of the benchmark's workload (its images and candidate texts), alone."""
    from PIL import Image

    from capfilt.modeling.clip_reranker import encode_text_trimmed, trimmable, trimmed_length
    from capfilt.modeling.loading import inference_autocast as autocast

    images, texts, seeds = work["images"], work["texts"], work["seeds"]
    flat = [t for ts in texts for t in ts]
    owner = [i for i, ts in enumerate(texts) for _ in ts]
    pixels = cap.pixel_values(images)

    def vit():
        with autocast(cap.device, cap.precision):
            return cap.model.vision_model(pixels)

    tokens = filt.tokenize(flat)
    with autocast(filt.device, filt.precision):
        filt_embeds = filt.model.vision_model(pixels)

    def text_encoder():  # ITC (unimodal) and ITM (cross-attention to the image) passes of every text
        with autocast(filt.device, filt.precision):
            kv = filt.model.text_encoder.image_keys_values(filt_embeds, list(range(len(images)))).for_rows(owner)
            filt.model.text_feat(tokens.input_ids, tokens.attention_mask)
            return filt.model.itm(tokens.input_ids, tokens.attention_mask, kv)

    clip_pixels = torch.stack([clip.preprocess(Image.fromarray(im)) for im in images]).to(clip.device)
    clip_tokens = clip.tokenizer(flat)
    length = trimmed_length(clip_tokens) if trimmable(clip.model) else clip_tokens.shape[1]
    clip_tokens = clip_tokens[:, :length].to(clip.device)

    def clip_image():
        with autocast(clip.device, clip.precision):
            return clip.model.encode_image(clip_pixels)

    def clip_text():
        with autocast(clip.device, clip.precision):
            return encode_text_trimmed(clip.model, clip_tokens, length)

    return [
        _part("vit", "ViT pass (the captioner's; the filter runs the same once more)", vit, device, reps),
        _part("text", f"filter text encoder (ITC + ITM, {len(flat)} texts)", text_encoder, device, reps),
        decode_part(cap, pixels, seeds, device, reps, "decode"),
        _part("clip_image", "CLIP image tower", clip_image, device, reps),
        _part("clip_text", f"CLIP text tower ({len(flat)} texts)", clip_text, device, reps),
    ]


def share(flops: float, wall: float, cpu: float, peak: dict) -> tuple[float, float]:
    """(share of the peak by wall clock, share by CPU time) of ``flops`` done in ``wall`` / ``cpu`` s."""
    return flops / wall / peak["per_s"], flops / max(cpu, 1e-9) / peak["per_cpu_s"]
