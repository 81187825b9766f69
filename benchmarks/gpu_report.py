"""The GPU section of docs/benchmarks.md, from the results of `python -m benchmarks.gpu`.

The section lives between two markers so that `make bench` (CPU, this machine) and
`benchmarks/gpu.sh` (GPU, another machine) can each rewrite their own part of the one file.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

BEGIN, END = "<!-- gpu:begin -->", "<!-- gpu:end -->"
# Issue 13's targets: MFU of the ViT stages, speedups, Ray pipeline efficiency, GPU idle share.
TARGETS = {"vit_mfu": 0.40, "captioner": 2.0, "filter": 3.0, "e2e": 3.0, "ray_efficiency": 0.85, "gpu_idle": 0.10}


def _met(value, target, lower_is_better=False) -> str:
    if value is None or value != value:
        return "n/a"
    ok = value < target if lower_is_better else value >= target
    return "yes" if ok else "**no**"


def render(res: dict, info: dict) -> str:
    gpu = info.get("gpu", "no GPU (dry run: numbers say nothing about a GPU)")
    lines = [
        BEGIN,
        "## GPU throughput (`benchmarks/gpu.sh`)",
        "",
        f"- Date: {info['date']}; device {info['device']} ({gpu}); driver {info.get('driver', 'n/a')}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}; CUDA {torch.version.cuda}",
        f"- {res['blip']} + {res['clip']}, {res['images']} images per batch, {res['shards']} shards, "
        f"{res['new_tokens']} new tokens per caption on both sides",
        "",
        "| comparison | capfilt img/s | stock img/s | speedup | CPU-time speedup | target | met | check |",
        "|---|---:|---:|---:|---:|---:|:---:|---|",
    ]
    for r in res["rows"]:
        key = "captioner" if r["what"].startswith("captioner") else "filter" if r["what"].startswith("filter") else None
        target = TARGETS.get(key) if key else None
        lines.append(
            f"| {r['what']} | {r['ours_img_s']:.1f} | {r['stock_img_s']:.1f} | {r['speedup']:.2f}× | "
            f"{r['cpu_speedup']:.2f}× | {f'≥ {target:g}×' if target else ''} | "
            f"{_met(r['speedup'], target) if target else ''} | {r['check']} |"
        )
    lines += [
        "",
        "| end to end (decode included) | img/s | vs plain loop | efficiency | GPU busy | GPU idle samples |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for runner, e in res["end_to_end"].items():
        busy = f"{e['gpu']['mean_util']:.0%}" if e["gpu"] else "n/a"
        idle = f"{e['gpu']['idle_share']:.0%}" if e["gpu"] else "n/a"
        how = (
            "stages built beforehand"
            if runner == "local"
            else f"marginal; {e['img_s_with_startup']:.1f} with start-up and model loading"
        )
        lines.append(
            f"| {runner} runner ({how}) | {e['img_s']:.1f} | "
            f"{e['vs_plain']:.2f}× (target ≥ 3×: {_met(e['vs_plain'], TARGETS['e2e'])}) | "
            f"{e['efficiency']:.2f}"
            + (f" (target ≥ 0.85: {_met(e['efficiency'], TARGETS['ray_efficiency'])})" if runner == "ray" else "")
            + f" | {busy} | {idle} (target < 10%: "
            f"{_met(e['gpu']['idle_share'] if e['gpu'] else None, TARGETS['gpu_idle'], True)}) |"
        )
    alone = ", ".join(f"{k} {v:.1f}" for k, v in res["alone_img_s"].items())
    lines += [
        "",
        f"- stages alone on pre-decoded inputs, img/s: {alone} (slowest: {res['slowest_stage']}); "
        f"plain transformers loop: {res['plain_img_s']:.2f} img/s",
        "",
        "| ViT | GFLOP/image | batch | TFLOP/s | MFU (target ≥ 40%) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, v in res["vit"].items():
        mfu = f"{v['mfu']:.0%} of {v['peak_tflops']:g} ({_met(v['mfu'], TARGETS['vit_mfu'])})" if v["mfu"] else "n/a"
        lines.append(f"| {name} | {v['gflop_per_image']:.3g} | {v['batch']} | {v['tflops']:.3g} | {mfu} |")
    lines += ["", "| stage | peak GiB at batch | largest batch that fits |", "|---|---:|---:|"]
    for name, m in res["memory"].items():
        peak = f"{m['peak_gib']:.1f} at {m['batch']}" if m.get("peak_gib") is not None else "n/a"
        largest = (
            (f"{m['largest_batch']}" + (" (search capped)" if m.get("capped") else ""))
            if m.get("largest_batch")
            else "n/a"
        )
        lines.append(f"| {name} | {peak} | {largest} |")
    checks = ", ".join(f"{k} {v:.2f}" for k, v in res["self_check_s"].items())
    lines += ["", f"- load-time self-check per model, s: {checks}", END]
    return "\n".join(lines)


def gpu_section_of(path: Path, begin: str = BEGIN, end: str = END) -> str | None:
    """The GPU section (or another section between two markers) of a benchmarks file, if it has one."""
    text = path.read_text() if path.is_file() else ""
    found = re.search(re.escape(begin) + ".*?" + re.escape(end), text, re.S)
    return found.group(0) if found else None


def write_section(path: Path, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the GPU section (or another marked section) of the file, or append it; the rest is kept."""
    text = path.read_text() if path.is_file() else ""
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")
