"""Tests that kill three deliberate bugs the fast suite let through (issue 22, item 18).

Each test below names its mutant. Every mutant was applied by hand to a copy of the tree and this
file run against it: each mutant fails its test (the top-p boundary has two: the sorting warp
and the CPU nucleus search of `choose`), and the unmutated tree passes. The boundaries they break
were not exercised before: random logits never put the mass before a token exactly on top_p, and
the comparisons with transformers' repetition penalty ran top-k / top-p after it, which removed
every repeated token whose logit was negative (checked: those tests pass under the penalty
mutant).
"""

from __future__ import annotations

import torch
from transformers import RepetitionPenaltyLogitsProcessor

from capfilt.config import DecideConfig
from capfilt.modeling.decoding import RowRules
from capfilt.modeling.sampling import row_seeds
from capfilt.records import SYNTHETIC, WEB, Reason
from capfilt.stages.decide import decide_sample


def _row(**kw) -> dict:
    return {
        "top_p": 1.0,
        "top_k": 0,
        "temperature": 1.0,
        "repetition_penalty": 1.0,
        "min_new_tokens": 0,
        "max_new_tokens": 10,
        "force_eos_prob": None,
        **kw,
    }


def _rules(rows: list[dict], vocab: int) -> RowRules:
    return RowRules(rows, eos=vocab - 1, vocab_size=vocab, sample=True, device="cpu")


# --------------------------------------------------------------------------- decide: top-m


def test_top_m_keeps_exactly_m_synthetic_captions():
    """Mutant: ``sorted(passing, ...)[top_m + 1:]`` in `decide_sample` (keeps top_m + 1)."""
    itm = [0.91, 0.82, 0.73, 0.64, 0.55]  # every synthetic caption passes the thresholds
    cands = [{"source": WEB, "text": "web", "reason": "", "itm": 0.9, "itc": None, "clip": None}]
    cands += [
        {"source": SYNTHETIC, "text": f"caption {j}", "reason": "", "itm": s, "itc": None, "clip": None}
        for j, s in enumerate(itm)
    ]
    for m in range(1, len(itm)):
        policy = DecideConfig(top_m=m, web={"itm": 0.5}, synthetic={"itm": 0.5})
        d = decide_sample(cands, policy)
        kept = [j for j in range(1, len(cands)) if d["kept"][j]]
        assert kept == list(range(1, m + 1)), m  # the m best, in order
        assert d["reasons"][m + 1 :] == [Reason.NOT_TOP_M] * (len(itm) - m), m
        assert d["kept"][0]  # top_m limits synthetic captions only


# --------------------------------------------------------------------------- top-p boundary


def _boundary_case():
    """Four distinct logits, and top_p set to exactly the softmax mass of the likeliest token as
    the warp computes it (float32): the mass before the second token equals top_p. BLIP's and
    LAION's rule keeps a token when the mass before it is <= top_p, so the nucleus is the first
    two tokens; a ``>=`` boundary keeps only the first."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    top_p = float(torch.softmax(logits, dim=-1)[0, 0])
    return logits, top_p


def test_top_p_keeps_the_token_whose_preceding_mass_equals_top_p():
    """Mutant: ``drop[:, 1:] = mass[:, :-1] >= self.top_p`` in `RowRules._top_p`."""
    logits, top_p = _boundary_case()
    rules = _rules([_row(top_p=top_p)], vocab=4)
    warped = rules.warp(torch.zeros(1, 1, dtype=torch.long), logits.clone(), 0)
    assert torch.isfinite(warped[0]).tolist() == [True, True, False, False]


def test_choose_on_cpu_samples_the_boundary_token_too():
    """Mutant: ``outside = (probs * likelier).sum(dim=-1) >= top_p`` in `RowRules.choose` (the CPU
    path that finds the nucleus without sorting). Over 64 fixed seeds the second token (about 27%
    of the nucleus) is drawn; under the mutant it never is."""
    logits, top_p = _boundary_case()
    rows = 64
    rules = _rules([_row(top_p=top_p)] * rows, vocab=4)
    seeds = row_seeds(list(range(rows)), 1, "cpu")
    picks = rules.choose(torch.zeros(rows, 1, dtype=torch.long), logits.expand(rows, -1).clone(), 0, seeds)
    assert set(picks.tolist()) == {0, 1}


# --------------------------------------------------------------------------- repetition penalty


def test_repetition_penalty_pushes_negative_logits_down_as_transformers_does():
    """Mutant: ``torch.where(picked < 0, picked / self.penalty, picked / self.penalty)`` in
    `RowRules._before_top_p` (a negative logit divided: made likelier). With no other warp after
    it, every repeated token's logit is compared with transformers' processor."""
    logits = torch.tensor([[2.0, -1.5, 0.5, -3.0, 1.0, -0.25]])
    ids = torch.tensor([[0, 1, 3, 5]])  # repeated: one positive logit, three negative
    for penalty in (1.3, 2.0, 0.8):
        ours = _rules([_row(repetition_penalty=penalty)], vocab=6).warp(ids, logits.clone(), 0)
        ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        assert torch.allclose(ours, ref), penalty
        assert (ours[0, [1, 3, 5]] < logits[0, [1, 3, 5]]).all() == (penalty > 1), penalty
