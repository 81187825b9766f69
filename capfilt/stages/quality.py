"""The quality stage (config section ``quality``): LAION's aesthetic and NSFW heads on the image
embeddings the clip chain's embedding model already computed (`image_embedding`), so no second
vision pass. Adds ``aesthetic`` and ``punsafe`` (one float per sample, None where not computed).

A head is refused at load, in one line, when it was trained on another embedding model than the
chain's (`Head.check_embedder`). When the input already carries the column (a LAION sidecar's
punsafe), ``quality.prefer`` says which value the sample keeps: the computed one or the input's.
"""

from __future__ import annotations

import numpy as np

from capfilt.stages.isolate import isolating

HEADS = {"aesthetic": "laion_aesthetic", "punsafe": "laion_nsfw"}  # column -> head kind


def image_score(computed, meta: dict | None, column: str, prefer: str):
    """The sample's value of an image score column: the input's when ``prefer`` is "input" and the
    input has one, else the computed one."""
    given = (meta or {}).get(column)
    if prefer == "input" and given is not None:
        return float(given)
    return computed


class Quality:
    """Adds `aesthetic` and `punsafe` from `image_embedding` (None where a head is not configured)."""

    section = "quality"  # its config section; it runs where the clip chain ran (no pool of its own)

    def __init__(self, config=None, clip=None, *, device: str = "auto"):
        self.heads, self.prefer = {}, "computed"
        if config is None:
            return
        from capfilt.modeling.heads import Head

        link = clip.chain[clip.embedder]
        self.prefer = config.prefer
        for column, kind in HEADS.items():
            head = getattr(config, column)
            if head is not None:
                loaded = Head(head.model, f"quality.{column}.model", revision=head.revision, device=device, kind=kind)
                loaded.check_embedder(link.model, link.pretrained, _embed_dim(link))
                self.heads[column] = loaded

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        out = {**batch}
        failures, details = list(batch["failure"]), list(batch["detail"])
        for column in HEADS:
            values = [None] * n
            head = self.heads.get(column)
            if head is not None:
                rows = [i for i in range(n) if not failures[i] and batch["image_embedding"][i] is not None]
                scores = isolating(
                    lambda embs, h=head: h.score_embeddings(np.asarray(embs, dtype=np.float32)),
                    rows,
                    [[batch["image_embedding"][i] for i in rows]],
                    failures,
                    details,
                )
                for i, s in zip(rows, scores):
                    values[i] = None if s is None else float(s)
            metas = batch.get("laion_meta") or [None] * n
            # (a NaN stays NaN: Decide fails that sample with nonfinite_score)
            out[column] = [
                None if failures[i] else image_score(values[i], metas[i], column, self.prefer) for i in range(n)
            ]
        out["failure"], out["detail"] = failures, details
        return out


def _embed_dim(link) -> int:
    """The width of the embedding model's image features, from its open_clip config (no load)."""
    import json
    from pathlib import Path

    import open_clip

    from capfilt.modeling.presets import resolve_clip

    name, _, _ = resolve_clip(link.model, link.pretrained)
    if name.startswith("local-dir:"):
        config = json.loads((Path(name.removeprefix("local-dir:")) / "open_clip_config.json").read_text())
        return config["model_cfg"]["embed_dim"]
    return open_clip.get_model_config(name)["embed_dim"]
