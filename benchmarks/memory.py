"""Peak memory per model stage and per worker, next to the plain transformers loop (`make bench`).

    python -m benchmarks.memory                  # BLIP-base + CLIP ViT-B/32, 4 images, K = 4

Each measurement is a fresh process (peak RSS = the kernel's VmHWM of that process, so nothing
earlier in the benchmark counts): the imports alone; each capfilt stage alone (load with its
self-check, then one batch); one worker holding all three (the local runner's loop over a shard,
as a Ray actor or `capfilt run` does); and the plain loop a user writes (the three stock models,
image by image). "weights" is the parameters' own size, what any process holding them pays.
Writes its section of docs/benchmarks.md (between the markers) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BEGIN, END = "<!-- memory:begin -->", "<!-- memory:end -->"
ROOT = Path(__file__).resolve().parents[1]
ROLES = ("imports", "captioner", "filter", "clip", "worker", "plain")


NOTE = (
    "Where a worker's memory goes beyond the weights: the imports (above); each model's load "
    "(transformers' `from_pretrained` and the self-check leave freed heap that the stages hand back "
    "with `malloc_trim`; reading a checkpoint maps its file, whose pages count as resident while "
    "the weights are copied out of it: about the weights' size once more, briefly); per batch, the "
    "ViT's activations, the cross-attention keys/values (2 x layers x 577 tokens x width per image: 42 MB at "
    "BLIP-base in fp32) and the decoder's KV cache. The captioner holds those of at most `max_rows` "
    "rows (128) at a time and the filter the keys/values of 8 images, so at K = 40 a batch of 32 "
    "images needs ~0.6 GB of them instead of ~6 GB. The plain loop decodes one image at a time and "
    "copies nothing per image, which is why its batch adds little; it pays instead in time (the "
    "tables above)."
)


def _status() -> dict:
    text = Path("/proc/self/status").read_text()
    get = lambda key: int(next(x for x in text.splitlines() if x.startswith(key)).split()[1]) / 1024
    return {"rss": get("VmRSS:"), "peak": get("VmHWM:")}


def _weights(*modules) -> float:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / 2**20


def child(role: str, images: int, k: int, blip: str, clip_name: str, workdir: Path) -> dict:
    """One role in this (fresh) process: {'role', 'weights', 'loaded', 'peak', ...} in MiB."""
    import numpy as np
    import torch

    import capfilt.stages  # noqa: F401 - the imports every role pays
    from capfilt.modeling.captioner import Captioner, Decoding

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    pics = [rng.integers(0, 255, (384, 384, 3), dtype=np.uint8) for _ in range(images)]
    texts = [["a picture of a dog on a red sofa"] * (k + 1) for _ in pics]
    out = {"role": role}
    if role == "imports":
        pass
    elif role == "captioner":
        cap = Captioner(blip, decoding=Decoding(num_captions=k, max_new_tokens=30))
        out |= {"weights": _weights(cap.model), "loaded": _status()["rss"]}
        cap.caption(pics, list(range(images)))
    elif role == "filter":
        from capfilt.modeling.itm_filter import ItmFilter

        filt = ItmFilter(blip)
        out |= {"weights": _weights(filt.model), "loaded": _status()["rss"]}
        filt.score(pics, texts)
    elif role == "clip":
        from capfilt.modeling.clip_reranker import ClipReranker

        clip = ClipReranker(clip_name)
        out |= {"weights": _weights(clip.model), "loaded": _status()["rss"]}
        clip.score(pics, texts)
    elif role == "worker":
        from benchmarks.common import SIZES, make_corpus
        from benchmarks.suite import _config, run_pipeline
        from capfilt.stages import Caption, Clip, Filter, build_stages

        size = SIZES["base"].__class__(**{**SIZES["base"].__dict__, "images": images, "blip": blip, "clip": clip_name})
        shard, _ = make_corpus(workdir / "corpus", size)
        args = argparse.Namespace(device="cpu", precision="fp32", k=k, max_new_tokens=30)
        config = _config(size, args, shard, workdir / "out")
        stages = build_stages(config)
        by = {type(s): s for s in stages}
        models = [by[Caption].captioner.model, by[Filter].filter.model, *[m.model for m in by[Clip].models]]
        out |= {"weights": _weights(*models), "loaded": _status()["rss"]}
        run_pipeline(stages, config, shard, workdir / "out", torch.device("cpu"))
    elif role == "plain":
        import open_clip
        from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForImageTextRetrieval

        from capfilt.modeling.presets import resolve_blip, resolve_clip

        cap_ref, filt_ref = resolve_blip(blip, "captioner"), resolve_blip(blip, "filter")
        processor = AutoProcessor.from_pretrained(cap_ref.location)
        cap_model = BlipForConditionalGeneration.from_pretrained(cap_ref.location).eval()
        filt_model = BlipForImageTextRetrieval.from_pretrained(filt_ref.location).eval()
        name, tag, _ = resolve_clip(clip_name)
        clip_model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag)
        clip_model.eval()
        tokenizer = open_clip.get_tokenizer(name)
        out |= {"weights": _weights(cap_model, filt_model, clip_model), "loaded": _status()["rss"]}
        from PIL import Image

        with torch.no_grad():
            for pic, ts in zip(pics, texts):
                inputs = processor(images=pic, text="a picture of ", return_tensors="pt")
                cap_model.generate(
                    **inputs, do_sample=True, top_p=0.9, num_return_sequences=k, min_new_tokens=5, max_new_tokens=30
                )
                for text in ts:
                    pair = processor(images=pic, text=text, return_tensors="pt")
                    filt_model(**pair), filt_model(**pair, use_itm_head=False)
                    clip_model.encode_image(preprocess(Image.fromarray(pic))[None])
                    clip_model.encode_text(tokenizer([text]))
    else:
        raise ValueError(f"unknown role {role!r}; one of {ROLES}")
    out["peak"] = _status()["peak"]
    return out


def measure(images: int, k: int, blip: str, clip: str, log=print) -> list[dict]:
    rows = []
    for role in ROLES:
        cmd = [sys.executable, "-m", "benchmarks.memory", "--child", role, "--images", str(images), "--k", str(k)]
        cmd += ["--blip", blip, "--clip", clip]
        log(f"memory: {role} in a fresh process")
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy(), check=False)
        if done.returncode:
            raise RuntimeError(f"memory benchmark role {role} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def render(rows: list[dict], images: int, k: int, blip: str, clip: str, machine: dict) -> str:
    base = next(r["peak"] for r in rows if r["role"] == "imports")
    lines = [
        BEGIN,
        "## Peak memory per stage and per worker (`python -m benchmarks.memory`)",
        "",
        f"- Date: {machine['date']}; {machine['cpu']} ({machine['cpu_cores']} cores), load average "
        f"{machine['load_average']}; {blip} + {clip}, one batch of {images} images (384 px), K = {k}, fp32",
        "- Each row is a fresh process; peak RSS is its VmHWM (MiB). Imports alone (torch, transformers, "
        f"open_clip, capfilt) peak at {base:.0f} MiB in every process and are subtracted in the last column, "
        "whose ratio is (peak - imports) / weights.",
        "",
        "| process | weights | RSS after load | peak RSS | peak - imports | ratio to weights |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {
        "imports": "imports only",
        "captioner": "capfilt captioner stage (load + self-check + one batch)",
        "filter": "capfilt filter stage (load + self-check + one batch)",
        "clip": "capfilt CLIP stage (load + self-check + one batch)",
        "worker": "capfilt worker: all three stages, one shard end to end",
        "plain": "plain transformers + open_clip loop, same three models, image by image",
    }
    for r in rows:
        w = r.get("weights")
        ratio = f"{(r['peak'] - base) / w:.2f}" if w else ""
        loaded = f"{r['loaded']:.0f}" if "loaded" in r else ""
        lines.append(
            f"| {names[r['role']]} | {f'{w:.0f}' if w else ''} | {loaded} | {r['peak']:.0f} | "
            f"{r['peak'] - base:.0f} | {ratio} |"
        )
    lines += ["", NOTE]
    return "\n".join([*lines, END, ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--blip", default="blip-base")
    ap.add_argument("--clip", default="clip-vit-b-32")
    ap.add_argument("--child", choices=ROLES, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args(argv)
    from benchmarks.common import machine, use_full_size_vocabulary

    if args.child:
        with tempfile.TemporaryDirectory(prefix="capfilt-memory-") as tmp:
            use_full_size_vocabulary(Path(tmp))
            print(json.dumps(child(args.child, args.images, args.k, args.blip, args.clip, Path(tmp))))
        return 0
    import torch

    from benchmarks.gpu_report import write_section

    rows = measure(args.images, args.k, args.blip, args.clip)
    text = render(rows, args.images, args.k, args.blip, args.clip, machine(torch.device("cpu")))
    write_section(Path(args.out), text, BEGIN, END)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
