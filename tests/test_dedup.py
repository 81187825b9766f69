"""`capfilt dedup` (issue 26 items 3, 5): exact and near duplicates across a whole run, measured
against copies planted in the synthetic world (same bytes, re-encoded, resized, cropped)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from capfilt import api
from capfilt.cli import main
from capfilt.config import DEDUP_THRESHOLD
from capfilt.dedup import Block, block_duplicates, find_duplicates, plan
from capfilt.records import Reason
from capfilt.synthetic import make_split, write_shards
from capfilt.synthetic.duplicates import KINDS, dedup_quality, plant_duplicates

CONFIG = {
    "device": "cpu",
    "batch_size": 16,
    "clip": {"model": "tiny-clip", "embeddings": "image"},
    "decide": {"web": {}, "synthetic": {}},  # every sample kept: every image takes part
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    base = tmp_path_factory.mktemp("dedup")
    examples, truth = plant_duplicates(make_split("web", 32, seed=5, image_size=64), share=0.25, seed=1)
    urls = write_shards(base / "in", examples, per_shard=10)  # copies land in other shards too
    summary = api.run(CONFIG, input=urls, output=base / "run", progress=False)
    assert summary["ok"] and summary["kept"] == len(examples)
    return base, truth, examples


def test_planted_copies_are_found_and_the_original_stays(planted):
    base, truth, examples = planted
    rows = find_duplicates(plan(base / "run"))
    quality = dedup_quality(rows, truth)
    # every planted copy, of each kind, is found at the default threshold ...
    assert quality["recall"] == 1.0 and set(quality["recall_by_kind"]) == set(KINDS)
    assert all(r == 1.0 for r in quality["recall_by_kind"].values())
    # ... as a duplicate of an image before it (its original or an earlier look-alike): no
    # original is ever dropped in favour of its own copy
    order = {ex.key: n for n, ex in enumerate(examples)}
    assert all(order[r["duplicate_of"]] < order[r["key"]] for r in rows)
    exact = {t["key"]: t["duplicate_of"] for t in truth if t["kind"] == "exact"}
    for r in rows:
        if r["key"] in exact:  # same pixels: found by the hash, named after its own original
            assert (r["kind"], r["duplicate_of"], r["similarity"]) == ("exact", exact[r["key"]], 1.0)
    # (with the tiny CLIP's random weights every shapes-world image embeds alike, so its precision
    # is low: docs/benchmarks.md has the numbers. What this pins is the rule, not the model.)


def test_exact_duplicates_need_no_embedding_similarity(tmp_path):
    """Two rows with the same pixel hash are exact duplicates even where the threshold (here above
    any cosine) finds nothing near."""
    emb = np.eye(3, dtype=np.float16)
    path = str(tmp_path / "eye.npy")
    np.save(path, emb)
    block = Block("s", path, np.arange(3), ["a", "b", "c"], ["h1", "h2", "h1"])
    rows = block_duplicates([block], 0, threshold=1.0)
    assert rows == [
        {"key": "c", "shard": "s", "duplicate_of": "a", "duplicate_of_shard": "s", "similarity": 1.0, "kind": "exact"}
    ]


def test_chunking_does_not_change_the_table(planted, monkeypatch):
    import capfilt.dedup as dedup

    base, _, _ = planted
    blocks = plan(base / "run")
    whole = find_duplicates(blocks, 0.999)
    monkeypatch.setattr(dedup, "BLOCK", 3)  # query blocks of 3 rows instead of 4096
    assert find_duplicates(blocks, 0.999) == whole


def test_cli_writes_the_table_and_a_run_without_the_duplicates(planted, tmp_path, monkeypatch):
    from capfilt.modeling import clip_reranker

    def refuse(*a, **k):
        raise AssertionError("dedup loaded a model")

    monkeypatch.setattr(clip_reranker.ClipReranker, "__init__", refuse)
    base, truth, examples = planted
    out = tmp_path / "deduped"
    assert main(["dedup", str(base / "run"), "--output", str(out), "--table", str(tmp_path / "d.parquet")]) == 0
    table = pq.read_table(tmp_path / "d.parquet").to_pylist()
    assert table == pq.read_table(out / "duplicates.parquet").to_pylist()
    dropped = {r["key"] for r in table}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"] == len(examples)  # accounting: every sample once
    assert summary["kept"] == len(examples) - len(dropped)
    assert summary["rejected"] == len(dropped)
    stats = [json.loads(p.read_text()) for p in sorted((out / "stats").glob("*.json"))]
    assert sum(s["rejected_by_reason"].get(Reason.NEAR_DUPLICATE, 0) for s in stats) == len(dropped)
    rows = [r for p in sorted((out / "ledger").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert {r["key"] for r in rows if r["kept"]}.isdisjoint(dropped)
    assert {r["key"] for r in rows if r["reason"] == Reason.NEAR_DUPLICATE} == dropped
    assert np.load(out / "embeddings" / "img_emb" / "00000.npy").shape[0] > 0  # carried over


def test_dedup_on_ray_gives_the_local_table(planted):
    pytest.importorskip("ray")
    from capfilt.runners.ray.dedup import find_duplicates_on_ray

    base, _, _ = planted
    blocks = plan(base / "run")
    assert find_duplicates_on_ray(blocks, DEDUP_THRESHOLD) == find_duplicates(blocks, DEDUP_THRESHOLD)


def test_a_run_without_embeddings_is_refused_in_one_line(tmp_path):
    examples = make_split("web", 2, seed=6, image_size=64)
    urls = write_shards(tmp_path / "in", examples, per_shard=2)
    api.run({**CONFIG, "clip": {"model": "tiny-clip"}}, input=urls, output=tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="wrote no embeddings"):
        plan(tmp_path / "run")


def test_another_threshold_into_the_same_output_is_refused_unless_fresh(planted, tmp_path):
    from capfilt.dedup import dedup

    base, _, _ = planted
    out = str(tmp_path / "d")
    first = dedup(str(base / "run"), output=out, threshold=0.9999)
    again = dedup(str(base / "run"), output=out, threshold=0.9999)  # a resume: same table, nothing redone
    assert again["duplicates"] == first["duplicates"]
    with pytest.raises(ValueError, match="other duplicates"):
        dedup(str(base / "run"), output=out, threshold=0.95)
    fresh = dedup(str(base / "run"), output=out, threshold=0.95, fresh=True)
    assert fresh["summary"]["rejected"] == fresh["duplicates"] > first["duplicates"]
