"""`capfilt dedup` against the synthetic world's planted duplicates: precision and recall by threshold.

    python -m benchmarks.dedup_quality            # 80 examples + 20 planted copies, tiny-clip embeddings

The world (seed 5) gets copies of a quarter of its examples (seed 1): the same bytes, re-encoded,
resized, cropped (`synthetic/duplicates.py`); a clip-only run writes tiny-clip image embeddings and
`dedup.find_duplicates` is scored against that truth (`dedup_quality`) at several thresholds, the
default first. Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

THRESHOLDS = (0.95, 0.99, 0.999, 0.9999)


def main() -> None:
    from capfilt import api
    from capfilt.config import DEDUP_THRESHOLD
    from capfilt.dedup import find_duplicates, plan
    from capfilt.synthetic import make_split, write_shards
    from capfilt.synthetic.duplicates import KINDS, dedup_quality, plant_duplicates

    examples, truth = plant_duplicates(make_split("web", 80, seed=5, image_size=64), share=0.25, seed=1)
    config = {
        "device": "cpu",
        "clip": {"model": "tiny-clip", "embeddings": "image"},
        "decide": {"web": {}, "synthetic": {}},
    }
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_shards(Path(tmp) / "in", examples, per_shard=25)
        api.run(config, input=urls, output=Path(tmp) / "run", progress=False)
        blocks = plan(Path(tmp) / "run")
        rows = ["| threshold | found | precision | recall | " + " | ".join(f"recall {k}" for k in KINDS) + " |"]
        rows.append("|---:" * (4 + len(KINDS)) + "|")
        for t in sorted({DEDUP_THRESHOLD, *THRESHOLDS}):
            q = dedup_quality(find_duplicates(blocks, t), truth)
            by_kind = " | ".join(f"{q['recall_by_kind'][k]:.2f}" for k in KINDS)
            rows.append(f"| {t:g} | {q['found']} | {q['precision']:.2f} | {q['recall']:.2f} | {by_kind} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
