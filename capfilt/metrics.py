"""Captioning and retrieval metrics, computed as the COCO caption toolkit (pycocoevalcap) does.

- `bleu`: corpus BLEU-1..4 with pycocoevalcap's choices: n-gram counts clipped by the maximum
  count in any one reference, the *closest* reference length per sentence (ties: the shorter),
  one corpus-level brevity penalty, and its smoothing constants (1e-15 / 1e-9).
- `cider_d`: pycocoevalcap's "CIDEr" (which is CIDEr-D): tf-idf n-gram vectors (n = 1..4) with
  document frequencies over the reference sets, hypothesis weights clipped by the reference's,
  a Gaussian length penalty (sigma 6), averaged over references and n, times 10. Its quirk of
  measuring length in bigrams is kept, so numbers match the toolkit's.
- `tokenize`: a pure-Python stand-in for the toolkit's Java PTB tokenizer (lower case, punctuation
  removed) — exact for plain captions, which is what capfilt's captioners write.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

import numpy as np

_PUNCT = re.compile(r"[^\w\s]|_")


def tokenize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(references: list[list[str]], hypotheses: list[str], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of pre-tokenised strings; references[i] are the references of hypotheses[i]."""
    if len(references) != len(hypotheses) or not hypotheses:
        raise ValueError("need one non-empty reference list per hypothesis")
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for refs, hyp in zip(references, hypotheses):
        words = hyp.split()
        counts = _ngrams(words, n)
        max_ref: Counter = Counter()
        for ref in refs:
            for gram, c in _ngrams(ref.split(), n).items():
                max_ref[gram] = max(max_ref[gram], c)
        lengths = [len(r.split()) for r in refs]
        ref_len += min((abs(length - len(words)), length) for length in lengths)[1]
        test_len += len(words)
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for gram, c in counts.items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), c)
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def cider_d(references: list[list[str]], hypotheses: list[str], n: int = 4, sigma: float = 6.0) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-hypothesis scores) of pre-tokenised strings."""
    if len(references) != len(hypotheses) or not hypotheses:
        raise ValueError("need one non-empty reference list per hypothesis")
    ref_counts = [[_ngrams(r.split(), n) for r in refs] for refs in references]
    df: Counter = Counter()
    for refs in ref_counts:
        df.update({gram for counts in refs for gram in counts})
    log_n = np.log(float(len(references)))

    def vector(counts: Counter):
        vec = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = float(tf) * (log_n - np.log(max(1.0, df[gram])))
            norm[k] += vec[k][gram] ** 2
            if k == 1:  # the toolkit counts bigrams as "length"
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for hyp, refs in zip(hypotheses, ref_counts):
        vh, nh, lh = vector(_ngrams(hyp.split(), n))
        total = np.zeros(n)
        for counts in refs:
            vr, nr, lr = vector(counts)
            penalty = math.e ** (-((lh - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = sum(min(w, vr[k][g]) * vr[k][g] for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * penalty
        scores.append(float(np.mean(total) / len(refs) * 10.0))
    return float(np.mean(scores)), scores


def recall_at_k(scores: np.ndarray, positives: list[set[int]], ks=(1, 5, 10)) -> dict[int, float]:
    """Share of queries (rows) whose best-ranked positive column is within the top k, in percent."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.array([min(int(np.where(order[i] == j)[0][0]) for j in pos) for i, pos in enumerate(positives)])
    return {k: 100.0 * float(np.mean(ranks < k)) for k in ks}


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a random positive > that of a random negative), ties counted half."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if not len(pos) or not len(neg):
        raise ValueError("AUC needs positives and negatives")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="stable")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks over ties
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
