"""Captioning and retrieval metrics.

- `bleu` and `cider_d`: the COCO caption toolkit's own scorers (pycocoevalcap's `Bleu` and `Cider`,
  which need no Java), so the numbers are the toolkit's, as BLIP reports them. Its "CIDEr" is
  CIDEr-D: tf-idf n-gram vectors (n = 1..4) with document frequencies over the reference sets,
  hypothesis weights clipped by the reference's, a Gaussian length penalty (sigma 6), averaged over
  references and n, times 10. Its BLEU is corpus BLEU-1..4 with the closest reference length.
- `tokenize`: a pure-Python stand-in for the toolkit's Java PTB tokenizer (lower case, punctuation
  removed) — exact for plain captions, which is what capfilt's captioners write.
"""

from __future__ import annotations

import re

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

_PUNCT = re.compile(r"[^\w\s]|_")


def tokenize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _toolkit_input(references: list[list[str]], hypotheses: list[str]) -> tuple[dict, dict]:
    """The toolkit's (gts, res): references and hypothesis per image id, in the given order."""
    if len(references) != len(hypotheses) or not hypotheses or not all(references):
        raise ValueError("need one non-empty reference list per hypothesis")
    if not any(ref.split() for refs in references for ref in refs):
        raise ValueError("the references hold no words: there is nothing to score the captions against")
    return dict(enumerate(references)), {i: [h] for i, h in enumerate(hypotheses)}


def bleu(references: list[list[str]], hypotheses: list[str], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of pre-tokenised strings; references[i] are the references of hypotheses[i]."""
    scores, _ = Bleu(n).compute_score(*_toolkit_input(references, hypotheses), verbose=0)
    return [float(s) for s in scores]


def cider_d(
    references: list[list[str]], hypotheses: list[str], n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-hypothesis scores) of pre-tokenised strings."""
    score, scores = Cider(n=n, sigma=sigma).compute_score(*_toolkit_input(references, hypotheses))
    return float(score), [float(s) for s in scores]


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
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
