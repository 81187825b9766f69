"""The LAION parquet has LAION-COCO's published schema (issue 17), whatever the input carries.

LAION-COCO's columns: URL, TEXT, top_caption, all_captions, all_similarities, WIDTH, HEIGHT,
similarity, hash, pwatermark, punsafe (types as its published parquet; capfilt adds `key`). WIDTH,
HEIGHT, hash, pwatermark and punsafe are the input's own: an img2dataset shard carries them in its
parquet sidecar and/or each sample's .json (``--save_additional_columns``); they are passed
through (sidecar first, then .json), typed as published, and null where the input has none. The
schema is fixed, so shards with and without metadata concatenate, and the Ray runner's commit path
writes the same bytes as the local runner.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import capfilt.synthetic as syn
from capfilt.config import load_config
from capfilt.io.rows import laion_meta
from capfilt.records import LAION_SCHEMA, laion_value

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "pipelines" / "demo" / "laion_coco_tiny.yaml"
PER_SHARD = 3

# LAION-COCO's published columns and types (its parquet, as re-uploaded with dataset_info at
# huggingface.co/datasets/Mayfull/laion-coco-1m), after capfilt's own `key`.
PUBLISHED = [
    ("key", pa.string()),
    ("URL", pa.string()),
    ("TEXT", pa.string()),
    ("top_caption", pa.string()),
    ("all_captions", pa.list_(pa.string())),
    ("all_similarities", pa.list_(pa.float64())),
    ("WIDTH", pa.int64()),
    ("HEIGHT", pa.int64()),
    ("similarity", pa.float64()),
    ("hash", pa.int64()),
    ("pwatermark", pa.float64()),
    ("punsafe", pa.float64()),
]


def test_the_schema_is_the_published_one():
    assert [(f.name, f.type) for f in LAION_SCHEMA] == PUBLISHED


def test_values_are_typed_as_published_or_null():
    assert laion_value("WIDTH", 640) == 640 and laion_value("WIDTH", 640.0) == 640  # pandas' int-with-nulls
    for bad in (640.5, math.nan, "640", True, None, [640], 1 << 63):
        assert laion_value("WIDTH", bad) is None
    assert laion_value("hash", -(1 << 63)) == -(1 << 63)
    assert laion_value("punsafe", 1) == 1.0 and isinstance(laion_value("punsafe", 1), float)
    assert laion_value("punsafe", float(np.float32(0.1))) == float(np.float32(0.1))
    assert laion_value("pwatermark", "0.5") is None and laion_value("pwatermark", False) is None


def test_the_sidecar_comes_first_then_the_json():
    side = {"WIDTH": 100, "HEIGHT": None, "hash": 7, "punsafe": None, "pwatermark": "x"}
    js = json.dumps({"WIDTH": 1, "HEIGHT": 2, "hash": 8, "punsafe": 0.25, "pwatermark": 0.5, "other": 1})
    assert laion_meta(side, js) == {"WIDTH": 100, "HEIGHT": 2, "hash": 7, "pwatermark": 0.5, "punsafe": 0.25}
    assert laion_meta(None, "not json") == dict.fromkeys(("WIDTH", "HEIGHT", "hash", "pwatermark", "punsafe"))
    assert laion_meta(None, "[1, 2]") == laion_meta(None, None) == laion_meta({}, "{}")


# --------------------------------------------------------------------------- a run over img2dataset shards


def _rewrite_json(tar_path: Path, extra: dict[str, dict]) -> None:
    """Add ``extra[key]`` to the .json member of those keys (img2dataset's additional columns)."""
    members = []
    with tarfile.open(tar_path) as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info).read()
            key, _, ext = info.name.partition(".")
            if ext == "json" and key in extra:
                data = json.dumps({**json.loads(data), **extra[key]}).encode()
            members.append((info.name, data))
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three img2dataset-style shards: 00000's sidecar has LAION2B-en's metadata columns (its own
    types: int32 sizes, float32 probabilities, a null), and one of its samples the missing WIDTH in
    its .json; 00001 has them only in its samples' .json; 00002 has none."""
    data = tmp_path_factory.mktemp("laion-data")
    examples = syn.make_split("web", 3 * PER_SHARD, seed=6, noise_share=0.3, image_size=48)
    syn.write_shards(data, examples, per_shard=PER_SHARD, upstream_failed=2)
    side = pq.read_table(data / "00000.parquet")
    keys = side.column("key").to_pylist()  # the tar's samples, then the upstream failures
    n = len(keys)
    meta = {
        "WIDTH": pa.array([640, None, 1024] + [None] * (n - 3), pa.int32()),
        "HEIGHT": pa.array([480, 333, 768] + [None] * (n - 3), pa.int32()),
        "similarity": pa.array([0.31, 0.29, 0.35] + [None] * (n - 3), pa.float64()),
        "hash": pa.array([-5 * 10**18, 42, 9 * 10**18] + [None] * (n - 3), pa.int64()),
        "punsafe": pa.array([0.001, 0.9, None] + [None] * (n - 3), pa.float32()),
        "pwatermark": pa.array([0.2, 0.05, 0.7] + [None] * (n - 3), pa.float32()),
    }
    for name, column in meta.items():
        side = side.append_column(name, column)
    pq.write_table(side, data / "00000.parquet")
    _rewrite_json(data / "00000.tar", {keys[1]: {"WIDTH": 500, "HEIGHT": 1}})  # WIDTH from here, HEIGHT not
    keys1 = pq.read_table(data / "00001.parquet").column("key").to_pylist()
    _rewrite_json(
        data / "00001.tar",
        {
            keys1[0]: {"WIDTH": 512.0, "HEIGHT": 256, "hash": 3, "punsafe": 0.5, "pwatermark": 0.125},
            keys1[1]: {"WIDTH": "wide", "hash": 1.5, "punsafe": 1},
        },
    )
    (data / "00001.parquet").unlink()
    (data / "00002.parquet").unlink()
    expected = {
        keys[0]: {
            "WIDTH": 640,
            "HEIGHT": 480,
            "hash": -5 * 10**18,
            "punsafe": float(np.float32(0.001)),
            "pwatermark": float(np.float32(0.2)),
        },
        keys[1]: {
            "WIDTH": 500,
            "HEIGHT": 333,
            "hash": 42,
            "punsafe": float(np.float32(0.9)),
            "pwatermark": float(np.float32(0.05)),
        },
        keys[2]: {
            "WIDTH": 1024,
            "HEIGHT": 768,
            "hash": 9 * 10**18,
            "punsafe": None,
            "pwatermark": float(np.float32(0.7)),
        },
        keys1[0]: {"WIDTH": 512, "HEIGHT": 256, "hash": 3, "punsafe": 0.5, "pwatermark": 0.125},
        keys1[1]: {"WIDTH": None, "HEIGHT": None, "hash": None, "punsafe": 1.0, "pwatermark": None},
    }
    return data, expected


@pytest.fixture(scope="module")
def laion_run(corpus, tmp_path_factory):
    from capfilt.pipeline import run

    data, _ = corpus
    out = tmp_path_factory.mktemp("laion-run") / "out"
    # batch_size 2: a shard is two batches (the ledger and LAION table are appended batch by batch)
    config = load_config(RECIPE).model_copy(
        update={"input": [str(p) for p in sorted(data.glob("*.tar"))], "output": str(out), "batch_size": 2}
    )
    result = run(config, progress=False)
    assert result.ok
    return out, config


def test_every_shard_has_the_published_columns_with_the_inputs_values(corpus, laion_run):
    _, expected = corpus
    out, _ = laion_run
    files = sorted((out / "laion").glob("*.parquet"))
    assert [f.stem for f in files] == ["00000", "00001", "00002"]
    for f in files:
        assert [(field.name, field.type) for field in pq.read_schema(f)] == PUBLISHED
    rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()  # one schema: they concatenate
    assert len(rows) == 3 * PER_SHARD
    columns = ("WIDTH", "HEIGHT", "hash", "pwatermark", "punsafe")
    for row in rows:
        want = expected.get(row["key"], dict.fromkeys(columns))  # 00002, and 00001's third: nothing given
        assert {c: row[c] for c in columns} == want, row["key"]
        assert row["URL"] and row["TEXT"] and row["top_caption"] in row["all_captions"]
        # capfilt's own similarity (the top caption's, by the chain's last model), not the input's
        assert row["similarity"] not in (0.31, 0.29, 0.35)


def test_the_ledger_shows_both_rerank_models_scores(laion_run):
    out, _ = laion_run
    rows = pq.read_table(sorted((out / "ledger").glob("*.parquet"))).to_pylist()
    scored = [r for r in rows if r["clip_scores"] is not None]
    assert scored and all(len(r["clip_scores"]) == 2 and r["clip_scores"][0] is not None for r in scored)
    assert all(r["clip"] == r["clip_scores"][1] for r in scored)
    assert any(r["clip_scores"][1] is None for r in scored)  # cut by the first model, never seen by the second


# --------------------------------------------------------------------------- what img2dataset writes (issue 22 item 5)


def test_img2dataset_size_columns_stand_in_for_width_and_height():
    """img2dataset (1.47, downloader.py) writes lower-case width / height (the image in the tar) and
    original_width / original_height (the web image, LAION's WIDTH / HEIGHT) into its parquet and
    each .json; LAION's own upper-case names win where an input carries them."""
    i2d = {"width": 256, "height": 192, "original_width": 640, "original_height": 480}
    assert laion_meta(i2d, None) | {} == {**laion_meta(None, None), "WIDTH": 640, "HEIGHT": 480}
    assert laion_meta(None, json.dumps(i2d))["WIDTH"] == 640  # the .json alone
    assert laion_meta({"width": 256, "height": 192}, None)["HEIGHT"] == 192  # no original_*: the tar's size
    assert laion_meta({**i2d, "WIDTH": 1000}, None)["WIDTH"] == 1000
    assert laion_meta({"WIDTH": None, "original_width": None}, json.dumps({"width": 5}))["WIDTH"] == 5


def _img2dataset_shard(folder: Path) -> Path:
    """A two-sample shard laid out as img2dataset 1.47 writes it: jpg, txt (one empty: LAION's "")
    and json per sample, and the parquet sidecar with its columns and types."""
    from PIL import Image

    rows = []
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i, text in enumerate(["a red square on a table", ""]):
            key = f"00000000{i}"
            buf = io.BytesIO()
            Image.new("RGB", (48, 40), (200, 30 * i, 10)).save(buf, format="JPEG")
            meta = {
                "url": f"http://example.com/{i}.jpg",
                "caption": text,
                "key": key,
                "status": "success",
                "error_message": None,
                "width": 48,
                "height": 40,
                "original_width": 480 + i,
                "original_height": 400 + i,
            }
            rows.append(meta)
            for ext, data in (("jpg", buf.getvalue()), ("txt", text.encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    schema = pa.schema(
        [("url", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("status", pa.string())]
        + [("error_message", pa.string())]
        + [(c, pa.int32()) for c in ("width", "height", "original_width", "original_height")]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "00000.parquet")
    return folder / "00000.tar"


def test_a_run_over_img2dataset_output_fills_width_height_and_empty_text(tmp_path):
    from capfilt.pipeline import run

    (tmp_path / "i2d").mkdir()
    shard = _img2dataset_shard(tmp_path / "i2d")
    out = tmp_path / "out"
    config = load_config(RECIPE).model_copy(update={"input": [str(shard)], "output": str(out)})
    assert run(config, progress=False).ok
    rows = {r["key"]: r for r in pq.read_table(out / "laion" / "00000.parquet").to_pylist()}
    assert [(rows[k]["WIDTH"], rows[k]["HEIGHT"]) for k in sorted(rows)] == [(480, 400), (481, 401)]
    assert rows["000000000"]["TEXT"] == "a red square on a table"
    assert rows["000000001"]["TEXT"] == ""  # an empty web text is LAION's "", not null
