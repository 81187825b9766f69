"""Metrics against hand-computed values (worked out in each docstring). BLEU and CIDEr are
pycocoevalcap's own scorers: these pin down what they compute (and that capfilt hands them its
inputs in order), so a toolkit release that changed the numbers would fail here."""

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
    """ "the cat" against one 6-word reference: p1 = p2 = 1, BP = exp(1 - 6/2) = e^-2.
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


def test_cider_d_clips_repeated_ngrams():
    """CIDEr-D, not plain CIDEr: a hypothesis n-gram weighs at most what it weighs in the reference.
    Images "a b" and "c d" (every n-gram df 1, idf log 2 = L). "a a" against "a b": unigram vectors
    (a: 2L) and (a: L, b: L), the clipped dot product min(2L, L) * L = L^2 over norms 2L * sqrt(2) L,
    so cosine 1 / (2 sqrt 2) (plain CIDEr: 1 / sqrt 2); bigram "a a" is not in the reference: 0; no
    3- or 4-grams; equal lengths. CIDEr-D = 10 * (1 / (2 sqrt 2)) / 4."""
    _, per = cider_d([["a b"], ["c d"]], ["a a", "c d"])
    assert per == pytest.approx([10 / (8 * math.sqrt(2)), 5.0], abs=1e-12)


def test_scores_follow_their_hypotheses():
    """Per-hypothesis CIDEr-D is in input order: shuffling the pairs shuffles the scores alike, and
    the corpus scores (document frequencies, BLEU's pooled counts) do not change."""
    rng = random.Random(0)
    words = "a the red blue circle square on left right top of picture two three small large".split()
    refs = [[" ".join(rng.choices(words, k=rng.randint(1, 9))) for _ in range(rng.randint(1, 5))] for _ in range(12)]
    hyps = [" ".join(rng.choices(words, k=rng.randint(1, 9))) for _ in range(12)]
    score, per = cider_d(refs, hyps)
    assert len(set(per)) > 6  # scores that tell the hypotheses apart
    order = list(range(12))
    rng.shuffle(order)
    shuffled_score, shuffled = cider_d([refs[i] for i in order], [hyps[i] for i in order])
    assert shuffled == pytest.approx([per[i] for i in order], abs=1e-12)
    assert shuffled_score == pytest.approx(score, abs=1e-12) and score == pytest.approx(sum(per) / 12, abs=1e-12)
    assert bleu([refs[i] for i in order], [hyps[i] for i in order]) == pytest.approx(bleu(refs, hyps), abs=1e-12)


def test_bad_inputs_are_refused_clearly():
    for refs, hyps in (([["a"]], ["a", "b"]), ([], []), ([[]], ["a"]), ([[""], [" "]], ["a", "b"])):
        for metric in (bleu, cider_d):
            with pytest.raises(ValueError, match="reference"):
                metric(refs, hyps)


def test_recall_at_k_and_auc():
    """Row 0 ranks its positive first; row 1 its best positive (column 2) third; row 2 its positive last."""
    scores = np.array([[0.9, 0.1, 0.2, 0.0], [0.5, 0.1, 0.4, 0.9], [0.9, 0.8, 0.7, 0.1]])
    r = recall_at_k(scores, [{0}, {1, 2}, {3}], ks=(1, 2, 4))
    assert r == {1: pytest.approx(100 / 3), 2: pytest.approx(100 / 3), 4: pytest.approx(100.0)}
    assert roc_auc(np.array([3.0, 2.0]), np.array([1.0, 0.0])) == 1.0
    assert roc_auc(np.array([1.0]), np.array([1.0])) == 0.5
    assert roc_auc(np.array([2.0, 0.0]), np.array([1.0])) == 0.5
