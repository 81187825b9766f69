"""Decoding parameters, per sample and per row: what the captioner's batched decode loop applies.

`Decoding` is what one captioner run decodes with: K samples per image, the nucleus / top-k /
temperature / repetition-penalty / length settings, and optionally a **schedule** that gives
groups of the K samples their own settings (LAION-COCO decodes 40 samples per image in five
groups of 8 with maximum lengths 20/30/30/45/45). A group's unset field takes the top-level value.

`RowRules` holds those settings as device tensors, one entry per row of a decode batch (row =
image x sample), so one batched decode applies each row's own top-p, top-k, min/max length,
penalty and forced-EOS threshold; finished rows leave the batch with their parameters
(`keep`). The warps are the classic ones, written per row:

- repetition penalty: a logit of a token already in the row (prompt included) is divided by the
  penalty when positive, multiplied when negative (CTRL; transformers'
  `RepetitionPenaltyLogitsProcessor`, LAION's `repetition_penalty_apply`);
- minimum length: end-of-sequence is impossible while fewer than ``min_new_tokens`` were written;
- temperature, then top-k (keep logits >= the k-th largest), then top-p over the descending sort:
  a token is kept when the probability mass before it is <= top_p, the first always (BLIP's and
  LAION's `top_k_top_p_filtering`; transformers' `TopPLogitsWarper` computes the same set from the
  ascending side). Both are skipped for greedy rows (they never change the argmax);
- forced end of sequence (LAION-COCO, ``force_eos_prob``): the row ends at a step where the
  model's *unfiltered* end-of-sequence probability -- the softmax of the raw logits, before the
  minimum length, the penalty and top-k/top-p -- exceeds the threshold; it is checked at every
  step, also before ``min_new_tokens`` is reached, and the token drawn at that step is dropped
  (the row emits end-of-sequence instead). Transcribed from LAION's production sampler
  (andreaskoepf/laion_idle_cap, docker/sampling.py, `generate`, lines 167-193).

Every warp is a function of the row's own logits, tokens and parameters, so a row decodes the same
whatever else is in its batch.
"""

from __future__ import annotations

import copy
import math

import torch

from capfilt.config.decoding import PER_SAMPLE, DecodingConfig, DecodingGroup
from capfilt.modeling.sampling import gumbel_noise

__all__ = ["PER_SAMPLE", "Decoding", "Group", "RowRules"]  # PER_SAMPLE: declared with the settings (config)

Group = DecodingGroup  # ``n`` of an image's samples with their own settings (unset: the Decoding's)


class Decoding(DecodingConfig):
    """What one captioner run decodes with: the captioner section's decoding settings, declared and
    checked once in capfilt.config.decoding (``Decoding(**fields)`` validates as the recipe does)."""

    def replace(self, **changes) -> Decoding:
        """This decoding with ``changes``, checked again (a frozen model: ``dataclasses.replace``'s role)."""
        return type(self)(**{**self.model_dump(), **changes})

    @property
    def samples(self) -> int:
        """Rows decoded per image: K when sampling, 1 when greedy."""
        return self.num_captions if self.sample else 1

    def per_sample(self) -> list[dict]:
        """The settings of each of an image's samples, in sample order (PER_SAMPLE keys)."""
        base = {name: getattr(self, name) for name in PER_SAMPLE}
        if not self.schedule:
            return [dict(base) for _ in range(self.samples)]
        out = []
        for group in self.schedule:
            own = {k: v for k, v in group.model_dump().items() if k != "n" and v is not None}
            out += [{**base, **own} for _ in range(group.n)]
        return out

    @property
    def max_steps(self) -> int:
        """Decode steps needed: the longest maximum length of any sample."""
        return max(s["max_new_tokens"] for s in self.per_sample())


def _column(values: list, dtype, device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device)


class RowRules:
    """Per-row decoding parameters of one decode batch, and the warps that apply them.

    Built on the host from plain lists, so making one never syncs the device; which warps run at
    all is decided from those lists (a penalty of 1.0 everywhere costs nothing). ``processors``:
    transformers logits processors applied first, uniformly (the load-time self-check passes an
    empty list)."""

    def __init__(self, per_row: list[dict], *, eos: int, vocab_size: int, sample: bool, device, processors=None):
        self.eos, self.processors = eos, processors
        col = {k: [r[k] for r in per_row] for k in PER_SAMPLE}
        self.min_steps = max(col["min_new_tokens"], default=0)  # steps at which some row may not end
        self.use_penalty = any(p != 1.0 for p in col["repetition_penalty"])
        self.use_temperature = sample and any(t != 1.0 for t in col["temperature"])
        self.use_top_k = sample and any(0 < k < vocab_size for k in col["top_k"])
        self.uniform_k = len(set(col["top_k"])) == 1
        self.use_top_p = sample and any(p < 1.0 for p in col["top_p"])
        self.use_force = any(p is not None and p < 1.0 for p in col["force_eos_prob"])
        self.use_max = len(set(col["max_new_tokens"])) > 1
        f32, i64 = torch.float32, torch.long
        self.penalty = _column(col["repetition_penalty"], f32, device)[:, None]
        self.temperature = _column(col["temperature"], f32, device)[:, None]
        # top-k: index of the k-th largest logit (0 or >= vocab: the smallest, which removes nothing)
        kth = [min(k, vocab_size) - 1 if k > 0 else vocab_size - 1 for k in col["top_k"]]
        self.kth = _column(kth, i64, device)[:, None]
        self.top_k = col["top_k"][0] if self.uniform_k and per_row else 0
        self.top_p = _column([p if p < 1.0 else math.inf for p in col["top_p"]], f32, device)[:, None]
        self.min_new = _column(col["min_new_tokens"], i64, device)
        self.max_new = _column(col["max_new_tokens"], i64, device)
        self.force = _column([p if p is not None else 2.0 for p in col["force_eos_prob"]], f32, device)

    @classmethod
    def for_decoding(cls, decoding: Decoding, images: int, **kw) -> RowRules:
        """Rules for ``images`` images x their samples, rows key-major (as `row_seeds` orders them)."""
        return cls(decoding.per_sample() * images, **kw)

    @classmethod
    def plain(cls, rows: int, steps: int, **kw) -> RowRules:
        """No warps, no minimum, ``steps`` tokens per row (plus any ``processors`` given)."""
        row = {
            "top_p": 1.0,
            "top_k": 0,
            "temperature": 1.0,
            "repetition_penalty": 1.0,
            "min_new_tokens": 0,
            "max_new_tokens": steps,
            "force_eos_prob": None,
        }
        return cls([row] * rows, **kw)

    def keep(self, index: torch.Tensor) -> RowRules:
        """The rules of the rows at ``index`` (finished rows leave the batch)."""
        out = copy.copy(self)
        for name in ("penalty", "temperature", "kth", "top_p", "min_new", "max_new", "force"):
            setattr(out, name, getattr(self, name).index_select(0, index))
        return out

    def forced_eos(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Rows whose unfiltered end-of-sequence probability exceeds their threshold (None: no row
        has one). ``logits`` are the model's raw next-token logits, before any warp."""
        if not self.use_force:
            return None
        return torch.softmax(logits, dim=-1)[:, self.eos] > self.force

    def _kth(self, scores: torch.Tensor) -> torch.Tensor:
        """Each row's k-th largest score (its top-k keeps scores >= it)."""
        if self.uniform_k:  # the k-th largest is the smallest of the top k: no sort needed
            return torch.topk(scores, min(self.top_k, scores.shape[1]), dim=-1, sorted=False).values.amin(-1, True)
        return scores.sort(dim=-1, descending=True).values.gather(1, self.kth)

    def _before_top_p(self, ids: torch.Tensor, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Every warp but top-p: processors, penalty, minimum length, temperature, top-k."""
        scores = logits
        if self.processors:
            scores = self.processors(ids, scores)
        # The first warp that changes the scores copies them (``logits`` stay the caller's); the
        # later ones write into that copy: one (rows x vocab) tensor per step instead of one each.
        if self.use_penalty:
            picked = scores.gather(1, ids)
            picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
            scores = scores.scatter_(1, ids, picked) if scores is not logits else scores.scatter(1, ids, picked)
        if step < self.min_steps:
            eos = scores[:, self.eos].masked_fill(step < self.min_new, -math.inf)
            scores = scores.clone() if scores is logits else scores
            scores[:, self.eos] = eos
        if self.use_temperature:
            scores = scores.div_(self.temperature) if scores is not logits else scores / self.temperature
        if self.use_top_k:
            drop = scores < self._kth(scores)
            scores = (
                scores.masked_fill_(drop, -math.inf) if scores is not logits else scores.masked_fill(drop, -math.inf)
            )
        return scores

    def _top_p(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-p by sorting: a token is dropped when the mass before it is above top_p."""
        ordered, order = scores.sort(dim=-1, descending=True)
        mass = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = torch.zeros_like(mass, dtype=torch.bool)
        drop[:, 1:] = mass[:, :-1] > self.top_p  # the mass before a token is above top_p
        return scores.masked_fill(drop.scatter(1, order, drop), -math.inf)

    def warp(self, ids: torch.Tensor, logits: torch.Tensor, step: int) -> torch.Tensor:
        """The scores a row samples from (or takes the argmax of) at ``step`` (0 = first new token)."""
        scores = self._before_top_p(ids, logits, step)
        return self._top_p(scores) if self.use_top_p else scores

    def choose(self, ids: torch.Tensor, logits: torch.Tensor, step: int, seeds: torch.Tensor | None) -> torch.Tensor:
        """Each row's next token: the argmax of `warp` (``seeds`` None), else its Gumbel-max sample
        with the noise of (seed, step, token) -- the token `sample_tokens(warp(...))` picks.

        On a CPU the nucleus is found without sorting the vocabulary (a sort of 30k scores per row
        cost more than the decoder step): take the Gumbel-max candidate over the top-k set; it is
        the answer if it lies in the nucleus (the mass of strictly likelier tokens is <= top_p),
        and otherwise every token no likelier than it is outside the nucleus too, so those are
        removed and the next candidate is taken. Only rows still undecided are worked on; the
        same set as the sort up to float rounding of the mass and the order of tied scores."""
        scores = self._before_top_p(ids, logits, step)
        if seeds is None:
            return scores.argmax(dim=-1)
        if self.use_top_p and scores.device.type != "cpu":  # a GPU sorts fast and dislikes host syncs
            scores = self._top_p(scores)
        noisy = gumbel_noise(seeds, step, scores.shape[-1]).add_(scores)  # = scores + noise, in its buffer
        pick = noisy.argmax(dim=-1)
        if not self.use_top_p or scores.device.type != "cpu":
            return pick
        chosen, rows = pick.clone(), torch.arange(len(pick))
        scores, top_p = scores.float(), self.top_p[:, 0]
        probs = scores.softmax(dim=-1)
        while True:
            likelier = scores > scores.gather(1, pick[:, None])
            outside = (probs * likelier).sum(dim=-1) > top_p  # (torch.where with a 0.0 was 5x slower)
            if not bool(outside.any()):
                return chosen
            sub = outside.nonzero().flatten()
            rows, scores, probs, top_p = rows[sub], scores[sub], probs[sub], top_p[sub]
            noisy = noisy[sub].masked_fill(~likelier[sub], -math.inf)  # the candidate and all below it
            pick = noisy.argmax(dim=-1)
            chosen[rows] = pick

    def at_max(self, step: int) -> torch.Tensor | None:
        """Rows that wrote their last allowed token at ``step`` (None: all rows share the loop's end)."""
        if not self.use_max:
            return None
        return self.max_new <= step + 1
