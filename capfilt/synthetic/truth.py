"""Score a CapFilt run against known truth: the synthetic world's scenes (or any labels).

Labels per candidate text: a web text is correct when its sample's `noise` is "none"; a synthetic
caption is correct when it states exactly the scene's attributes (`text.matches`).
"""

from __future__ import annotations

import json
from pathlib import Path

from capfilt.config import SOURCES
from capfilt.io.shards import expand_shards, read_shard
from capfilt.synthetic.text import matches
from capfilt.synthetic.world import Scene


def _truth_of_inputs(inputs: list[str]) -> dict:
    truth = {}
    for url in expand_shards(inputs):
        try:
            for s in read_shard(url):
                raw = s.members.get("json")
                try:
                    meta = json.loads(raw) if raw else None
                except ValueError:
                    meta = None
                if meta and meta.get("scene"):
                    scene = meta["scene"]
                    scene = Scene(**{**scene, "background": tuple(scene["background"])})
                    truth[(s.shard, s.key, s.occurrence)] = (scene, meta.get("noise", "none"))
        except Exception:  # noqa: BLE001 - an unreadable shard has no truth to offer
            continue
    return truth


def labelled_ledger(run_dir: str | Path) -> list[dict]:
    """Ledger rows of scored candidates, each with `correct` (bool) from the synthetic truth."""
    from capfilt.io.run_dir import read_ledger, read_run_record

    config = read_run_record(run_dir)["config"]  # a local path or the run's URL (s3://…)
    truth = _truth_of_inputs(config["input"])
    rows = []
    for r in read_ledger(run_dir):
        t = truth.get((r["shard"], r["key"], r["occurrence"]))
        if t is None or r["candidate"] == -1 or r["text"] is None:
            continue
        scene, noise = t
        r["correct"] = (noise == "none") if r["source"] == "web" else matches(scene, r["text"])
        rows.append(r)
    return rows


def _share(n: int, d: int) -> float | None:
    return n / d if d else None


def quality(rows: list[dict]) -> dict:
    """The numbers the demo prints: noise before/after, filter precision/recall, caption accuracy."""
    out = {}
    for source in SOURCES:
        rs = [r for r in rows if r["source"] == source]
        good = [r for r in rs if r["correct"]]
        bad = [r for r in rs if not r["correct"]]
        kept = [r for r in rs if r["kept"]]
        out[source] = {
            "texts": len(rs),
            "noise_before": _share(len(bad), len(rs)),
            "noise_after": _share(sum(not r["correct"] for r in kept), len(kept)),
            "kept": len(kept),
            "precision": _share(sum(r["correct"] for r in kept), len(kept)),
            "recall": _share(sum(r["kept"] for r in good), len(good)),
            "wrong_removed": _share(sum(not r["kept"] for r in bad), len(bad)),
            "correct_kept": _share(sum(r["kept"] for r in good), len(good)),
        }
    kept = [r for r in rows if r["kept"]]
    out["bootstrapped_noise"] = _share(sum(not r["correct"] for r in kept), len(kept))
    out["bootstrapped_texts"] = len(kept)
    return out
