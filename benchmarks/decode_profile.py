"""Where the captioner's decode loop spends its time, and two capfilt trees side by side.

    python -m benchmarks.decode_profile                       # this tree: BLIP-base, K = 4 and 40
    python -m benchmarks.decode_profile --sources old=/tmp/old-capfilt,new=.   # alternated, best of N

Each measurement runs in its own process (``PYTHONPATH=<source>``, so two versions of capfilt can
be compared in one run): the decode loop alone (`benchmarks.limits.decode_part`'s work: the
cross-attention K/V of the images, then every step; the ViT not), once untimed, once timed (wall
and CPU time), once under `torch.profiler`, whose self CPU time is sorted into matmuls (the LM head
apart), attention (self / cross), the sampler (every op on a rows x vocabulary tensor after the LM
head) and the rest. Sources are alternated round by round; each side's fastest round is reported,
with the share of this machine's fp32 matmul peak (FLOPs counted by `FlopCounterMode`) and whether
the sampled ids are identical. Writes its section of docs/benchmarks.md (kept by `make bench`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BEGIN, END = "<!-- decode-profile:begin -->", "<!-- decode-profile:end -->"
ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ("matmul", "LM head", "self-attention", "cross-attention", "sampler", "other")


def _category(name: str, shapes: list, vocab: int, image_tokens: int, widths: set[int]) -> str:
    """``widths``: the output widths of the decoder layers' own matmuls (hidden, intermediate); any
    other is the LM head's (whole, or the vocabulary slices blip.Predictions computes on a CPU)."""
    dims = [s for s in shapes if isinstance(s, list) and s]
    if name in ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul"):
        return "matmul" if len(dims) > 2 and dims[2][-1] in widths else "LM head"
    if name == "aten::cat" and any(s[-1] == vocab for s in dims):
        return "LM head"  # the slices put together
    if "scaled_dot_product" in name:
        return "cross-attention" if len(dims) > 1 and dims[1][-2] == image_tokens else "self-attention"
    return "sampler" if any(s[-1] == vocab for s in dims) else "other"


def child(args) -> dict:
    """One measurement in this process (the capfilt on its PYTHONPATH)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    import capfilt
    from benchmarks.common import SIZES, once
    from benchmarks.suite import laion_decodings
    from capfilt.modeling.captioner import Captioner
    from capfilt.modeling.loading import inference_autocast
    from capfilt.modeling.sampling import row_seeds

    torch.set_num_threads(args.threads)  # the models directory: the parent's (CAPFILT_MODELS_DIR)
    cap = Captioner(SIZES[args.size].blip, device="cpu", precision=args.precision, self_check=False)
    cap.decoding = laion_decodings(cap.decoding, 40)[0] if args.k == 40 else cap.decoding.replace(num_captions=args.k)
    k, n = cap.decoding.samples, int(args.images)
    pixels = torch.randn(
        n, 3, *(2 * [cap.model.vision_model.embeddings.image_size]), generator=torch.Generator().manual_seed(0)
    )
    rows = [i for i in range(n) for _ in range(k)]
    with torch.inference_mode(), inference_autocast(cap.device, cap.precision):
        embeds = cap.model.vision_model(pixels)

    @torch.inference_mode()
    def decode():
        with inference_autocast(cap.device, cap.precision):
            kv = cap.model.text_decoder.bert.image_keys_values(embeds, rows)
            seeds = row_seeds(list(range(n)), k, cap.device)
            return cap.decode(kv, seeds, cap.rules(n), sample=True, steps=cap.decoding.max_steps, compact=True)

    with FlopCounterMode(display=False) as counter:
        ids = decode()  # untimed warm-up
    took, _ = once(decode, cap.device)
    parts = dict.fromkeys(CATEGORIES, 0.0)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        decode()
    vocab, image_tokens = cap.vocab_size, embeds.shape[1]
    text = cap.model.text_decoder.bert.encoder.layer[0]
    widths = {text.attention.output.dense.out_features, text.intermediate.dense.out_features}
    for event in prof.key_averages(group_by_input_shape=True):
        kind = _category(event.key, event.input_shapes, vocab, image_tokens, widths)
        parts[kind] += event.self_cpu_time_total / 1e6
    return {
        "wall": took.wall,
        "cpu": took.cpu,
        "flops": counter.get_total_flops(),
        "tokens": len(rows) * cap.decoding.max_steps,
        "parts": parts,
        "capfilt": str(Path(capfilt.__file__).parent),
        "ids": hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:12],
    }


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.decode_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", default=f"this={ROOT}", help="label=path,... capfilt trees (each has capfilt/)")
    ap.add_argument("--size", default="base", choices=["tiny", "base", "large"])
    ap.add_argument("--ks", default="4,40", help="captions per image to profile (40: LAION-COCO's warps)")
    ap.add_argument("--images", default="2,1", help="images per K (same order as --ks)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=2, help="alternated rounds; each side's fastest is kept")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def render(results: dict, args, peak: dict, load: list) -> str:
    from benchmarks.common import machine

    info = machine(__import__("torch").device("cpu"))
    lines = [
        BEGIN,
        "## Decode loop profile (`python -m benchmarks.decode_profile`)",
        "",
        f"- Date: {info['date']}; {info['cpu']} ({info['cpu_cores']} cores), torch threads {args.threads}, "
        f"{args.precision}; load average before / after: {load[0]} / {load[1]}; {args.size} preset, "
        f"best of {args.rounds} alternated rounds per side; "
        f"fp32 matmul peak {peak['per_cpu_s'] / 1e9:.1f} GFLOP per CPU s",
        "- Self CPU time of one profiled decode (profiler overhead included), by kind of op; the sampler "
        "is every op on a rows x vocabulary tensor after the LM head (warps, noise, nucleus).",
        "",
        "| K | images | source | decode s (CPU s) | ms per token (CPU) | share of fp32 peak (CPU time) | "
        + " | ".join(CATEGORIES)
        + " | ids |",
        "|---:|---:|---|---:|---:|---:|" + "---:|" * len(CATEGORIES) + "---|",
    ]
    for (k, images, label), r in results.items():
        total = sum(r["parts"].values()) or 1.0
        shares = " | ".join(f"{r['parts'][c]:.3g} s ({r['parts'][c] / total:.0%})" for c in CATEGORIES)
        lines.append(
            f"| {k} | {images} | {label} | {r['wall']:.2f} ({r['cpu']:.2f}) | {1e3 * r['cpu'] / r['tokens']:.2f} | "
            f"{r['flops'] / r['cpu'] / peak['per_cpu_s']:.0%} | {shares} | {r['ids']} |"
        )
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    import torch

    # This process's threads and CAPFILT_MODELS_DIR (use_full_size_vocabulary) are set for the
    # run and given back after it: main() is also called in-process (tests/test_decode_profile.py).
    threads, models_env = torch.get_num_threads(), os.environ.get("CAPFILT_MODELS_DIR")
    try:
        return _profile(args, torch)
    finally:
        torch.set_num_threads(threads)
        if models_env is None:
            os.environ.pop("CAPFILT_MODELS_DIR", None)
        else:
            os.environ["CAPFILT_MODELS_DIR"] = models_env


def _profile(args, torch) -> int:
    from benchmarks.common import use_full_size_vocabulary
    from benchmarks.gpu_report import write_section
    from benchmarks.limits import machine_peak

    torch.set_num_threads(args.threads)
    load_start = [round(x, 2) for x in os.getloadavg()]
    peak = machine_peak(torch.device("cpu"))["fp32"]
    sources = dict(s.split("=", 1) for s in args.sources.split(","))
    runs = list(zip((int(k) for k in args.ks.split(",")), (int(n) for n in args.images.split(","))))
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="capfilt-decode-profile-") as models:
        use_full_size_vocabulary(Path(models))  # sets CAPFILT_MODELS_DIR, which the children inherit
        for rnd in range(args.rounds):
            for k, images in runs:
                for label, path in sources.items():
                    cmd = [sys.executable, "-m", "benchmarks.decode_profile", "--child", "--k", str(k)]
                    cmd += ["--images", str(images), "--size", args.size, "--threads", str(args.threads)]
                    cmd += ["--precision", args.precision]
                    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(path).resolve()), str(ROOT)])}
                    start = time.perf_counter()
                    # cwd outside any tree: `-m` puts the working directory first on sys.path
                    done = subprocess.run(cmd, env=env, cwd=models, capture_output=True, text=True)
                    if done.returncode:
                        raise SystemExit(f"{label} K={k} failed:\n{done.stderr[-3000:]}")
                    out = done.stdout
                    r = json.loads(out.strip().splitlines()[-1])
                    print(
                        f"round {rnd + 1} K={k} {label}: {r['wall']:.2f} s ({r['cpu']:.2f} CPU s), ids {r['ids']}, "
                        f"capfilt {r['capfilt']}, load {os.getloadavg()[0]:.2f}, "
                        f"child {time.perf_counter() - start:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                    key = (k, images, label)
                    if key not in results or r["wall"] < results[key]["wall"]:
                        results[key] = r
    text = render(results, args, peak, [load_start, [round(x, 2) for x in os.getloadavg()]])
    write_section(Path(args.out), text, BEGIN, END)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
