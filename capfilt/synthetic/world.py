"""The shapes world: what a scene is made of, and drawing a random one.

A scene is 1-3 identical objects (shape, colour, size) grouped in one region of a plain, lightly
textured background. Its five attributes (``ATTRIBUTES``) are what a true caption must state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
    "star": "stars",
}
# Saturated and far apart, so a tiny model can tell them apart after JPEG and noise.
COLOURS = {
    "red": (220, 38, 38),
    "green": (34, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (245, 215, 35),
    "purple": (150, 60, 200),
    "orange": (250, 135, 20),
    "white": (245, 245, 245),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
COUNTS = (1, 2, 3)
ATTRIBUTES = ("shape", "colour", "size", "position", "count")
VALUES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES, "position": POSITIONS, "count": COUNTS}

# Muted and darkish: no background can be mistaken for an object colour (white included).
BACKGROUNDS = ((62, 62, 64), (92, 88, 84), (66, 78, 92), (96, 84, 70), (62, 80, 70), (86, 70, 84), (44, 48, 58))


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    count: int
    background: tuple[int, int, int]
    seed: int  # drives everything in the picture that the caption does not state (jitter, texture, noise)

    def attributes(self) -> dict:
        """The five attributes a caption must state."""
        return {a: getattr(self, a) for a in ATTRIBUTES}


def pick(rng: np.random.Generator, options):
    """One of `options`, drawn with `rng` (the one way every module of the world draws a choice)."""
    options = tuple(options)
    return options[int(rng.integers(len(options)))]


def random_scene(rng: np.random.Generator) -> Scene:
    base = np.array(pick(rng, BACKGROUNDS))
    background = tuple(int(v) for v in np.clip(base + rng.integers(-6, 7, 3), 0, 255))
    return Scene(
        shape=pick(rng, SHAPES),
        colour=pick(rng, COLOURS),
        size=pick(rng, SIZES),
        position=pick(rng, POSITIONS),
        count=pick(rng, COUNTS),
        background=background,
        seed=int(rng.integers(0, 2**31 - 1)),
    )
