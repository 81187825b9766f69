"""Image (and caption) embeddings out of the clip chain, in clip-retrieval's layout (issue 26 item 1).

One tiny laion_style run: the chain's first model writes embeddings/img_emb, text_emb and
metadata per shard. Read back with numpy and pyarrow, checked row by row against open_clip's own
encoders on the same images and captions, searched with faiss, carried over by rethreshold, and
handled by the sweep like every other file capfilt writes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt import api
from capfilt.io.folder import OutputFolder
from capfilt.io.names import OWN_FOLDERS, is_own
from capfilt.synthetic import make_split, write_shards

RECIPE = "pipelines/demo/laion_style_tiny.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("emb")
    examples = make_split("web", 16, seed=3, noise_share=0.4, image_size=64)
    urls = write_shards(base / "in", examples, per_shard=8, broken=False)
    summary = api.run(RECIPE, input=urls, output=base / "out", progress=False)
    assert summary["ok"], summary
    return base / "out", urls


def _ledger(out: Path, shard: str) -> list[dict]:
    return pq.read_table(out / "ledger" / f"{shard}.parquet").to_pylist()


def test_files_are_clip_retrieval_layout_row_aligned_float16_unit_norm(run):
    out, _ = run
    for shard in ("00000", "00001"):
        images = np.load(out / "embeddings" / "img_emb" / f"{shard}.npy")
        texts = np.load(out / "embeddings" / "text_emb" / f"{shard}.npy")
        meta = pq.read_table(out / "embeddings" / "metadata" / f"{shard}.parquet").to_pylist()
        assert images.dtype == np.float16 and texts.dtype == np.float16
        assert images.shape == texts.shape == (len(meta), 32)  # tiny-clip's embed_dim
        np.testing.assert_allclose(np.linalg.norm(images.astype(np.float32), axis=1), 1.0, atol=2e-3)
        # one row per scored sample, in the shard's order (every sample of this clean corpus)
        scored = list(dict.fromkeys(r["key"] for r in _ledger(out, shard) if r["candidate"] >= 0))
        assert [m["key"] for m in meta] == scored
        record = json.loads((out / "run.json").read_text())
        identity = json.loads(meta[0]["model"])
        assert identity["preset"] == "tiny-clip" and identity["sha256"] in json.dumps(record)


def test_rows_are_open_clips_own_embeddings_of_those_images_and_captions(run):
    """Row r is the stock open_clip encode_image of key r's image (and encode_text of its
    caption): what any reader of clip-retrieval's files takes them to be."""
    import open_clip
    import torch

    from capfilt.io.shards import image_member, read_shard
    from capfilt.modeling.presets import resolve_clip

    out, urls = run
    name, _, _ = resolve_clip("tiny-clip")
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    images = np.load(out / "embeddings" / "img_emb" / "00000.npy").astype(np.float32)
    texts = np.load(out / "embeddings" / "text_emb" / "00000.npy").astype(np.float32)
    meta = pq.read_table(out / "embeddings" / "metadata" / "00000.parquet").to_pylist()
    pixels = {}
    for s in read_shard(urls[0]):
        ext, data = image_member(s)
        pixels[s.key] = Image.open(io.BytesIO(data)).convert("RGB")
    selected = {r["key"]: r["text"] for r in _ledger(out, "00000") if r["selected"]}
    with torch.no_grad():
        want_img = model.encode_image(torch.stack([preprocess(pixels[m["key"]]) for m in meta]))
        want_txt = model.encode_text(tokenizer([m["caption"] for m in meta]))
    want_img = torch.nn.functional.normalize(want_img, dim=-1).numpy()
    want_txt = torch.nn.functional.normalize(want_txt, dim=-1).numpy()
    np.testing.assert_allclose(images, want_img, atol=2e-3)  # float16 rounding
    np.testing.assert_allclose(texts, want_txt, atol=2e-3)
    for m in meta:  # the caption is the selected text where the sample kept one
        if m["key"] in selected:
            assert m["caption"] == selected[m["key"]]


def test_faiss_builds_an_index_over_the_folder_and_finds_each_image_itself(run):
    faiss = pytest.importorskip("faiss")
    out, _ = run
    folder = out / "embeddings" / "img_emb"
    files = sorted(folder.glob("*.npy"))  # name order, as autofaiss / embedding_reader read them
    matrix = np.concatenate([np.load(f) for f in files]).astype(np.float32)
    meta = [
        r for f in sorted((out / "embeddings" / "metadata").glob("*.parquet")) for r in pq.read_table(f).to_pylist()
    ]
    index = faiss.IndexFlatIP(matrix.shape[1])
    index.add(matrix)
    _, nearest = index.search(matrix, 1)
    assert len(meta) == index.ntotal == 16
    assert [meta[i]["key"] for i in nearest[:, 0]] == [m["key"] for m in meta]


def test_embedding_files_are_capfilts_own_names_for_sweep_and_fresh(run, tmp_path):
    for sub in ("embeddings/img_emb", "embeddings/text_emb", "embeddings/metadata"):
        assert sub in OWN_FOLDERS
    assert is_own("embeddings/img_emb", "00000.npy", {"00000"})
    assert not is_own("embeddings/img_emb", "notes.txt", {"00000"})
    # a crashed run's temporary embeddings file is swept; a user's file beside it is not
    out = tmp_path / "out"
    (out / "embeddings" / "img_emb").mkdir(parents=True)
    stray = out / "embeddings" / "img_emb" / "00000.npy.tmp-0123abcd"
    mine = out / "embeddings" / "img_emb" / "mine.npy.tmp-backup"
    stray.write_bytes(b"x"), mine.write_bytes(b"y")
    OutputFolder(out).sweep()
    assert not stray.exists() and mine.exists()


def test_rethreshold_carries_the_embeddings_over_without_a_model(run, tmp_path, monkeypatch):
    from capfilt.modeling import clip_reranker, heads
    from capfilt.rethreshold import rethreshold

    def refuse(*a, **k):
        raise AssertionError("rethreshold loaded a model")

    monkeypatch.setattr(clip_reranker.ClipReranker, "__init__", refuse)
    monkeypatch.setattr(heads.Head, "__init__", refuse)
    out, _ = run
    derived = tmp_path / "derived"
    rethreshold(str(out), str(derived), overrides=["decide.top_m=1"])
    for shard in ("00000", "00001"):
        before = np.load(out / "embeddings" / "img_emb" / f"{shard}.npy")
        after = np.load(derived / "embeddings" / "img_emb" / f"{shard}.npy")
        np.testing.assert_array_equal(before, after)
        np.testing.assert_array_equal(
            np.load(out / "embeddings" / "text_emb" / f"{shard}.npy"),
            np.load(derived / "embeddings" / "text_emb" / f"{shard}.npy"),
        )
        assert (derived / "_done" / f"{shard}.done").is_file()


def test_at_most_one_chain_model_writes_embeddings():
    from capfilt.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="one model of the clip chain at most"):
        load_config(RECIPE, ["clip.1.embeddings=image"])
    with pytest.raises(ConfigError, match="quality needs image embeddings"):
        load_config(RECIPE, ["clip.0.embeddings=null"])


def test_a_run_without_embeddings_writes_no_embeddings_folder(tmp_path):
    examples = make_split("web", 4, seed=4, image_size=64)
    urls = write_shards(tmp_path / "in", examples, per_shard=4)
    summary = api.run("pipelines/demo/laion_coco_tiny.yaml", input=urls, output=tmp_path / "out", progress=False)
    assert summary["ok"]
    assert not (tmp_path / "out" / "embeddings").exists()


def test_the_ray_runner_writes_the_local_runners_embeddings_byte_for_byte(tmp_path):
    """The laion_style recipe on Ray (a local Ray of its own, shard workers) and in this process:
    the same embeddings files, ledger and LAION parquet, byte for byte (one torch thread each)."""
    pytest.importorskip("ray")
    examples = make_split("web", 8, seed=3, image_size=64)
    urls = write_shards(tmp_path / "in", examples, per_shard=4)
    same = ["threads=1"]
    local = api.run(RECIPE, input=urls, output=tmp_path / "local", overrides=same, progress=False)
    ray = api.run(
        RECIPE,
        input=urls,
        output=tmp_path / "ray",
        overrides=[*same, "ray.num_cpus=2", "ray.cpus_per_actor=1"],
        runner="ray",
        progress=False,
    )
    assert local["ok"] and ray["ok"]
    for shard in ("00000", "00001"):
        for sub in ("embeddings/img_emb/{}.npy", "embeddings/text_emb/{}.npy", "embeddings/metadata/{}.parquet"):
            path = sub.format(shard)
            assert (tmp_path / "local" / path).read_bytes() == (tmp_path / "ray" / path).read_bytes(), path
        assert (tmp_path / "local" / "laion" / f"{shard}.parquet").read_bytes() == (
            tmp_path / "ray" / "laion" / f"{shard}.parquet"
        ).read_bytes()


def test_embeddings_on_an_object_store_and_dedup_reading_them_there(s3, tmp_path):
    """An s3:// output (a moto server): the embeddings files are the local run's bytes, written
    before the marker; `capfilt dedup` reads them there and derives a run with them."""
    from s3server import BUCKET

    from capfilt.dedup import dedup, find_duplicates, plan

    examples = make_split("web", 8, seed=8, image_size=64)
    urls = write_shards(tmp_path / "in", examples, per_shard=4)
    url = f"s3://{BUCKET}/emb/out"
    assert api.run(RECIPE, input=urls, output=tmp_path / "local", progress=False)["ok"]
    assert api.run(RECIPE, input=urls, output=url, progress=False)["ok"]
    for shard in ("00000", "00001"):
        for sub in ("embeddings/img_emb/{}.npy", "embeddings/text_emb/{}.npy", "embeddings/metadata/{}.parquet"):
            path = sub.format(shard)
            assert s3.cat_file(f"{BUCKET}/emb/out/{path}") == (tmp_path / "local" / path).read_bytes(), path
    assert find_duplicates(plan(url), 0.999) == find_duplicates(plan(tmp_path / "local"), 0.999)
    result = dedup(url, output=str(tmp_path / "deduped"), threshold=0.999)
    assert result["summary"]["input"] == 8 and result["summary"]["rejected"] >= result["duplicates"]
    np.testing.assert_array_equal(
        np.load(tmp_path / "deduped" / "embeddings" / "img_emb" / "00001.npy"),
        np.load(tmp_path / "local" / "embeddings" / "img_emb" / "00001.npy"),
    )


def test_a_shard_whose_embeddings_cannot_be_written_has_no_marker_and_is_redone(tmp_path, monkeypatch):
    from capfilt.io import shard_writer

    examples = make_split("web", 4, seed=9, image_size=64)
    urls = write_shards(tmp_path / "in", examples, per_shard=4)
    real = shard_writer._Staging.write

    def broken(self, rel, data):
        real(self, rel, data)
        if rel.startswith("embeddings/"):
            raise OSError("disk full")  # after the file: the commit must still withhold the marker

    monkeypatch.setattr(shard_writer._Staging, "write", broken)
    out = tmp_path / "out"
    summary = api.run(RECIPE, input=urls, output=out, progress=False)
    assert not summary["ok"] and not (out / "_done" / "00000.done").exists()
    assert not list((out / "embeddings").rglob("00000*"))  # neither final nor temporary files stay
    monkeypatch.setattr(shard_writer._Staging, "write", real)
    assert api.run(RECIPE, input=urls, output=out, progress=False)["ok"]
    assert np.load(out / "embeddings" / "img_emb" / "00000.npy").shape == (4, 32)
