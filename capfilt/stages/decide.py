"""Decide stage: which texts of a sample are kept, why the others are not, and which is selected.

`decide_sample` is a pure function of the candidates' scores and the policy, so `capfilt
rethreshold` can rerun it from a ledger without any model. A clip chain's cut (which captions a
chain model did not pass on, `stages.clip.chain_cut`) comes in with the candidates as
``clip_cut``; `rethreshold` replays it from the ledger's ``clip_scores``.
"""

from __future__ import annotations

import hashlib
import math

from capfilt.claims import DROP, TRIM, join_claims, text_verdict
from capfilt.config import AUTO_RANK, SCORES, CascadeConfig, ClaimsConfig, DecideConfig, laion_mode
from capfilt.records import (
    BELOW_THRESHOLD,
    FAILED,
    IMAGE_SCORES,
    KEPT,
    REJECTED,
    SYNTHETIC,
    WEB,
    Reason,
    row_candidates,
)


def _rank_key(policy: DecideConfig, cands: list[dict]) -> str | None:
    if laion_mode(policy):
        return "clip"
    if policy.rank_by != "auto":
        return policy.rank_by
    for score in AUTO_RANK:
        if any(c.get(score) is not None for c in cands):
            return score
    return None


def _cascade_verdict(cand: dict, cascade: CascadeConfig | None) -> str:
    """ "below"/"above" when the cascade decided on ITC alone (no ITM computed), else "scored"."""
    if cascade is None or cand.get("itm") is not None or cand.get("itc") is None:
        return "scored"
    return "below" if cascade.verdict(cand["itc"]) == "below" else "above"


def mix_draw(seed: int) -> float:
    """A uniform number in [0, 1) of a sample's seed alone: decide.select mix picks its synthetic
    caption when this is below synthetic_share (the same for any batch, worker or rethreshold)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x00mix".encode()).digest()[:8], "little") / 2.0**64


def claim_verdicts(cands: list[dict], claims: ClaimsConfig | None) -> list[tuple[list[bool], str] | None]:
    """Per candidate verified claim by claim (the Claims stage scored its ``claims``): which claims
    pass ``claims.threshold`` and the text's verdict (claims.KEEP / DROP / TRIM); else None."""
    out = []
    for c in cands:
        scores = c.get("claim_scores")
        if claims is None or scores is None or c.get("claims") is None or c["reason"]:
            out.append(None)
            continue
        supported = [s is not None and s >= claims.threshold for s in scores]
        out.append((supported, text_verdict(supported, claims.policy)))
    return out


def decide_sample(
    cands: list[dict],
    policy: DecideConfig,
    cascade: CascadeConfig | None = None,
    claims: ClaimsConfig | None = None,
    seed: int = 0,
) -> dict:
    """cands: dicts with source, text, reason (pre-scoring), itm, itc, clip, and optionally
    clip_scores (each clip chain model's cosine) and clip_cut (why the chain did not pass it on).

    With ``cascade`` (filter.cascade), a text without ITM was judged on ITC alone: below the band
    it is rejected (itc_below_cascade); above it, it skips the ITM threshold and ranks as certain.
    A caption the clip chain cut is rejected with the chain's reason before any threshold.

    With ``claims`` (the claims section), a text whose claims were scored is judged by them:
    every claim at or above claims.threshold keeps it; else policy drop rejects it
    (claim_unsupported) and policy trim keeps its supported claims only (``trimmed``), or rejects
    it when none is (no_claim_supported). Decide's whole-text thresholds skip such a text unless
    claims.whole_text. ``seed`` (the sample's) draws decide.select mix's choice (`mix_draw`).

    Returns {"status", "failure", "kept": [...], "reasons": [...], "selected": index or -1,
    "supported": per candidate its claims' verdicts or None, "trimmed": per candidate its trimmed
    text or None}.
    """
    scored = [c for c in cands if not c["reason"]]
    for c in scored:
        claim_scores = (c.get("claim_scores") or ()) if claims is not None else ()
        for value in (c.get("itm"), c.get("itc"), c.get("clip"), *(c.get("clip_scores") or ()), *claim_scores):
            if value is not None and not math.isfinite(value):
                return {
                    "status": FAILED,
                    "failure": Reason.NONFINITE_SCORE,
                    "kept": [False] * len(cands),
                    "reasons": [Reason.NONFINITE_SCORE] * len(cands),
                    "selected": -1,
                    "supported": [None] * len(cands),
                    "trimmed": [None] * len(cands),
                }
    verdicts = claim_verdicts(cands, claims)
    reasons, trimmed = [], [None] * len(cands)
    for j, c in enumerate(cands):
        reason = c["reason"]
        if not reason and _cascade_verdict(c, cascade) == "below":
            reason = Reason.ITC_BELOW_CASCADE
        if not reason:
            reason = c.get("clip_cut") or ""
        if not reason and verdicts[j] is not None:
            supported, verdict = verdicts[j]
            if verdict == DROP:
                reason = Reason.CLAIM_UNSUPPORTED if claims.policy == "drop" else Reason.NO_CLAIM_SUPPORTED
            elif verdict == TRIM:
                trimmed[j] = join_claims([t for t, ok in zip(c["claims"], supported) if ok])
        if not reason and (verdicts[j] is None or claims.whole_text):
            limits = policy.web if c["source"] == WEB else policy.synthetic
            for score in SCORES:
                limit, value = getattr(limits, score), c.get(score)
                if limit is not None and value is not None and value < limit:
                    reason = BELOW_THRESHOLD[score]
                    break
        reasons.append(reason)

    rank = _rank_key(policy, cands)

    def strength(j: int) -> float:
        value = cands[j].get(rank) if rank else None
        if value is None and rank == "itm" and _cascade_verdict(cands[j], cascade) == "above":
            return math.inf
        return -math.inf if value is None else value

    top_m = policy.top_m or (1 if laion_mode(policy) else None)
    passing = [j for j, c in enumerate(cands) if c["source"] == SYNTHETIC and not reasons[j]]
    if top_m is not None:
        for j in sorted(passing, key=lambda j: (-strength(j), j))[top_m:]:
            reasons[j] = Reason.NOT_TOP_M

    kept = [not r for r in reasons]
    kept_idx = [j for j, k in enumerate(kept) if k]
    supported = [v[0] if v is not None else None for v in verdicts]
    trimmed = [t if k else None for t, k in zip(trimmed, kept)]
    out = {"failure": "", "kept": kept, "reasons": reasons, "supported": supported, "trimmed": trimmed}
    if not kept_idx:
        return {**out, "status": REJECTED, "selected": -1}
    kept_syn = [j for j in kept_idx if cands[j]["source"] == SYNTHETIC]
    web_kept = kept[0] and cands[0]["source"] == WEB
    if policy.select == "mix" and kept_syn and (not web_kept or mix_draw(seed) < policy.synthetic_share):
        selected = min(kept_syn, key=lambda j: (-strength(j), j))  # the best verified synthetic caption
    elif policy.select in ("prefer_web", "mix") and web_kept:
        selected = 0
    elif laion_mode(policy) and kept_syn:  # LAION-COCO's caption is its top synthetic one
        selected = min(kept_syn, key=lambda j: (-strength(j), j))
    else:
        selected = min(kept_idx, key=lambda j: (-strength(j), j))
    return {**out, "status": KEPT, "selected": selected}


def image_verdict(image: dict | None, policy: DecideConfig) -> str:
    """The reason decide's image rules reject the sample's image ("" when none fires): ``aesthetic``
    below decide.aesthetic.min, ``punsafe`` / ``pwatermark`` above their max. A score the run did
    not compute for the sample (None) passes."""
    limits = {"aesthetic": policy.aesthetic, "punsafe": policy.punsafe, "pwatermark": policy.pwatermark}
    for rule, limit in limits.items():
        value = (image or {}).get(rule)
        if limit is None or value is None:
            continue
        if rule == "aesthetic" and value < limit.min:
            return Reason.AESTHETIC_BELOW_MIN
        if rule != "aesthetic" and value > limit.max:
            return Reason.UNSAFE if rule == "punsafe" else Reason.WATERMARKED
    return ""


def with_image_rules(d: dict, cands: list[dict], image: dict, policy: DecideConfig) -> dict:
    """A sample's decision (`decide_sample`'s) under decide's image rules too: a non-finite image
    score fails the sample (nonfinite_score); a rule that fires rejects it, every text not
    rejected before scoring carrying the rule's reason (its other reasons are then moot)."""
    if d["status"] == FAILED:
        return d
    if any(v is not None and not math.isfinite(v) for v in image.values()):
        n = len(cands)
        return {**d, "status": FAILED, "failure": Reason.NONFINITE_SCORE, "kept": [False] * n,
                "reasons": [Reason.NONFINITE_SCORE] * n, "selected": -1}  # fmt: skip
    verdict = image_verdict(image, policy)
    if not verdict:
        return d
    reasons = [c["reason"] or verdict for c in cands]
    return {**d, "status": REJECTED, "kept": [False] * len(cands), "reasons": reasons, "selected": -1}


class Decide:
    """Adds `status`, `kept`, `reasons`, `selected`; a non-finite score turns the row into a failure."""

    section = "decide"  # its config section

    def __init__(self, policy: DecideConfig, cascade: CascadeConfig | None = None, claims: ClaimsConfig | None = None):
        self.policy, self.cascade, self.claims = policy, cascade, claims

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        failures, details = list(batch["failure"]), list(batch["detail"])
        status, kept, reasons, selected = [], [], [], []
        supported, trimmed = [None] * n, [None] * n
        for i in range(n):
            if failures[i]:
                status.append(FAILED), kept.append([]), reasons.append([]), selected.append(-1)
                continue
            cands = row_candidates(batch, i)
            d = decide_sample(cands, self.policy, self.cascade, self.claims, batch["seed"][i])
            image = {s: batch[s][i] for s in IMAGE_SCORES if batch.get(s) is not None}
            d = with_image_rules(d, cands, image, self.policy)
            supported[i], trimmed[i] = d["supported"], d["trimmed"]
            if d["failure"]:
                failures[i], details[i] = d["failure"], "a model returned NaN or inf for this sample"
            status.append(d["status"]), kept.append(d["kept"]), reasons.append(d["reasons"])
            selected.append(d["selected"])
        return {
            **batch,
            "status": status,
            "kept": kept,
            "reasons": reasons,
            "selected": selected,
            "claim_supported": supported,
            "trimmed": trimmed,
            "failure": failures,
            "detail": details,
        }
