"""The claims stage (config section ``claims``, off unless set): long texts verified claim by claim.

Each candidate text of a sample (the web text, the synthetic captions; `claims.sources` says which)
is split into claims (`capfilt.claims.split_claims`: sentences, then clauses); a text with at least
`claims.min_claims` of them gets every claim scored against its image with the run's filter (ITM
or ITC, `claims.score`) or its clip chain's last model. Decide then keeps, drops or trims the text
from those scores (`decide.claim_verdicts`), so `capfilt rethreshold` replays a new claim
threshold or policy from the ledger's ``claim_scores`` without a model.

No second model: the stage scores with the model object the Filter (or Clip) stage loaded in the
same process (`build_stages` hands it over; both runners build every stage in each worker), through
the same fast path as whole texts: every claim of a batch goes in one `ItmFilter.score_detailed`
call, so each image is encoded once and its cross-attention K/V computed once for all its claims.
"""

from __future__ import annotations

from capfilt.claims import split_claims
from capfilt.records import candidates
from capfilt.stages.isolate import isolating


class Claims:
    """Adds per-candidate lists (None for a row that failed): `claims`, a verified text's claims
    (None for a text not verified: too few claims, another source, rejected before scoring), and
    `claim_scores`, each claim's score."""

    section = "claims"  # its config section; no pool of its own (it borrows its model, see above)

    def __init__(self, config=None, scorer=None):
        """``scorer``: the loaded `ItmFilter` (score itm / itc) or `ClipReranker` (score clip)."""
        self.config, self.scorer = config, scorer
        if config is not None and scorer is None:
            raise ValueError(
                f"claims.score {config.score}: no {'clip' if config.score == 'clip' else 'filter'} model is loaded "
                "in this process to score the claims with"
            )

    def _verified(self, cand: dict) -> list[str] | None:
        if cand["reason"] or self.config.sources not in ("all", cand["source"]):
            return None
        claims = split_claims(cand["text"], self.config.unit)
        return claims if len(claims) >= self.config.min_claims else None

    def _score(self, images: list, texts: list[list[str]]) -> list[list[float]]:
        if self.config.score == "clip":
            return [[float(v) for v in sims] for sims in self.scorer.score(images, texts)]
        scores = self.scorer.score_detailed(images, texts)
        per_image = scores.itm if self.config.score == "itm" else scores.itc
        return [[float(v) for v in values] for values in per_image]

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        claims, claim_scores = [None] * n, [None] * n
        if self.config is None:
            return {**batch, "claims": claims, "claim_scores": claim_scores}
        failures, details = list(batch["failure"]), list(batch["detail"])
        rows, per_row = [], []
        for i in range(n):
            if failures[i]:
                continue
            cands = candidates(batch["web_text"][i], batch["web_reason"][i], batch["captions"][i])
            claims[i] = [self._verified(c) for c in cands]
            if any(claims[i]):
                rows.append(i)
                per_row.append([t for cl in claims[i] if cl for t in cl])  # one flat list per image
        scored = isolating(self._score, rows, [[batch["image"][i] for i in rows], per_row], failures, details)
        for i, flat in zip(rows, scored):
            if failures[i] or flat is None:
                continue
            out, at = [], 0
            for cl in claims[i]:
                out.append(None if not cl else flat[at : at + len(cl)])
                at += len(cl) if cl else 0
            claim_scores[i] = out
        for i in range(n):
            if failures[i]:
                claims[i], claim_scores[i] = None, None
        return {**batch, "claims": claims, "claim_scores": claim_scores, "failure": failures, "detail": details}
