"""`capfilt dedup`'s search at 10^5 and 10^6 images: time, CPU time, peak memory; and the engine.

    python -m benchmarks.dedup_scale                   # engines side by side, then 1e5 and 1e6
    python -m benchmarks.dedup_scale --sizes 100000 --dim 768 --per-shard 10000

Synthetic float16 L2-normalised embeddings (ViT-L/14's 768 wide), written as a run's
embeddings/img_emb/{shard}.npy files, 1% of them noisy copies of an earlier row (cosine about
0.97, so the hit path runs). Each measurement runs in a fresh process (peak RSS = VmHWM).

1. Engines, same work side by side (best of 3, alternated): one query shard against every key
   shard, as `dedup.block_duplicates` does it (numpy float32 matmul + threshold), against faiss's
   exact IndexFlatIP range_search over the same rows, and torch.mm.
2. Scale: `dedup.find_duplicates` over the whole synthetic run at each size; at 10^6 (100 shards,
   5,050 shard pairs) only the last shard's block (it scans every row) is timed and the whole pass
   extrapolated as sum over shards of (shards before it + 1) x that block's time / shards.

Writes its section of docs/benchmarks.md (between `<!-- dedup:begin -->` and `<!-- dedup:end -->`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- dedup:begin -->", "<!-- dedup:end -->"
THRESHOLD = 0.95


def make_run(folder: Path, n: int, dim: int, per_shard: int, seed: int = 0) -> list:
    """Embeddings files of n rows in shards of per_shard, and the dedup Blocks over them."""
    from capfilt.dedup import Block

    rng = np.random.default_rng(seed)
    (folder / "img_emb").mkdir(parents=True, exist_ok=True)
    blocks, done = [], 0
    copies = 0
    for s in range((n + per_shard - 1) // per_shard):
        rows = min(per_shard, n - done)
        x = rng.standard_normal((rows, dim), dtype=np.float32)
        if done:  # 1% noisy copies of earlier rows of this shard
            for r in rng.choice(np.arange(1, rows), size=max(1, rows // 100), replace=False):
                x[r] = x[rng.integers(0, r)] + 0.25 * rng.standard_normal(dim, dtype=np.float32)
                copies += 1
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        path = folder / "img_emb" / f"{s:05d}.npy"
        np.save(path, x.astype(np.float16))
        blocks.append(Block(f"{s:05d}", str(path), np.arange(rows), [f"{s}-{r}" for r in range(rows)], [None] * rows))
        done += rows
    return blocks


def _usage() -> tuple[float, int]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024


def engines(folder: Path, n: int, dim: int, per_shard: int) -> dict:
    """One query shard against all key shards, three ways, alternated, best of 3."""
    import faiss
    import torch

    from capfilt.dedup import _matrix

    blocks = make_run(folder, n, dim, per_shard)
    q = _matrix(blocks[-1])
    keys = [_matrix(b) for b in blocks]

    def numpy_way():
        return sum(int(((q @ k.T) >= THRESHOLD).sum()) for k in keys)

    def torch_way():
        tq = torch.from_numpy(q)
        return sum(int((torch.mm(tq, torch.from_numpy(k).T) >= THRESHOLD).sum()) for k in keys)

    def faiss_way():
        hits = 0
        for k in keys:
            index = faiss.IndexFlatIP(dim)
            index.add(k)
            lims, _, _ = index.range_search(q, THRESHOLD)
            hits += int(lims[-1])
        return hits

    best = {name: (float("inf"), 0.0) for name in ("numpy", "torch", "faiss")}
    counts = {}
    for _ in range(3):
        for name, fn in (("numpy", numpy_way), ("torch", torch_way), ("faiss", faiss_way)):
            cpu0, t0 = time.process_time(), time.perf_counter()
            counts[name] = fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            if wall < best[name][0]:
                best[name] = (wall, cpu)
    return {"rows": n, "query_rows": len(q), "best": best, "hits": counts}


def scale(folder: Path, n: int, dim: int, per_shard: int, whole: bool) -> dict:
    from capfilt.dedup import block_duplicates, find_duplicates

    blocks = make_run(folder, n, dim, per_shard)
    cpu0, t0 = time.process_time(), time.perf_counter()
    if whole:
        found = len(find_duplicates(blocks, THRESHOLD))
        wall = time.perf_counter() - t0
        estimate = None
    else:
        found = len(block_duplicates(blocks, len(blocks) - 1, THRESHOLD))
        wall = time.perf_counter() - t0
        s = len(blocks)
        estimate = wall * sum(b + 1 for b in range(s)) / s
    cpu = time.process_time() - cpu0
    return {"rows": n, "shards": len(blocks), "wall_s": wall, "cpu_s": cpu, "peak_rss": _usage()[1],
            "found": found, "whole": whole, "estimate_s": estimate}  # fmt: skip


def child(args) -> None:
    with tempfile.TemporaryDirectory(prefix="capfilt-dedup-bench-") as tmp:
        if args.child == "engines":
            out = engines(Path(tmp), args.n, args.dim, args.per_shard)
        else:
            out = scale(Path(tmp), args.n, args.dim, args.per_shard, whole=args.child == "whole")
    print(json.dumps(out))


def run_child(kind: str, n: int, dim: int, per_shard: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.dedup_scale", "--child", kind, "--n", str(n), "--dim", str(dim),
           "--per-shard", str(per_shard)]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def section(eng: dict, results: list[dict], dim: int, load: str) -> str:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = [
        f"### capfilt dedup: near-duplicate search ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {date}, load average before: {load})",
        "",
        f"Synthetic L2-normalised float16 embeddings, dim {dim}, threshold {THRESHOLD}; "
        "`python -m benchmarks.dedup_scale`. Each row is a fresh process.",
        "",
        f"Engines, same work side by side (one {eng['query_rows']}-row query shard against all "
        f"{eng['rows']:,} rows, best of 3, alternated):",
        "",
        "| engine | wall s | CPU s | hits |",
        "|---|---:|---:|---:|",
    ]
    for name, (wall, cpu) in eng["best"].items():
        lines.append(f"| {name} | {wall:.2f} | {cpu:.2f} | {eng['hits'][name]} |")
    lines += [
        "",
        "| images | shards | measured | wall s | CPU s | peak RSS | whole pass |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        what = "whole pass" if r["whole"] else "last shard's block"
        total = f"{r['wall_s']:.0f} s" if r["whole"] else f"~{r['estimate_s'] / 3600:.1f} h (extrapolated)"
        lines.append(
            f"| {r['rows']:,} | {r['shards']} | {what} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{r['peak_rss'] / 2**20:.0f} MiB | {total} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", choices=["engines", "whole", "block"])
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--per-shard", type=int, default=10000)
    ap.add_argument("--engine-rows", type=int, default=50000)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    eng = run_child("engines", args.engine_rows, args.dim, args.per_shard)
    results = []
    for n in [int(x) for x in args.sizes.split(",")]:
        results.append(run_child("whole" if n <= 100_000 else "block", n, args.dim, args.per_shard))
    text = section(eng, results, args.dim, load)
    doc = ROOT / "docs" / "benchmarks.md"
    body = doc.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in body:
        body = body[: body.index(BEGIN)] + block + body[body.index(END) + len(END) :]
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(body)
    print(text)


if __name__ == "__main__":
    main()
