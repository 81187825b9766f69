"""GPU throughput in one prepared run: what `benchmarks/gpu.sh` runs on the accelerator.

    python -m benchmarks.gpu --device cuda --precision bf16 --size large --json $OUT/gpu.json
    python -m benchmarks.gpu --device cpu --size tiny --images 4      # the dry run (in the tests)

Same work on both sides, alternated, best of N each; random weights (fine for timing); every
caption is exactly `--new-tokens` tokens on both sides (min = max new tokens), so both sides decode
the same number of steps.

1. captioner, K = 4 and K = 40 (LAION-COCO): images/s, capfilt vs stock generate(num_return_sequences=K)
2. filter, 5 texts per image: images/s, capfilt vs the stock per-pair forward (ITM + ITC)
3. CLIP, 5 texts per image: images/s, capfilt vs encoding image and text per candidate
4. end to end over WebDataset shards on disk (decode included): the local runner's loop with its
   stages built beforehand, and the Ray runner (fractional GPUs per actor on the one device),
   against each model stage alone on pre-decoded inputs; pipeline efficiency = end-to-end
   images/s / slowest stage's images/s; and against the plain transformers loop. The Ray figure
   is marginal: (all shards - first shard) / (time of all - time of first), which cancels Ray's
   start and the actors' model loading.
5. model FLOP utilisation of each ViT (captioner, filter, CLIP image tower): FLOPs counted by
   torch's FlopCounterMode, the ViT alone timed at the stage's batch, against the dense peak
6. share of the end-to-end runs the GPU sat idle (nvidia-smi utilization sampled every 100 ms)
7. peak GPU memory of each stage at its batch, and the largest batch that fits (doubling)

Writes a markdown section (between `<!-- gpu:begin -->` and `<!-- gpu:end -->` of the file given
by --out, kept there by `make bench`) and the raw JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import SIZES, Size, machine, once, paired, stock_mode, use_full_size_vocabulary
from benchmarks.gpu_report import render, write_section

ROOT = Path(__file__).resolve().parents[1]
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16 TFLOP/s


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--size", default="large", choices=sorted(SIZES))
    ap.add_argument("--images", type=int, default=None, help="images per batch (default: the size's)")
    ap.add_argument("--shards", type=int, default=3, help="shards of --images images for the end-to-end runs")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=1024, help="stop the largest-batch search here")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.argv = argv
    return args


def _rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else float("nan")


def _pair_row(name, n, ours, stock, check) -> dict:
    return {
        "what": name,
        "ours_img_s": _rate(n, ours.wall),
        "stock_img_s": _rate(n, stock.wall),
        "speedup": stock.wall / ours.wall,
        "cpu_speedup": stock.cpu / ours.cpu,
        "check": check,
    }


# --------------------------------------------------------------------------- model comparisons


def captioner_rows(cap, stock, pixels, seeds, args, device) -> list[dict]:
    rows = []
    for k in (4, 40):
        cap.decoding = cap.decoding.replace(
            num_captions=k, min_new_tokens=args.new_tokens, max_new_tokens=args.new_tokens
        )
        prompt = torch.tensor([cap.prompt_ids + [cap.eos]] * len(pixels), device=device)

        def theirs(prompt=prompt, k=k):  # bound now: called within this iteration
            with stock_mode(device, args.precision):
                return stock.generate(
                    pixel_values=pixels,
                    input_ids=prompt,
                    do_sample=True,
                    top_p=0.9,
                    top_k=0,
                    num_return_sequences=k,
                    num_beams=1,
                    min_new_tokens=args.new_tokens,
                    max_new_tokens=args.new_tokens,
                )

        theirs(), cap.generate_ids(pixels, seeds)  # warm-up
        t_ours, t_stock, ids, stock_ids = paired(lambda: cap.generate_ids(pixels, seeds), theirs, device, args.repeats)
        same = ids.shape[1] == stock_ids.shape[1] - len(cap.prompt_ids) == args.new_tokens
        rows.append(
            _pair_row(
                f"captioner K={k}, {args.new_tokens} new tokens",
                len(pixels),
                t_ours,
                t_stock,
                f"{tuple(ids.shape)} vs {tuple(stock_ids.shape)} ids; same length: {same}",
            )
        )
    return rows


def filter_row(filt, stock, images, texts, args, device) -> dict:
    def theirs():
        itm, itc = [], []
        with stock_mode(device, args.precision):
            for image, ts in zip(images, texts):
                for text in ts:
                    pair = filt.processor(
                        images=image, text=text, truncation=True, max_length=35, return_tensors="pt"
                    ).to(device)
                    itm.append(stock(**pair).itm_score.float().softmax(-1)[0, 1])
                    itc.append(stock(**pair, use_itm_head=False).itm_score.float()[0, 0])
        return torch.stack(itm).cpu(), torch.stack(itc).cpu()

    ours = lambda: filt.score(images, texts)
    ours(), theirs()
    t_ours, t_stock, (itm, itc), (s_itm, s_itc) = paired(ours, theirs, device, args.repeats)
    d_itm = float((torch.from_numpy(np.concatenate(itm)) - s_itm).abs().max())
    return _pair_row("filter, 5 texts per image (ITM + ITC)", len(images), t_ours, t_stock, f"max |Δitm| {d_itm:.1e}")


def clip_row(clip, images, texts, args, device) -> dict:
    import torch.nn.functional as F
    from PIL import Image

    def theirs():
        out = []
        with stock_mode(device, args.precision):
            for image, ts in zip(images, texts):
                for text in ts:
                    i = F.normalize(
                        clip.model.encode_image(clip.preprocess(Image.fromarray(image))[None].to(device)).float(),
                        dim=-1,
                    )
                    t = F.normalize(clip.model.encode_text(clip.tokenizer([text]).to(device)).float(), dim=-1)
                    out.append((i * t).sum())
        return torch.stack(out).cpu()

    ours = lambda: clip.score(images, texts)
    ours(), theirs()
    t_ours, t_stock, sims, stock_sims = paired(ours, theirs, device, args.repeats)
    diff = float((torch.from_numpy(np.concatenate(sims)) - stock_sims).abs().max())
    return _pair_row("CLIP, 5 texts per image", len(images), t_ours, t_stock, f"max |Δclip| {diff:.1e}")


# --------------------------------------------------------------------------- ViT utilisation, memory


def vit_utilisation(stages, pixels_for, batch: int, args, device) -> dict:
    """FLOPs per image (counted) and the ViT alone at ``batch`` images: achieved TFLOP/s, MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    from capfilt.modeling.loading import autocast

    peak = None
    if device.type == "cuda" and args.precision != "fp32":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAKS.items() if k in name), None)
    out = {}
    for name, vit in stages.items():
        pixels = pixels_for[name](batch)
        with torch.inference_mode(), autocast(device, args.precision):
            with FlopCounterMode(display=False) as counter:
                vit(pixels[:1])
            flops = counter.get_total_flops()
            vit(pixels)  # warm-up
            best = min((once(lambda: vit(pixels), device)[0] for _ in range(args.repeats)), key=lambda t: t.wall)  # noqa: B023 - called within this iteration
        achieved = flops * batch / best.wall / 1e12
        out[name] = {
            "gflop_per_image": flops / 1e9,
            "batch": batch,
            "seconds": best.wall,
            "tflops": achieved,
            "mfu": achieved / peak if peak else None,
            "peak_tflops": peak,
        }
    return out


def memory_and_largest_batch(stage_calls, args, device) -> dict:
    """Peak memory per stage at the run's batch; the largest batch that fits (doubling, capped)."""
    if device.type != "cuda":
        return {name: {"peak_gib": None, "largest_batch": None, "note": "no GPU"} for name in stage_calls}
    out = {}
    for name, (call, batch) in stage_calls.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        call(batch)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        largest, trial = batch, batch * 2
        while trial <= args.max_batch:
            try:
                call(trial)
                largest, trial = trial, trial * 2
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                torch.cuda.empty_cache()
        out[name] = {"peak_gib": peak, "batch": batch, "largest_batch": largest, "capped": largest * 2 > args.max_batch}
    return out


# --------------------------------------------------------------------------- end to end


class GpuSampler:
    """nvidia-smi utilization samples (percent of each 100 ms with a kernel running) while active."""

    def __init__(self, device):
        self.samples: list[float] = []
        self.proc = None
        if device.type == "cuda":
            index = device.index if device.index is not None else 0
            self.proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "-i",
                    str(index),
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "100",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line))

    def between(self, start: int, end: int) -> dict | None:
        part = self.samples[start:end]
        if not part:
            return None
        return {
            "samples": len(part),
            "mean_util": sum(part) / len(part) / 100,
            "idle_share": sum(1 for s in part if s == 0) / len(part),
        }

    def close(self):
        if self.proc:
            self.proc.terminate()


def local_end_to_end(stages, config, shards: list[str], images_per_shard: int, sampler, workdir: Path, device) -> dict:
    """The local runner's loop (read, decode, caption, score, rerank, decide, write each shard) with
    the stages built beforehand, so model loading is not in the time."""
    from benchmarks.suite import run_pipeline

    mark, start, rows = len(sampler.samples), time.perf_counter(), 0
    stage_seconds: dict[str, float] = {}
    for url in shards:
        _, per_stage, batches = run_pipeline(stages, config, url, workdir / "local", device)
        rows += sum(len(b["key"]) for b in batches)
        for k, t in per_stage.items():
            stage_seconds[k] = stage_seconds.get(k, 0.0) + t.wall
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "img_s": _rate(len(shards) * images_per_shard, seconds),
        "input": rows,
        "gpu": sampler.between(mark, len(sampler.samples)),
        "stage_seconds": stage_seconds,
    }


def ray_end_to_end(config_for, shards: list[str], images_per_shard: int, sampler, workdir: Path) -> dict:
    """The Ray runner over the first shard, then over all: the marginal rate (all - first) / (time
    of all - time of first) leaves out Ray's start-up and the actors' model loading."""
    from capfilt.pipeline import run

    timings = {}
    for label, subset in (("first", shards[:1]), ("all", shards)):
        mark, start = len(sampler.samples), time.perf_counter()
        result = run(config_for("ray", subset, workdir / f"ray-{label}"), fresh=True, progress=False)
        timings[label] = (time.perf_counter() - start, result, sampler.between(mark, len(sampler.samples)))
        assert result.ok, result.shard_errors
    (t1, _, _), (tn, res, gpu) = timings["first"], timings["all"]
    extra = (len(shards) - 1) * images_per_shard
    return {
        "seconds": tn,
        "seconds_first": t1,
        "img_s": _rate(extra, tn - t1),
        "img_s_with_startup": _rate(len(shards) * images_per_shard, tn),
        "gpu": gpu,
        "summary": {k: res.summary[k] for k in ("input", "kept", "rejected", "failed")},
        "stage_seconds": res.stage_seconds,
    }


# --------------------------------------------------------------------------- the run


def _texts_per_image(examples, n: int, per: int = 5) -> list[list[str]]:
    """Each image's web text plus the texts of the next per-1 images: 5 candidates, varied lengths."""
    return [[examples[(i + j) % len(examples)].text for j in range(per)] for i in range(n)]


def measure(args, workdir: Path, log) -> dict:
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    from benchmarks.suite import plain_way
    from capfilt.config import parse_config
    from capfilt.modeling.loading import pick_device
    from capfilt.stages import Caption, Clip, Filter, build_stages
    from capfilt.synthetic import make_split, write_shards

    device = pick_device(args.device)
    size: Size = SIZES[args.size]
    n = args.images or size.images
    examples = make_split("gpu", n * args.shards, seed=0, noise_share=0.3, image_size=size.image_size)
    shards = write_shards(workdir / "corpus", examples, per_shard=n, sidecar=False)
    images = [np.array(Image.open(io.BytesIO(e.image)).convert("RGB")) for e in examples[:n]]
    texts = _texts_per_image(examples, n)

    def config_for(runner, subset, out):
        gpu = device.type == "cuda"
        return parse_config(
            {
                "input": subset,
                "output": str(out),
                "seed": 0,
                "device": args.device,
                "precision": args.precision,
                "batch_size": n,
                "runner": runner,
                "decode": {"max_side": max(1024, size.image_size)},
                "captioner": {
                    "model": size.blip,
                    "num_captions": 4,
                    "min_new_tokens": args.new_tokens,
                    "max_new_tokens": args.new_tokens,
                },
                "filter": {"model": size.blip},
                "clip": {"model": size.clip},
                # Three model pools of one actor share the GPU; CPUs are left over for reading and decoding.
                "ray": {"gpus_per_actor": 0.3 if gpu else 0.0, "cpus_per_actor": 1 if gpu else 0.25},
            }
        )

    log(f"loading capfilt stages and stock models ({size.blip}, {size.clip}) on {device}")
    stages = build_stages(config_for("local", shards[:1], workdir / "unused"))
    by_class = {type(stage): stage for stage in stages}
    cap, filt, clip = by_class[Caption].captioner, by_class[Filter].filter, by_class[Clip].clip
    stock_cap = BlipForConditionalGeneration.from_pretrained(cap.ref.location).eval().to(device)
    stock_filt = BlipForImageTextRetrieval.from_pretrained(filt.ref.location).eval().to(device)
    seeds = list(range(n))
    pixels = cap.pixel_values(images)

    log("captioner K=4 and K=40 vs stock generate")
    rows = captioner_rows(cap, stock_cap, pixels, seeds, args, device)
    log("filter and CLIP, 5 texts per image, vs per pair")
    rows += [filter_row(filt, stock_filt, images, texts, args, device), clip_row(clip, images, texts, args, device)]

    log("stages alone on pre-decoded inputs")
    cap.decoding = cap.decoding.replace(num_captions=4)
    alone = {}
    for name, fn in (
        ("Caption", lambda: cap.generate_ids(pixels, seeds)),
        ("Filter", lambda: filt.score(images, texts)),
        ("Clip", lambda: clip.score(images, texts)),
    ):
        fn()
        alone[name] = min((once(fn, device)[0] for _ in range(args.repeats)), key=lambda t: t.wall)
    slowest = max(alone, key=lambda k: alone[k].wall)

    log("the plain transformers loop (image by image, pair by pair) on the same images")
    work = {"bytes": [e.image for e in examples[:n]], "texts": texts}
    plain_args = argparse.Namespace(k=4, max_new_tokens=args.new_tokens, precision=args.precision)
    plain_t, _ = plain_way(work, stock_cap, stock_filt, filt.processor, clip, plain_args, device)
    plain_s = sum(t.wall for t in plain_t.values())

    log(f"end to end over {len(shards)} shards: local runner, Ray runner")
    sampler = GpuSampler(device)
    try:
        import ray

        # One Ray for both runs of each runner (capfilt joins a Ray its caller started). A CPU dry
        # run on a small machine declares 4 CPUs so decode tasks always find room beside the actors.
        e2e = {
            "local": local_end_to_end(
                stages, config_for("local", shards, workdir / "local"), shards, n, sampler, workdir, device
            )
        }
        ray.init(
            address="local", num_cpus=None if device.type == "cuda" else 4, include_dashboard=False, log_to_driver=False
        )
        e2e["ray"] = ray_end_to_end(config_for, shards, n, sampler, workdir)
    finally:
        sampler.close()
        import ray

        ray.shutdown()
    for res in e2e.values():
        res["efficiency"] = res["img_s"] / _rate(n, alone[slowest].wall)
        res["vs_plain"] = res["img_s"] / _rate(n, plain_s)

    log("ViT FLOP utilisation, memory, largest batch")
    vits = {
        "captioner ViT": cap.model.vision_model,
        "filter ViT": filt.model.vision_model,
        "CLIP image tower": clip.model.encode_image,
    }
    clip_pixels = torch.stack([clip.preprocess(Image.fromarray(im)) for im in images]).to(device)
    blip_pixels = pixels
    grow = lambda p: lambda b: p.repeat((b + len(p) - 1) // len(p), 1, 1, 1)[:b]
    mfu = vit_utilisation(
        vits,
        {"captioner ViT": grow(blip_pixels), "filter ViT": grow(blip_pixels), "CLIP image tower": grow(clip_pixels)},
        n,
        args,
        device,
    )
    many = lambda b: ([images[i % n] for i in range(b)], [texts[i % n] for i in range(b)])
    memory = memory_and_largest_batch(
        {
            "Caption": (lambda b: cap.generate_ids(grow(blip_pixels)(b), list(range(b))), n),
            "Filter": (lambda b: filt.score(*many(b)), n),
            "Clip": (lambda b: clip.score(*many(b)), n),
        },
        args,
        device,
    )
    checks = {name: m.check["seconds"] for name, m in (("Caption", cap), ("Filter", filt), ("Clip", clip))}
    return {
        "size": args.size,
        "blip": size.blip,
        "clip": size.clip,
        "images": n,
        "shards": len(shards),
        "new_tokens": args.new_tokens,
        "rows": rows,
        "alone_img_s": {k: _rate(n, v.wall) for k, v in alone.items()},
        "slowest_stage": slowest,
        "plain_img_s": _rate(n, plain_s),
        "end_to_end": e2e,
        "vit": mfu,
        "memory": memory,
        "self_check_s": checks,
    }


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - start:6.1f}s] {m}", file=sys.stderr, flush=True)
    device = torch.device(args.device)
    models_dir = os.environ.get("CAPFILT_MODELS_DIR")
    try:
        with tempfile.TemporaryDirectory(prefix="capfilt-gpu-") as tmp:
            use_full_size_vocabulary(Path(tmp))  # points CAPFILT_MODELS_DIR into tmp
            res = measure(args, Path(tmp), log)
    finally:  # the folder is gone: a caller (the tests) must get its presets back
        if models_dir is None:
            os.environ.pop("CAPFILT_MODELS_DIR", None)
        else:
            os.environ["CAPFILT_MODELS_DIR"] = models_dir
    info = machine(device)
    if device.type == "cuda":
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    section = render(res, info)
    write_section(Path(args.out), section)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": res}, indent=1, default=str))
    print(section)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
