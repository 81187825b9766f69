"""Decode stage: image bytes -> RGB array, or a failure reason. CPU only, no model."""

from __future__ import annotations

import numpy as np

from capfilt.io.images import DecodeLimits, ImageDecodeError, decode_image


class Decode:
    section = "decode"  # its config section

    def __init__(self, min_side: int = 16, max_pixels: int = 50_000_000, max_side: int = 1024):
        self.limits = DecodeLimits(min_side=min_side, max_pixels=max_pixels, max_side=max_side)

    def __call__(self, batch: dict) -> dict:
        images, failures, details = [], list(batch["failure"]), list(batch["detail"])
        for i, data in enumerate(batch["image_bytes"]):
            image = None
            if not failures[i]:
                try:
                    image = np.array(decode_image(data, self.limits))  # writable: torch warns on read-only arrays
                except ImageDecodeError as err:
                    failures[i], details[i] = err.reason, err.detail
            images.append(image)
        return {**batch, "image": images, "failure": failures, "detail": details}
