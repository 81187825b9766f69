"""Each captioner family's s/img against its own stock `generate`, at the same K (tiny presets).

    python -m benchmarks.families                      # 8 images, K = 4, best of 3, CPU
    python -m benchmarks.families --images 8 --k 4 --repeats 3

Per family: capfilt's captioner (`Caption` stage's captioner: per-key sampler, per-row rules, one
prefill per image shared by its K samples) against the stock way of drawing K samples from the
same weights -- `generate(do_sample=True, top_p, num_return_sequences=K, min/max_new_tokens)` on
the same processed images -- alternated, each side's best of N, CPU seconds beside wall time.
BLIP (capfilt's fast path) runs as the baseline the other families are compared with. Writes its
section of docs/benchmarks.md (between `<!-- families:begin -->` and `<!-- families:end -->`;
`make bench` keeps it) and prints it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, paired

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"
PRESETS = [
    ("blip", "tiny-blip", {}),
    ("git", "tiny-git", {"prompt": ""}),
    ("image-text-to-text (BLIP-2)", "tiny-blip2", {"prompt": ""}),
    ("image-text-to-text (SmolVLM, chat)", "tiny-smolvlm", {"prompt": "", "instruction": "Describe the image."}),
    ("image-text-to-text (Qwen2-VL, chat)", "tiny-qwen2vl", {"prompt": "", "instruction": "Describe the image."}),
    ("coca", "tiny-coca", {"prompt": ""}),
]
COCA_STOCK = "not runnable: open_clip 3.3's CoCa.generate asserts on transformers' BeamSearchScorer, removed in 5.x"


def images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(n)]


def stock_call(captioner, imgs: list[np.ndarray], k: int, top_p: float, lo: int, hi: int):
    """The stock way: the model's own generate, K samples per image, on one processed batch."""
    from capfilt.modeling.captioner import Captioner

    if isinstance(captioner, Captioner):
        from transformers import BlipForConditionalGeneration

        from capfilt.modeling.loading import from_pretrained

        model = from_pretrained(BlipForConditionalGeneration, captioner.ref.location)
        proc = captioner.processor
        inputs = proc(images=imgs, text=[captioner.decoding.prompt] * len(imgs), return_tensors="pt")
    else:
        fam = captioner.family
        if captioner.resolved.family == "coca":
            return None
        model, proc = fam.model, fam.processor
        if captioner.resolved.family == "git":
            pixels = proc.image_processor(images=imgs, return_tensors="pt").pixel_values
            inputs = {"pixel_values": pixels, "input_ids": fam.text.expand(len(imgs), -1)}
        else:
            nested = [[im] for im in imgs] if "Idefics3" in type(proc).__name__ else imgs
            inputs = dict(proc(images=nested, text=[fam.text] * len(imgs), return_tensors="pt"))
    kw = dict(do_sample=True, top_p=top_p, num_return_sequences=k, min_new_tokens=lo, max_new_tokens=hi)

    def call():
        with torch.inference_mode():
            return model.generate(**inputs, **kw)

    return call


def measure(n: int, k: int, repeats: int) -> list[dict]:
    from capfilt.config import CaptionerConfig
    from capfilt.modeling.families import build_captioner

    imgs, seeds = images(n), list(range(n))
    rows = []
    for label, preset, extra in PRESETS:
        cfg = CaptionerConfig(model=preset, num_captions=k, top_p=0.9, min_new_tokens=5, max_new_tokens=20, **extra)
        cap = build_captioner(cfg, device="cpu")
        check = cap.check["seconds"] if getattr(cap, "check", None) else None
        stock = stock_call(cap, imgs, k, 0.9, 5, 20)

        def ours(cap=cap):
            return cap.caption(imgs, seeds)

        if stock is None:
            t_ours, t_stock, result, _ = paired(ours, lambda: None, torch.device("cpu"), repeats)
            t_stock = None
        else:
            t_ours, t_stock, result, _ = paired(ours, stock, torch.device("cpu"), repeats)
        words = np.mean([len(c.split()) for caps in result for c in caps])
        rows.append(
            {
                "label": label,
                "preset": preset,
                "ours": t_ours / n,
                "stock": t_stock / n if t_stock else None,
                "check": check,
                "words": words,
            }
        )
    return rows


def render(rows: list[dict], info: dict, n: int, k: int, repeats: int) -> str:
    blip = rows[0]["ours"].wall
    lines = [
        BEGIN,
        "## Captioner families (`python -m benchmarks.families`)",
        "",
        f"- Date: {info['date']}; machine: {info['cpu']}, {info['cpu_cores']} cores visible, torch threads "
        f"{info['torch_threads']}; load average at start {info['load_average']} (other processes shared the cores)",
        f"- {n} images (96x128), K = {k} samples per image, top_p 0.9, 5..20 new tokens; tiny presets (random "
        f"weights: timing only); each side the best of {repeats} alternated runs; s/img wall (CPU s in parentheses)",
        "",
        "| family | preset | capfilt s/img | stock generate s/img | stock / capfilt | vs capfilt BLIP "
        "| load check s | words/caption |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        o, s = r["ours"], r["stock"]
        stock = f"{s.wall:.4f} ({s.cpu:.4f})" if s else COCA_STOCK
        ratio = f"{s.wall / o.wall:.2f}x" if s else "n/a"
        check = f"{r['check']:.2f}" if r["check"] is not None else "-"
        lines.append(
            f"| {r['label']} | {r['preset']} | {o.wall:.4f} ({o.cpu:.4f}) | {stock} | {ratio} | "
            f"{o.wall / blip:.2f}x | {check} | {r['words']:.1f} |"
        )
    lines += [
        "",
        "- capfilt's side shares one prefill per image between its K samples (the stock side prefills each of "
        "the K copies) and draws from per-key noise; both stop a row at end-of-sequence.",
        "- On the tiny presets the model is a few percent of the work: the numbers show the decode loop's "
        "per-step overhead, not a real checkpoint's cost; a family's real cost scales with its language model "
        "(BLIP-2 OPT-2.7B, SmolVLM 135M LM with ~1k image tokens per tiled image) and is far above BLIP's.",
        "- CoCa is the slow one here for two reasons visible in a profile: open_clip's CoCa has no KV cache, so "
        "every step runs the public forward over the whole text and projects every position onto its 49,408-token "
        "vocabulary (as its own generate does), and top-p sorts that vocabulary per row and step (tiny-blip's "
        "vocabulary has 241 tokens, so its sort is free; a real BLIP's 30,524 costs the same order as CoCa's).",
        END,
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.families", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-md", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args(argv)
    info = machine(torch.device("cpu"))
    section = render(measure(args.images, args.k, args.repeats), info, args.images, args.k, args.repeats)
    from benchmarks.gpu_report import write_section

    write_section(Path(args.out_md), section, BEGIN, END)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
