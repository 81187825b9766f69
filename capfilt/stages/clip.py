"""The clip stage (config section ``clip``): open_clip models' cosine between each image and its
candidate texts, to rerank and threshold them.

The section is a chain of one or more models (LAION-COCO: OpenAI ViT-L/14 keeps the best 5 of 40
captions, RN50x64 picks one of those). Each model encodes each image once and scores only what
the model before it passed on: the web text always, the synthetic captions within that model's
cutoffs (`min_score`, then its `keep_top` best). The cutoff is `link_cut`, a pure function of the
scores, and `chain_cut` replays a whole chain from recorded scores, so `Decide` reports the cut
(reasons ``clip_below_min_score``, ``not_in_clip_top_k``) and `capfilt rethreshold` re-applies
changed cutoffs from a ledger without loading a model. The whole chain lives in each shard worker:
the texts a model passes on never leave it.
"""

from __future__ import annotations

import math

from capfilt.io.embeddings import pixel_hash
from capfilt.records import SYNTHETIC, Reason
from capfilt.stages.isolate import isolating
from capfilt.stages.rows import scorable


def link_cut(scores: dict[int, float], keep_top: int | None, min_score: float | None) -> dict[int, str]:
    """The synthetic captions (candidate index -> one chain model's score) that model does not
    pass on, with the reason: below ``min_score``; then, of the rest, all but the ``keep_top``
    best (a tie goes to the earlier caption)."""
    cut = {j: Reason.CLIP_BELOW_MIN for j, s in scores.items() if min_score is not None and s < min_score}
    if keep_top is not None:
        passing = sorted((j for j in scores if j not in cut), key=lambda j: (-scores[j], j))
        cut.update({j: Reason.NOT_IN_CLIP_TOP_K for j in passing[keep_top:]})
    return cut


class ChainReplayError(ValueError):
    """Cutoffs that pass a text on to a chain model which, in the recorded run, never scored it."""


def chain_cut(cands: list[dict], links) -> list[str]:
    """Replay a clip chain over one sample's candidates from their recorded ``clip_scores`` (one
    per chain model): per candidate, the reason the chain did not pass it on, or "".

    ``links`` are the chain's models (`config.ClipModel`: keep_top, min_score). Raises
    ChainReplayError when the cutoffs pass on a text the recorded run did not score with the next
    model (its own cutoffs were tighter): only a model run can score it."""
    cut = [""] * len(cands)
    alive = [j for j, c in enumerate(cands) if not c["reason"]]
    for k, link in enumerate(links):
        scores = {}
        for j in alive:
            recorded = cands[j].get("clip_scores")
            value = recorded[k] if recorded is not None and k < len(recorded) else None
            if value is None:
                raise ChainReplayError(
                    f"clip chain model {k} ({link.model}) never scored candidate {j} ({cands[j]['text']!r}); "
                    "the new cutoffs pass on texts the run's own cutoffs did not"
                )
            scores[j] = value
        if not all(math.isfinite(v) for v in scores.values()):
            break  # the sample fails in Decide (nonfinite_score), as it did in the run
        dropped = link_cut(
            {j: v for j, v in scores.items() if cands[j]["source"] == SYNTHETIC}, link.keep_top, link.min_score
        )
        for j, reason in dropped.items():
            cut[j] = reason
        alive = [j for j in alive if j not in dropped]
    return cut


class Clip:
    """Adds per-candidate lists (None for a candidate no model scored): `clip`, the last chain
    model's cosine; `clip_scores`, every chain model's cosine (None where that model did not see
    the text); `clip_cut`, the reason the chain did not pass a caption on ("" where it did).

    With a chain model's ``embeddings`` set, that model encodes every sample's image (those whose
    texts an earlier model cut too) and adds `image_embedding` (its L2-normalised image features,
    a list of floats per row) and, for ``image_text``, `text_embeddings` (per candidate it scored,
    its text features; None where it did not): the writer stores them (clip-retrieval's layout)
    and the `quality` heads score them, with no second vision pass."""

    section = "clip"  # its config section

    def __init__(self, config=None, *, device: str = "auto", precision: str = "fp32", self_check: bool = True):
        self.links, self.models, self.embedder = [], [], None
        if config is not None:
            from capfilt.modeling.clip_reranker import ClipReranker

            self.links = list(config.chain)
            self.embedder = config.embedder
            self.models = [
                ClipReranker(
                    link.model, pretrained=link.pretrained, device=device, precision=precision, self_check=self_check
                )
                for link in self.links
            ]
            if self.embedder is not None:
                from capfilt.io.embeddings import model_identity

                self.embedding_model = model_identity(self.models[self.embedder].identity)

    @property
    def clip(self):
        """The chain's last model (the one whose cosine is `clip`; a one-model chain's only one), or None."""
        return self.models[-1] if self.models else None

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        if not self.models:
            return {**batch, "clip": [None] * n, "clip_scores": [None] * n, "clip_cut": [None] * n}
        embedded, text_feats = [None] * n, [None] * n
        failures, details = list(batch["failure"]), list(batch["detail"])
        rows, index, texts = scorable(batch)
        text_of = {i: dict(zip(idx, ts)) for i, idx, ts in zip(rows, index, texts)}
        alive = {i: list(idx) for i, idx in zip(rows, index)}  # candidates the next model scores
        scores = {i: {j: [None] * len(self.models) for j in idx} for i, idx in zip(rows, index)}
        cut = {i: {} for i in rows}
        for k, (model, link) in enumerate(zip(self.models, self.links)):
            if k == self.embedder:
                embedded = self._embed(model, batch, rows, failures, details)
            todo = [i for i in rows if not failures[i] and alive[i]]
            if not todo:
                break
            texts = [[text_of[i][j] for j in alive[i]] for i in todo]
            if k == self.embedder:
                with_text = link.embeddings == "image_text"

                def score(feats, txts, m=model, wt=with_text):
                    import torch

                    sims, text = m.score_features(torch.tensor(feats), txts, text_features=wt)
                    return list(zip(sims, text if text is not None else [None] * len(sims)))

                # (a row whose image failed to encode failed in `_embed`: every todo row has its features)
                out = isolating(score, todo, [[embedded[i] for i in todo], texts], failures, details)
                sims = [o[0] if o is not None else None for o in out]
                if with_text:
                    for i, o in zip(todo, out):
                        if o is not None:
                            rows_of = dict(zip(alive[i], o[1].tolist()))
                            text_feats[i] = [rows_of.get(j) for j in range(1 + len(batch["captions"][i]))]
            else:
                sims = isolating(model.score, todo, [[batch["image"][i] for i in todo], texts], failures, details)
            for i, row_sims in zip(todo, sims):
                if failures[i] or row_sims is None:
                    continue
                values = {j: float(s) for j, s in zip(alive[i], row_sims)}
                for j, value in values.items():
                    scores[i][j][k] = value
                if not all(math.isfinite(v) for v in values.values()):
                    alive[i] = []  # no further model: Decide fails the sample (nonfinite_score)
                    continue
                # candidate 0 is the web text: always passed on, never cut by the chain
                dropped = link_cut({j: v for j, v in values.items() if j > 0}, link.keep_top, link.min_score)
                cut[i].update(dropped)
                alive[i] = [j for j in alive[i] if j not in dropped]
        last, per_model, reasons = [None] * n, [None] * n, [None] * n
        for i in rows:
            if failures[i]:
                continue
            n_cands = 1 + len(batch["captions"][i])
            per_model[i] = [scores[i].get(j) for j in range(n_cands)]
            last[i] = [s[-1] if s else None for s in per_model[i]]
            reasons[i] = [cut[i].get(j, "") for j in range(n_cands)]
        out = {
            **batch,
            "clip": last,
            "clip_scores": per_model,
            "clip_cut": reasons,
            "failure": failures,
            "detail": details,
        }
        if self.embedder is not None:
            out["image_embedding"] = [None if failures[i] else embedded[i] for i in range(n)]
            out["text_embeddings"] = [None if failures[i] else text_feats[i] for i in range(n)]
            out["embedding_model"] = [self.embedding_model] * n
            out["pixel_hash"] = [None if failures[i] else pixel_hash(batch["image"][i]) for i in range(n)]
        return out

    def _embed(self, model, batch: dict, rows: list[int], failures: list, details: list) -> list:
        """The embedding model's image features of every live row (a list of floats each), encoded
        once: the model then scores the row's texts against them."""
        live = [i for i in rows if not failures[i]]
        feats = isolating(
            lambda ims: model.encode_images(ims).cpu().numpy(),
            live,
            [[batch["image"][i] for i in live]],
            failures,
            details,
        )
        out = [None] * len(batch["key"])
        for i, f in zip(live, feats):
            if f is not None:
                out[i] = f.tolist()
        return out
