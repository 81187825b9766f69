"""Drawing a scene: an RGB image whose every pixel is a function of the scene (its seed included)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

from capfilt.synthetic.world import COLOURS, SHAPES, Scene

JPEG_QUALITY = 90
DEFAULT_IMAGE_SIZE = 96

_RADIUS = {"small": 0.065, "large": 0.12}  # half extent of one object, as a share of the image side
_ANCHOR = {"left": (0.24, 0.5), "right": (0.76, 0.5), "top": (0.5, 0.24), "bottom": (0.5, 0.76), "center": (0.5, 0.5)}
_SUPERSAMPLE = 4  # draw large and shrink: antialiased edges, so small stars still look like stars


def _layout(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Object centres in [0, 1] coordinates: stacked along the side for left/right, in a row for
    top/bottom, a compact cluster in the centre (a row would reach both sides)."""
    r = _RADIUS[scene.size]
    step = 2 * r * 1.2
    n = scene.count
    ax, ay = _ANCHOR[scene.position]
    ax += rng.uniform(-0.03, 0.03)
    ay += rng.uniform(-0.03, 0.03)
    line = [(i - (n - 1) / 2) * step for i in range(n)]
    if scene.position in ("left", "right"):
        offsets = [(0.0, d) for d in line]
    elif scene.position == "center" and n == 3:
        offsets = [(0.0, -0.45 * step), (-0.5 * step, 0.42 * step), (0.5 * step, 0.42 * step)]
    else:
        offsets = [(d, 0.0) for d in line]
    points = [(ax + dx + rng.uniform(-0.01, 0.01), ay + dy + rng.uniform(-0.01, 0.01)) for dx, dy in offsets]
    # Shift the whole group back inside rather than clamping each object, which could overlap them.
    lo, hi = r + 0.01, 1 - r - 0.01
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    sx = max(0.0, lo - min(xs)) - max(0.0, max(xs) - hi)
    sy = max(0.0, lo - min(ys)) - max(0.0, max(ys) - hi)
    return [(x + sx, y + sy) for x, y in points]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        h = 0.86 * r  # a bit smaller than the circle, so both read as the same size
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.78 * r, cy), (cx, cy + r), (cx - 0.78 * r, cy)], fill=255)
    elif shape == "cross":
        t = 0.33 * r
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=255)
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=255)
    elif shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene, size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB image of size x size pixels; deterministic given the scene."""
    if size < 8:
        raise ValueError(f"image size must be at least 8 pixels, got {size}")
    rng = np.random.default_rng(scene.seed)
    colour = np.clip(np.array(COLOURS[scene.colour]) + rng.integers(-10, 11, 3), 0, 255)
    centres = _layout(scene, rng)

    big = size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for x, y in centres:
        _draw_shape(draw, scene.shape, x * big, y * big, _RADIUS[scene.size] * big)
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255.0

    # A gentle gradient plus per-pixel noise: enough texture that JPEGs are not trivially small.
    angle = rng.uniform(0, 2 * math.pi)
    amplitude = rng.uniform(4, 14)
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ramp = amplitude * (grid[None, :] * math.cos(angle) + grid[:, None] * math.sin(angle))
    background = np.array(scene.background, dtype=np.float32) + ramp[..., None]
    pixels = alpha * colour.astype(np.float32) + (1 - alpha) * background
    pixels += rng.normal(0.0, 4.0, pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
