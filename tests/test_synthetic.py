"""The synthetic shapes world: determinism, exact noise, the ground-truth judge, shards and COCO."""

import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from capfilt import synthetic as syn
from capfilt.records import Reason
from capfilt.synthetic.broken import image_cases


@pytest.fixture(scope="module")
def noisy():
    """Every example has a wrong text, spread equally over the four noise types."""
    return syn.make_split("noisy", 400, seed=11, noise_share=1.0, image_size=32)


def _scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    return [syn.random_scene(rng) for _ in range(n)]


def test_same_seed_gives_identical_examples():
    a = syn.make_split("train", 30, seed=5, noise_share=0.4)
    b = syn.make_split("train", 30, seed=5, noise_share=0.4)
    assert [(e.key, e.image, e.text, e.truth, e.noise, e.swapped, e.scene) for e in a] == [
        (e.key, e.image, e.text, e.truth, e.noise, e.swapped, e.scene) for e in b
    ]
    assert a[0].key == "train-000000" and a[-1].key == "train-000029"
    other_seed = syn.make_split("train", 30, seed=6, noise_share=0.4)
    other_name = syn.make_split("val", 30, seed=5, noise_share=0.4)
    assert [e.image for e in other_seed] != [e.image for e in a]
    assert [e.image for e in other_name] != [e.image for e in a]


def test_render_is_deterministic_and_sized():
    scene = _scenes(1)[0]
    assert syn.jpeg_bytes(syn.render(scene)) == syn.jpeg_bytes(syn.render(scene))
    assert syn.render(scene).size == (96, 96)
    image = syn.render(scene, 64)
    assert image.size == (64, 64) and image.mode == "RGB"


@pytest.mark.parametrize("n,share", [(100, 0.3), (37, 0.5), (10, 0.25), (7, 1.0), (5, 0.0), (0, 0.5)])
def test_noise_share_is_exact(n, share):
    examples = syn.make_split("s", n, seed=1, noise_share=share, image_size=16)
    counts = Counter(e.noise for e in examples)
    assert n - counts[syn.CLEAN] == round(n * share)
    per_type = [counts[t] for t in syn.NOISE_TYPES]
    assert max(per_type) - min(per_type) <= 1  # the default mix is equal
    for e in examples:
        assert (e.text == e.truth) == (e.noise == syn.CLEAN)
        assert (e.swapped is not None) == (e.noise == "attribute_swap")


def test_noise_mix_is_followed_and_checked():
    examples = syn.make_split(
        "m", 40, seed=2, noise_share=1.0, noise_mix={"junk": 3, "underspecified": 1}, image_size=16
    )
    assert Counter(e.noise for e in examples) == {"junk": 30, "underspecified": 10}
    with pytest.raises(ValueError, match="unknown noise types"):
        syn.make_split("m", 4, seed=0, noise_share=0.5, noise_mix={"typo": 1})
    with pytest.raises(ValueError, match="not all zero"):
        syn.make_split("m", 4, seed=0, noise_share=0.5, noise_mix={"junk": 0})
    with pytest.raises(ValueError, match="noise_share"):
        syn.make_split("m", 4, seed=0, noise_share=1.5)


def test_matches_accepts_every_phrasing():
    rng = np.random.default_rng(3)
    for scene in _scenes(300, seed=4):
        text = syn.describe(scene, rng)
        assert syn.matches(scene, text), text
        assert text in syn.phrasings(scene)
    for scene in _scenes(20, seed=5):  # exhaustively, for a few scenes
        for text in syn.phrasings(scene):
            assert syn.parse(text) == scene.attributes(), text
            assert syn.matches(scene, text.capitalize() + "."), text  # case and punctuation do not matter


def test_grammar_phrasings_are_varied():
    scene = syn.Scene("cross", "purple", "large", "right", 1, (60, 60, 60), 0)
    texts = syn.phrasings(scene)
    assert len(set(texts)) == len(texts) > 50
    for expected in (
        "a large purple cross on the right",
        "one big purple cross on the right side",
        "there is a large purple cross to the right",
        "on the right there is one big purple cross",
        "a picture of a large purple cross at the right",
        "an image showing a big purple cross on the right",
    ):
        assert expected in texts
    triple = syn.Scene("triangle", "green", "small", "center", 3, (60, 60, 60), 0)
    assert "there are three small green triangles in the center" in syn.phrasings(triple)


def test_parse_rejects_text_outside_the_grammar():
    for text in (
        "two small red circle on the left",
        "there is two small red circles on the left",
        "there are a small red circle on the left",
        "a red circle on the left",
        "a small red circle",
        "a small pink circle on the left",
        "a small red circle on the left and a star",
        "",
    ):
        assert syn.parse(text) is None, text


def test_matches_rejects_every_noise_type(noisy):
    assert {e.noise for e in noisy} == set(syn.NOISE_TYPES)
    for e in noisy:
        assert syn.matches(e.scene, e.truth)
        assert not syn.matches(e.scene, e.text), (e.noise, e.text)
        stated = syn.parse(e.text)
        if e.noise == "attribute_swap":
            truth = e.scene.attributes()
            assert [a for a in syn.ATTRIBUTES if stated[a] != truth[a]] == [e.swapped]
        elif e.noise == "other_image":
            assert stated is not None and stated != e.scene.attributes()
        else:
            assert stated is None
    assert {e.swapped for e in noisy if e.noise == "attribute_swap"} == set(syn.ATTRIBUTES)


def test_words_cover_every_token(noisy, root):
    assert syn.WORDS == sorted(set(syn.WORDS)) and all(w == w.lower() for w in syn.WORDS)
    texts = [t for e in noisy for t in (e.text, e.truth)]
    texts += [t for s in _scenes(30, seed=6) for t in syn.phrasings(s)] + list(syn.UNDERSPECIFIED)
    rng = np.random.default_rng(0)
    texts += [syn.junk_text(rng) for _ in range(200)]
    tokens = {tok for t in texts for tok in re.findall(r"[a-z]+|[0-9]", t.lower())}
    assert tokens <= set(syn.WORDS), tokens - set(syn.WORDS)
    vocab = root / "models" / "tokenizers" / "tiny-wordpiece" / "vocab.txt"
    if vocab.exists():  # the shipped tokenizer must not turn any word of this world into [UNK]
        assert set(syn.WORDS) <= set(vocab.read_text().split())


def test_shards_read_back_with_webdataset(tmp_path):
    examples = syn.make_split("web", 25, seed=7, noise_share=0.3, image_size=32)
    paths = syn.write_shards(tmp_path, examples, per_shard=10)
    assert [Path(p).name for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    by_key = {e.key: e for e in examples}
    seen = []
    for path in paths:
        for sample in wds.WebDataset(path, shardshuffle=False):
            e = by_key[sample["__key__"]]
            assert sample["jpg"] == e.image and sample["txt"].decode() == e.text
            meta = json.loads(sample["json"])
            assert meta["truth"] == e.truth and meta["noise"] == e.noise and meta["expected"] is None
            assert syn.Scene(**{**meta["scene"], "background": tuple(meta["scene"]["background"])}) == e.scene
            seen.append(sample["__key__"])
    assert seen == [e.key for e in examples]
    with tarfile.open(paths[0]) as tf:
        names = tf.getnames()
    assert names[:3] == [f"{examples[0].key}.{x}" for x in ("jpg", "json", "txt")]
    side = pq.read_table(tmp_path / "00001.parquet").to_pylist()
    assert [r["key"] for r in side] == [e.key for e in examples[10:20]]
    assert all(r["status"] == "success" and r["url"].endswith(f"/{r['key']}.jpg") for r in side)
    assert [r["caption"] for r in side] == [e.text for e in examples[10:20]]

    again = syn.write_shards(tmp_path / "again", examples, per_shard=10)
    assert [Path(p).read_bytes() for p in again] == [Path(p).read_bytes() for p in paths]
    assert not (tmp_path / "broken_manifest.json").exists()


def test_broken_shards_match_their_manifest(tmp_path):
    from capfilt.io.shards import image_member, read_shard, text_of

    cases = image_cases()
    summary = syn.main_synth(tmp_path, shards=3, per_shard=6, noise=0.5, broken=True, seed=1)
    manifest = json.loads((tmp_path / "broken_manifest.json").read_text())
    expected = Counter(e["expected"] for e in manifest)
    for reason in (
        Reason.WEB_TEXT_MISSING,
        Reason.WEB_TEXT_NOT_UTF8,
        Reason.WEB_TEXT_EMPTY,
        Reason.MISSING_IMAGE,
        Reason.DUPLICATE_KEY,
        Reason.TRUNCATED_TAR,
    ):
        assert expected[reason] == 1 + sum(c.reason == reason for c in cases), reason
    assert sum(e["what"].startswith("image case") for e in manifest) == len(cases)
    assert len(manifest) == len(cases) + 7  # + 3 texts, no image, duplicate pair, truncated
    assert {e["shard"] for e in manifest} == {"00000", "00001", "00002"}  # spread over the shards
    assert summary["samples"] == 18 + len(manifest)
    assert summary["broken"] == {r: n for r, n in expected.items() if r is not None}
    assert summary["noisy"] == {t: 9 // 4 + (i < 9 % 4) for i, t in enumerate(syn.NOISE_TYPES)}

    # The shard reader sees exactly what the manifest promises.
    samples = {}
    for shard in sorted(tmp_path.glob("*.tar")):
        for s in read_shard(str(shard)):
            samples[(s.shard, s.key, s.occurrence)] = s
    assert len(samples) == summary["samples"]
    for entry in manifest:
        s = samples[(entry["shard"], entry["key"], entry["occurrence"])]
        reason = entry["expected"]
        if reason in (Reason.DUPLICATE_KEY, Reason.TRUNCATED_TAR):
            assert s.failure == reason
        elif reason == Reason.MISSING_IMAGE:
            assert image_member(s) is None
        elif reason and reason.startswith("web_text"):
            assert text_of(s) == (None, reason)
        if reason != Reason.TRUNCATED_TAR:
            assert json.loads(s.members["json"])["expected"] == reason
    truncated = [e for e in manifest if e["expected"] == Reason.TRUNCATED_TAR]
    assert truncated[0]["shard"] == "00002"
    with pytest.raises(tarfile.ReadError):
        with tarfile.open(tmp_path / "00002.tar") as tf:
            tf.getmembers()
            for m in tf:
                tf.extractfile(m).read()

    # The two copies of the duplicated key sit in one shard with another sample between them.
    dup = next(e for e in manifest if e["expected"] == Reason.DUPLICATE_KEY)
    with tarfile.open(tmp_path / f"{dup['shard']}.tar") as tf:
        keys = [m.name.split(".", 1)[0] for m in tf.getmembers()]
    order = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    where = [i for i, k in enumerate(order) if k == dup["key"]]
    assert len(where) == 2 and where[1] - where[0] > 1


def test_write_coco_round_trip(tmp_path):
    examples = syn.make_split("coco", 12, seed=3, noise_share=0.5, image_size=48)
    path = syn.write_coco(tmp_path, examples, captions_per_image=3)
    coco = json.loads(Path(path).read_text())
    assert len(coco["images"]) == 12 and len(coco["annotations"]) == 36
    captions = {}
    for a in coco["annotations"]:
        captions.setdefault(a["image_id"], []).append(a["caption"])
    for image, e in zip(coco["images"], examples):
        with Image.open(Path(path).parent / image["file_name"]) as im:
            assert im.size == (48, 48) == (image["width"], image["height"])
        assert (Path(path).parent / image["file_name"]).read_bytes() == e.image
        got = captions[image["id"]]
        assert got[0] == e.truth and len(set(got)) == 3  # the true caption, never the noisy web text
        assert all(syn.matches(e.scene, c) for c in got)


def test_main_synth_without_broken_samples(tmp_path):
    summary = syn.main_synth(tmp_path, shards=2, per_shard=5, noise=0.3, seed=4)
    assert summary["shards"] == 2 and summary["samples"] == summary["examples"] == 10
    assert sum(summary["noisy"].values()) == 3 and summary["clean"] == 7
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert "broken" not in summary and not (tmp_path / "broken_manifest.json").exists()
    for path in sorted(tmp_path.glob("*.tar")):
        with tarfile.open(path) as tf:
            info = tf.getmembers()[0]
        # Written by the cleaned shards' tar writer (io.shard_writer.tar_members): the same fixed fields.
        assert (info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname) == (0, 0o644, 0, 0, "", "")
