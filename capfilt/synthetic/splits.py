"""Labelled noise and splits: examples whose web text is the truth or wrong in a labelled way
(another image's caption, one attribute swapped, web junk, underspecified text), which is what
CapFilt must clean.

Every example draws from its own generator, seeded by (seed, split name, index), so one example
does not depend on how many others were drawn before it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import numpy as np

from capfilt.synthetic.drawing import DEFAULT_IMAGE_SIZE, jpeg_bytes, render
from capfilt.synthetic.text import UNDERSPECIFIED, describe, junk_text
from capfilt.synthetic.world import ATTRIBUTES, VALUES, Scene, pick, random_scene

CLEAN = "none"
NOISE_TYPES = ("other_image", "attribute_swap", "junk", "underspecified")


@dataclass
class Example:
    key: str
    image: bytes  # JPEG
    text: str  # the web text: the truth, or a wrong text when noise != "none"
    truth: str  # a true caption of the image
    noise: str  # "none" or one of NOISE_TYPES
    scene: Scene
    swapped: str | None = None  # for attribute_swap: which attribute was changed


def noisy_text(scene: Scene, noise: str, rng: np.random.Generator) -> tuple[str, str | None]:
    """(wrong text, swapped attribute or None) of the given noise type for this scene."""
    if noise == "other_image":
        # A random scene can equal this one in every attribute; its caption would then be true.
        while True:
            other = random_scene(rng)
            if other.attributes() != scene.attributes():
                return describe(other, rng), None
    if noise == "attribute_swap":
        attribute = pick(rng, ATTRIBUTES)
        value = pick(rng, [v for v in VALUES[attribute] if v != getattr(scene, attribute)])
        return describe(dataclasses.replace(scene, **{attribute: value}), rng), attribute
    if noise == "junk":
        return junk_text(rng), None
    if noise == "underspecified":
        return pick(rng, UNDERSPECIFIED), None
    raise ValueError(f"unknown noise type {noise!r}; expected one of {NOISE_TYPES}")


def name_seed(name: str) -> int:
    """A split's (or key's) name as a 32-bit seed: stable across runs and Python versions."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def _noise_counts(k: int, noise_mix: dict[str, float] | None) -> dict[str, int]:
    """Split k noisy examples over the noise types in proportion to noise_mix (largest remainder,
    ties in NOISE_TYPES order), so the total is exactly k."""
    mix = dict.fromkeys(NOISE_TYPES, 1.0) if noise_mix is None else dict(noise_mix)
    unknown = sorted(set(mix) - set(NOISE_TYPES))
    if unknown:
        raise ValueError(f"unknown noise types {unknown}; expected some of {NOISE_TYPES}")
    weights = [float(mix.get(t, 0.0)) for t in NOISE_TYPES]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"noise_mix weights must be finite, non-negative and not all zero: {mix}")
    exact = [k * w / sum(weights) for w in weights]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda j: (-(exact[j] - counts[j]), j))
    for j in by_remainder[: k - sum(counts)]:
        counts[j] += 1
    return dict(zip(NOISE_TYPES, counts))


def make_example(key: str, rng: np.random.Generator, noise: str, image_size: int) -> Example:
    """One example: a random scene, its true caption and, unless noise is CLEAN, a wrong web text."""
    scene = random_scene(rng)
    truth = describe(scene, rng)
    text, swapped = (truth, None) if noise == CLEAN else noisy_text(scene, noise, rng)
    return Example(
        key=key,
        image=jpeg_bytes(render(scene, image_size)),
        text=text,
        truth=truth,
        noise=noise,
        scene=scene,
        swapped=swapped,
    )


def make_split(
    name: str,
    n: int,
    *,
    seed: int,
    noise_share: float = 0.0,
    noise_mix: dict[str, float] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> list[Example]:
    """n examples keyed f"{name}-{i:06d}"; exactly round(n * noise_share) of them get a wrong text,
    spread over the noise types by noise_mix (default: equally). Splits with different names
    differ even under the same seed."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= noise_share <= 1.0:
        raise ValueError(f"noise_share must be within [0, 1], got {noise_share}")
    base = name_seed(name)
    counts = _noise_counts(round(n * noise_share), noise_mix)
    plan = np.random.default_rng([seed, base, 0])
    noisy = sorted(int(i) for i in plan.permutation(n)[: sum(counts.values())])
    kinds = [t for t in NOISE_TYPES for _ in range(counts[t])]
    order = plan.permutation(len(kinds))
    labels = [CLEAN] * n
    for i, j in zip(noisy, order):
        labels[i] = kinds[int(j)]
    return [
        make_example(f"{name}-{i:06d}", np.random.default_rng([seed, base, 1, i]), labels[i], image_size)
        for i in range(n)
    ]
