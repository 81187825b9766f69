"""Metric code against hand-computed values (worked out in each docstring), and against
pycocoevalcap itself where it is installed (its BLEU and CIDEr scorers need no Java)."""

import math
import random

import numpy as np
import pytest

from capfilt.metrics import bleu, cider_d, recall_at_k, roc_auc, tokenize


def test_bleu_worked_example():
    """hyp "the cat sat on the mat", ref "the cat is on the mat" (both 6 words, so no brevity penalty):
    unigrams 5/6 match (the x2, cat, on, mat), bigrams 3/5 (the cat, on the, the mat), trigrams 1/4
    (on the mat), 4-grams 0/3. BLEU-n is the geometric mean of p1..pn:
    BLEU-1 = 5/6, BLEU-2 = sqrt(5/6 * 3/5) = sqrt(1/2), BLEU-3 = (1/2 * 1/4)^(1/3) = 1/2,
    BLEU-4 ~ 0 (only the 1e-15 smoothing keeps it positive)."""
    b = bleu([["the cat is on the mat"]], ["the cat sat on the mat"])
    assert b[0] == pytest.approx(5 / 6, abs=1e-8)
    assert b[1] == pytest.approx(math.sqrt(0.5), abs=1e-8)
    assert b[2] == pytest.approx(0.5, abs=1e-8)
    assert 0 < b[3] < 1e-3


def test_bleu_brevity_penalty_and_closest_reference():
    """"the cat" against one 6-word reference: p1 = p2 = 1, BP = exp(1 - 6/2) = e^-2.
    Adding a 2-word reference makes the closest reference length 2: no penalty.
    Hypothesis of 4 words with references of 3 and 5 words: the tie goes to the shorter (3), so
    ratio 4/3 > 1 and no penalty; p1 = 1 (every word is in some reference)."""
    assert bleu([["the cat sat on the mat"]], ["the cat"])[1] == pytest.approx(math.exp(-2), abs=1e-8)
    assert bleu([["the cat sat on the mat", "a cat"]], ["the cat"])[1] == pytest.approx(1.0, abs=1e-8)
    assert bleu([["a b c", "a b c d e"]], ["a b c d"])[0] == pytest.approx(1.0, abs=1e-8)


def test_bleu_is_corpus_level():
    """Counts are pooled before the ratio: sentence 1 has 2/2 unigram matches, sentence 2 has 0/2,
    so corpus BLEU-1 = 2/4 = 0.5 (lengths equal their references: no penalty)."""
    assert bleu([["a b"], ["c d"]], ["a b", "x y"])[0] == pytest.approx(0.5, abs=1e-8)


def test_cider_d_worked_examples():
    """Two images whose references share no n-gram: every n-gram has df = 1, idf = log(2/1).
    A 4-word exact caption matches at n = 1..4 (cosine 1 each): 10 * mean(1,1,1,1) = 10.
    A 2-word exact caption has no 3- or 4-grams: 10 * mean(1,1,0,0) = 5.
    "a b" against reference "a b c d": n=1 cosine 2/(sqrt2*2) = 1/sqrt2, n=2 1/sqrt3, n=3,4 0;
    length (in bigrams, as the toolkit) 1 vs 3 -> penalty exp(-2^2 / (2*6^2)) = exp(-1/18)."""
    score, per = cider_d([["a b c d"], ["e f g h"]], ["a b c d", "e f g h"])
    assert per == pytest.approx([10.0, 10.0]) and score == pytest.approx(10.0)
    _, per = cider_d([["a b"], ["c d"]], ["a b", "c d"])
    assert per == pytest.approx([5.0, 5.0])
    _, per = cider_d([["a b c d"], ["e f g h"]], ["a b", "e f g h"])
    expected = 10 * math.exp(-1 / 18) * (1 / math.sqrt(2) + 1 / math.sqrt(3)) / 4
    assert per[0] == pytest.approx(expected, abs=1e-8)


def test_cider_d_ignores_ngrams_every_image_has():
    """An n-gram in the references of all N images has idf log(N/N) = 0: it earns nothing."""
    _, per = cider_d([["a x"], ["a y"]], ["a", "a"])
    assert per == [0.0, 0.0]


def test_tokenize_matches_the_toolkit_on_plain_captions():
    assert tokenize("A Red circle, on the LEFT.") == "a red circle on the left"
    assert tokenize("  two   blue-ish squares!") == "two blue ish squares"


def test_against_pycocoevalcap_when_installed():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    rng = random.Random(0)
    words = "a the red blue circle square on left right top of picture two three small large".split()
    for _ in range(5):
        n = rng.randint(2, 12)
        refs = [[" ".join(rng.choices(words, k=rng.randint(1, 9))) for _ in range(rng.randint(1, 5))] for _ in range(n)]
        hyps = [" ".join(rng.choices(words, k=rng.randint(1, 9))) for _ in range(n)]
        gts, res = dict(enumerate(refs)), {i: [h] for i, h in enumerate(hyps)}
        oracle_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        oracle_cider, oracle_per = Cider().compute_score(gts, res)
        assert bleu(refs, hyps) == pytest.approx(oracle_bleu, abs=1e-12)
        score, per = cider_d(refs, hyps)
        assert score == pytest.approx(oracle_cider, abs=1e-12)
        assert per == pytest.approx(list(oracle_per), abs=1e-12)


def test_recall_at_k_and_auc():
    """Row 0 ranks its positive first; row 1 its best positive (column 2) third; row 2 its positive last."""
    scores = np.array([[0.9, 0.1, 0.2, 0.0],
                       [0.5, 0.1, 0.4, 0.9],
                       [0.9, 0.8, 0.7, 0.1]])
    r = recall_at_k(scores, [{0}, {1, 2}, {3}], ks=(1, 2, 4))
    assert r == {1: pytest.approx(100 / 3), 2: pytest.approx(100 / 3), 4: pytest.approx(100.0)}
    assert roc_auc(np.array([3.0, 2.0]), np.array([1.0, 0.0])) == 1.0
    assert roc_auc(np.array([1.0]), np.array([1.0])) == 0.5
    assert roc_auc(np.array([2.0, 0.0]), np.array([1.0])) == 0.5
