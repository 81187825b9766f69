"""The synthetic world's dense captions: claims the splitter finds again, exactly one wrong claim in
a caption labelled so (an attribute, the count or the position changed), none in the others; and
the numbers `make demo-dense` prints, computed right from scores whose answer is known."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from capfilt.claims import split_claims
from capfilt.claims_demo import _caught_at, _trim
from capfilt.synthetic import matches, parse
from capfilt.synthetic.dense import DENSE_ERRORS, TRUTH_FILE, WRONG_NOISE, make_dense_split, write_dense


@pytest.fixture(scope="module")
def split():
    return make_dense_split("dense", 120, seed=4, image_size=32)


def test_a_caption_labelled_wrong_has_exactly_one_wrong_claim(split):
    assert sum(ex.wrong is not None for ex in split) == 60  # wrong_share 0.5, exactly
    assert Counter(ex.error for ex in split if ex.wrong is not None) == dict.fromkeys(DENSE_ERRORS, 20)
    for ex in split:
        claims = split_claims(ex.text)
        assert [c.lower() for c in claims] == [c.lower() for c in ex.claims]  # the splitter finds them
        assert 3 <= len(claims) <= 4
        right = [matches(ex.scene, c) for c in claims]
        if ex.wrong is None:
            assert all(right) and ex.error is None and ex.swapped is None
            continue
        assert right.count(False) == 1 and right.index(False) == ex.wrong
        said, truth = parse(claims[ex.wrong]), ex.scene.attributes()
        changed = [a for a in truth if said[a] != truth[a]]
        assert changed == [ex.swapped]  # one thing changed, the labelled one
        assert (ex.swapped in ("colour", "shape", "size")) == (ex.error == "attribute")
        assert ex.error == "attribute" or ex.swapped == ex.error


def test_dense_captions_are_paragraphs_with_sentences_and_clauses(split):
    texts = [ex.text for ex in split]
    assert all(t[0].isupper() and t.endswith(".") for t in texts)
    assert any(", and " in t for t in texts) and any("; " in t for t in texts)  # clause joints occur
    assert all(ex.wrong is None or ex.wrong in range(len(ex.claims)) for ex in split)
    assert {ex.wrong for ex in split if ex.wrong is not None} >= {0, 1, 2, 3}  # anywhere in the caption


def test_the_same_seed_gives_the_same_captions_and_another_does_not(split):
    again = make_dense_split("dense", 120, seed=4, image_size=32)
    assert [(e.text, e.image) for e in again] == [(e.text, e.image) for e in split]
    other = make_dense_split("dense", 120, seed=5, image_size=32)
    assert [e.text for e in other] != [e.text for e in split]


def test_written_shards_carry_the_truth(tmp_path, split):
    from capfilt.io.shards import read_shard

    paths = write_dense(tmp_path, split[:10], per_shard=5)
    truth = json.loads((tmp_path / TRUTH_FILE).read_text())
    assert len(paths) == 2 and set(truth) == {ex.key for ex in split[:10]}
    for s in read_shard(paths[0]):
        ex = next(e for e in split if e.key == s.key)
        meta = json.loads(s.members["json"])
        assert s.members["txt"].decode() == ex.text
        assert meta["noise"] == ("none" if ex.wrong is None else WRONG_NOISE)
        assert truth[s.key] == {"claims": ex.claims, "wrong": ex.wrong, "error": ex.error, "swapped": ex.swapped}


def test_the_demo_compares_at_the_same_share_of_right_captions_kept():
    right = np.linspace(0.5, 1.0, 100)
    wrong = np.array([0.1, 0.2, 0.52, 0.9])
    threshold, kept, caught = _caught_at(right, wrong, 0.95)
    assert kept == pytest.approx(0.95, abs=0.01) and threshold == pytest.approx(right[5], abs=1e-9)
    assert caught == 0.75  # three of the four wrong ones score below the 5th-percentile right one


def test_trim_counts_wrong_captions_cut_to_right_ones():
    truth = {
        "a": {"claims": ["x is red", "y is blue", "z is big"], "wrong": 1},
        "b": {"claims": ["x is red", "y is blue"], "wrong": 0},
        "c": {"claims": ["x is red", "y is blue"], "wrong": None},
        "d": {"claims": ["p is on", "q is off"], "wrong": 1},
    }
    rows = [
        {"key": "a", "claims": truth["a"]["claims"], "claim_scores": [0.9, 0.1, 0.8]},  # wrong claim cut
        {"key": "b", "claims": truth["b"]["claims"], "claim_scores": [0.9, 0.2]},  # the right one cut
        {"key": "c", "claims": truth["c"]["claims"], "claim_scores": [0.9, 0.2]},  # a right caption cut
        {"key": "d", "claims": truth["d"]["claims"], "claim_scores": [0.1, 0.2]},  # nothing left
    ]
    got = _trim(rows, truth, 0.5)
    assert got == {"recovered": 1 / 3, "still_wrong": 1 / 3, "emptied": 1 / 3, "right_cut": 1.0}
