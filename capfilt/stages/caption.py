"""The caption stage (config section ``captioner``): K synthetic captions per image, from the
BLIP decoder (capfilt/modeling/captioner.py) or another captioner family (capfilt/modeling/families)."""

from __future__ import annotations

from capfilt.stages.isolate import isolating


class Caption:
    """Adds `captions`: K synthetic captions per live row ([] when disabled or failed)."""

    section = "captioner"  # its config section

    def __init__(self, config=None, *, device: str = "auto", precision: str = "fp32", self_check: bool = True):
        self.captioner = None
        if config is not None:
            from capfilt.modeling.families import build_captioner

            # BLIP's fast path (captioner.py) or a coca / git / image-text-to-text family (families/)
            self.captioner = build_captioner(config, device=device, precision=precision, self_check=self_check)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        captions = [[] for _ in range(n)]
        failures, details = list(batch["failure"]), list(batch["detail"])
        live = [i for i in range(n) if not failures[i]]
        if self.captioner is not None and live:
            images = [batch["image"][i] for i in live]
            seeds = [int(batch["seed"][i]) for i in live]
            for i, caps in zip(live, isolating(self.captioner.caption, live, [images, seeds], failures, details)):
                captions[i] = caps if caps is not None else []
        return {**batch, "captions": captions, "failure": failures, "detail": details}
