"""`make bench`: capfilt's hot paths vs the stock way, same work, same weights, one run.

    python -m benchmarks.run                      # CPU: tiny + BLIP-base sizes + peak memory, ~15 min on 2 cores
    python -m benchmarks.run --size tiny          # quick
    python -m benchmarks.run --device cuda --precision bf16 --size large   # GPU: BLIP-large + ViT-L/14

Writes docs/benchmarks.md (overwritten) and prints it. No timing threshold fails the command;
an output disagreement (scores beyond tolerance, greedy captions differing) exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import SIZES, machine, use_full_size_vocabulary
from benchmarks.decode_profile import BEGIN as DECODE_BEGIN
from benchmarks.decode_profile import END as DECODE_END
from benchmarks.families import BEGIN as FAMILIES_BEGIN
from benchmarks.families import END as FAMILIES_END
from benchmarks.gpu_report import BEGIN as GPU_BEGIN
from benchmarks.gpu_report import END as GPU_END
from benchmarks.gpu_report import gpu_section_of, write_section
from benchmarks.limits import MATMUL, machine_peak
from benchmarks.memory import BEGIN as MEM_BEGIN
from benchmarks.memory import END as MEM_END
from benchmarks.memory import measure as measure_memory
from benchmarks.memory import render as render_memory
from benchmarks.ray_scale import BEGIN as RAY_BEGIN
from benchmarks.ray_scale import END as RAY_END
from benchmarks.report import GPU_TARGETS, TARGETS, render

ROOT = Path(__file__).resolve().parents[1]
# Comparisons measured once by hand (not by a script `make bench` runs), each with its machine,
# date and load: kept across reruns between these markers.
MEASURED_BEGIN, MEASURED_END = "<!-- measured:begin -->", "<!-- measured:end -->"


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--size", default=None, help="comma list of tiny, base, large (default: tiny,base on CPU, tiny,large on GPU)"
    )
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--k", type=int, default=4, help="captions per image")
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--laion-k", type=int, default=40, help="captions per image of the LAION-COCO rows (b40)")
    ap.add_argument(
        "--laion-sizes",
        default=None,
        help="sizes running the LAION-COCO rows (default: tiny,base on CPU, tiny,large on GPU; 'none': skip)",
    )
    ap.add_argument("--laion-images", type=int, default=2, help="images of the LAION-COCO rows (0: all of the size's)")
    ap.add_argument("--images", type=int, default=None, help="override the images per size")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 2 on CPU)")
    ap.add_argument("--cascade", default="0.25,0.75", help="ITC quantiles bounding the cascade's ITM band")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes (benchmarks.memory)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args(argv)
    args.argv = argv
    args.cascade = tuple(float(q) for q in args.cascade.split(","))
    gpu = args.device.startswith("cuda")
    args.size = (args.size or ("tiny,large" if gpu else "tiny,base")).split(",")
    laion = args.laion_sizes or ("tiny,large" if gpu else "tiny,base")
    args.laion_sizes = [] if laion == "none" else laion.split(",")
    unknown = [s for s in args.size + args.laion_sizes if s not in SIZES]
    if unknown:
        ap.error(f"unknown size(s) {unknown}; choose from {sorted(SIZES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    from benchmarks.common import Size
    from benchmarks.suite import run_size
    from capfilt.modeling.loading import pick_device

    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 2)
    elif args.threads:
        torch.set_num_threads(args.threads)
    start, load_start = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    log(f"measuring this machine's limit (matmul {MATMUL}^2 fp32 / bf16, streaming copy)")
    peak = machine_peak(device)
    log(
        "peak: "
        + ", ".join(f"{k} {v['per_s'] / 1e9:.1f} G/s" for k, v in peak.items() if v)
        + " (FLOP/s for matmuls, bytes/s for the copy)"
    )
    results, notes = [], []
    vocab_dir = tempfile.TemporaryDirectory(prefix="capfilt-bench-models-")
    use_full_size_vocabulary(Path(vocab_dir.name))
    for name in args.size:
        size = SIZES[name]
        if args.images:
            size = Size(**{**size.__dict__, "images": args.images})
        with tempfile.TemporaryDirectory(prefix=f"capfilt-bench-{name}-") as tmp:
            res = run_size(size, args, Path(tmp), log)
        results.append(res)
        log(f"[{name}] done")

    gpu = device.type == "cuda"
    targets = GPU_TARGETS if gpu else TARGETS
    for res in results:
        if res["size"] == "tiny":
            continue
        for r in res["rows"]:
            if r["id"] in targets and r["ratio"] < targets[r["id"]]:
                notes.append(f"{res['size']}: ({r['id']}) missed its target: {r['ratio']:.2f} < {targets[r['id']]:g}")
    info = {**machine(device), "load_start": load_start, "peak": peak}
    text = render(results, info, args, notes)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    # Sections measured by other scripts (benchmarks/gpu.sh on a GPU machine, benchmarks.ray_scale,
    # benchmarks.decode_profile): kept.
    kept = [
        (s, markers)
        for markers in [
            (GPU_BEGIN, GPU_END),
            (RAY_BEGIN, RAY_END),
            (FAMILIES_BEGIN, FAMILIES_END),
            (MEM_BEGIN, MEM_END),
            (DECODE_BEGIN, DECODE_END),
            (MEASURED_BEGIN, MEASURED_END),
        ]
        if (s := gpu_section_of(Path(args.out), *markers))
    ]
    memory = None
    if device.type == "cpu" and "base" in args.size and not args.no_memory:
        size = SIZES["base"]
        rows = measure_memory(size.images, args.k, size.blip, size.clip, log)
        memory = render_memory(rows, size.images, args.k, size.blip, size.clip, machine(device))
    Path(args.out).write_text(text)
    for section, markers in kept:
        if memory is None or markers != (MEM_BEGIN, MEM_END):
            write_section(Path(args.out), section, *markers)
    if memory:
        write_section(Path(args.out), memory, MEM_BEGIN, MEM_END)
        print(memory)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results}, indent=1, default=str))
    print(text)
    log(f"wrote {args.out}")
    bad = [f"{res['size']} ({r['id']})" for res in results for r in res["rows"] if r["ok"] is False]
    if bad:
        print(f"outputs disagree in: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
