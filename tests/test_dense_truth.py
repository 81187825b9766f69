"""The synthetic world's dense captions: claims the splitter finds again, exactly one wrong claim in
a caption labelled so (an attribute, the count or the position changed), none in the others; and
the numbers `make demo-dense` prints, computed right from scores whose answer is known."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from capfilt.claims import split_claims
from capfilt.claims_demo import evaluate
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


def test_the_demo_compares_at_the_same_share_of_right_captions_kept_and_counts_trims(tmp_path):
    """`make demo-dense`'s numbers (claims_demo.evaluate) from a ledger whose answer is known: both
    filters cut where they keep the same share of right captions, and the claim-level trim counts
    wrong captions cut to right claims only, still wrong, emptied, and right captions cut."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    right = np.linspace(0.5, 1.0, 100)  # whole-caption and weakest-claim score of each right caption
    rows = [
        {"key": f"r{i}", "itm": v, "claims": ["x is red", "y is blue"], "claim_scores": [1.0, v]}
        for i, v in enumerate(right)
    ]
    truth = {r["key"]: {"claims": r["claims"], "wrong": None, "error": None} for r in rows}
    wrong = [  # key, whole score, claims, claim scores, index of the wrong claim, error
        ("a", 0.1, ["x is red", "y is blue", "z is big"], [0.9, 0.1, 0.8], 1, "attribute"),  # wrong claim cut
        ("b", 0.2, ["x is red", "y is blue"], [0.9, 0.2], 0, "count"),  # the right one cut: still wrong
        ("d", 0.52, ["p is on", "q is off"], [0.1, 0.2], 1, "position"),  # nothing left
        ("e", 0.9, ["s is up", "t is down"], [0.95, 0.99], 0, "attribute"),  # both kept: still wrong
    ]
    for key, whole, claims, scores, at, error in wrong:
        rows.append({"key": key, "itm": whole, "claims": claims, "claim_scores": scores})
        truth[key] = {"claims": claims, "wrong": at, "error": error}
    (tmp_path / "run" / "ledger").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{**r, "candidate": 0} for r in rows]), tmp_path / "run/ledger/0.parquet")
    (tmp_path / "truth.json").write_text(json.dumps(truth))

    result = evaluate(tmp_path / "run", tmp_path / "truth.json", "itm", max_tokens=35)
    assert (result["captions"], result["wrong"]) == (104, 4)
    at95 = result["rates"][0]
    assert at95["keep"] == 0.95
    # Five right captions fall below the 6th-lowest right score: 95% kept, by either filter.
    assert at95["whole"] == {"threshold": right[5], "right_kept": 0.95, "caught": 0.75}  # 0.1, 0.2, 0.52
    assert at95["claims"] == {"threshold": right[5], "right_kept": 0.95, "caught": 0.75}  # a, b, d
    assert at95["by_error"] == {"attribute": (0.5, 0.5, 2), "count": (1.0, 1.0, 1), "position": (1.0, 1.0, 1)}
    assert at95["trim"] == {"recovered": 1 / 4, "still_wrong": 2 / 4, "emptied": 1 / 4, "right_cut": 0.05}
    assert result["rates"][1]["whole"]["threshold"] == right[10]  # 90% kept
