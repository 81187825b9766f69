"""A synthetic image-text world with ground truth: the shapes world.

A scene is 1-3 identical objects (shape, colour, size) grouped in one region of a plain,
lightly textured background. Every image has a true caption from a small grammar with varied
phrasings, so we can tell exactly which texts are right: ``matches`` is the judge. Web texts are
made noisy in labelled ways (another image's caption, one attribute swapped, web junk,
underspecified text), which is what CapFilt must clean. Used by ``capfilt synth``, the tests and
the bootstrap demo.

Everything is a pure function of explicit seeds (numpy Generators, never global state): the same
seed gives the same bytes, and every example draws from its own generator, so one example does not
depend on how many others were drawn before it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from capfilt.records import Reason

# --------------------------------------------------------------------------- the world

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses", "star": "stars"}
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
BACKGROUNDS = ((62, 62, 64), (92, 88, 84), (66, 78, 92), (96, 84, 70), (62, 80, 70), (86, 70, 84),
               (44, 48, 58))

CLEAN = "none"
NOISE_TYPES = ("other_image", "attribute_swap", "junk", "underspecified")

JPEG_QUALITY = 90
DEFAULT_IMAGE_SIZE = 96


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


@dataclass
class Example:
    key: str
    image: bytes  # JPEG
    text: str  # the web text: the truth, or a wrong text when noise != "none"
    truth: str  # a true caption of the image
    noise: str  # "none" or one of NOISE_TYPES
    scene: Scene
    swapped: str | None = None  # for attribute_swap: which attribute was changed


def _pick(rng, options):
    options = tuple(options)
    return options[int(rng.integers(len(options)))]


def random_scene(rng: np.random.Generator) -> Scene:
    base = np.array(_pick(rng, BACKGROUNDS))
    background = tuple(int(v) for v in np.clip(base + rng.integers(-6, 7, 3), 0, 255))
    return Scene(
        shape=_pick(rng, SHAPES),
        colour=_pick(rng, COLOURS),
        size=_pick(rng, SIZES),
        position=_pick(rng, POSITIONS),
        count=_pick(rng, COUNTS),
        background=background,
        seed=int(rng.integers(0, 2**31 - 1)),
    )


# --------------------------------------------------------------------------- rendering

_RADIUS = {"small": 0.065, "large": 0.12}  # half extent of one object, as a share of the image side
_ANCHOR = {"left": (0.24, 0.5), "right": (0.76, 0.5), "top": (0.5, 0.24), "bottom": (0.5, 0.76),
           "center": (0.5, 0.5)}
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


# --------------------------------------------------------------------------- the caption grammar

# {np} = determiner, size, colour, shape; {pos} = a position phrase; {be} = is/are, agreeing.
TEMPLATES = (
    "{np} {pos}",
    "there {be} {np} {pos}",
    "a picture of {np} {pos}",
    "a photo of {np} {pos}",
    "an image showing {np} {pos}",
    "{pos} there {be} {np}",
)
DETERMINERS = {1: ("a", "one"), 2: ("two",), 3: ("three",)}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_PHRASES = {
    "left": ("on the left", "on the left side", "at the left", "to the left"),
    "right": ("on the right", "on the right side", "at the right", "to the right"),
    "top": ("at the top", "near the top", "on the top side"),
    "bottom": ("at the bottom", "near the bottom", "on the bottom side"),
    "center": ("in the center", "in the centre", "in the middle"),
}

UNDERSPECIFIED = (
    "a shape", "an object", "a nice picture", "something colourful", "something", "a thing",
    "shapes", "objects", "a drawing", "an image", "a photo", "a nice photo", "a beautiful picture",
    "a colorful image", "the picture",
)
# {N} stands for N random digits. Letters and digits only: a WordPiece vocabulary with single
# digits (and ##digits) covers every file name.
_FILE_NAMES = ("IMG_{4}.jpg", "IMG_{4}.JPG", "DSC{5}.JPG", "DSC_{4}.jpg", "image{3}.png",
               "photo_{4}.jpeg", "{8}.jpg")
_WEB_JUNK = (
    "buy now free shipping", "best price click here", "stock photo", "download wallpaper hd",
    "hd wallpaper free download", "cheap sale buy now", "click here to download", "free stock image",
    "new best price", "beautiful wallpaper hd",
)


def _be(count: int) -> str:
    return "is" if count == 1 else "are"


def _noun_phrase(scene: Scene, det: str, size_word: str) -> str:
    shape = scene.shape if scene.count == 1 else PLURALS[scene.shape]
    return f"{det} {size_word} {scene.colour} {shape}"


def describe(scene: Scene, rng: np.random.Generator) -> str:
    """A random phrasing of the scene's true caption (every attribute stated)."""
    template = _pick(rng, TEMPLATES)
    np_ = _noun_phrase(scene, _pick(rng, DETERMINERS[scene.count]), _pick(rng, SIZE_WORDS[scene.size]))
    return template.format(np=np_, pos=_pick(rng, POSITION_PHRASES[scene.position]), be=_be(scene.count))


def phrasings(scene: Scene) -> list[str]:
    """Every text ``describe`` can return for this scene."""
    texts = []
    for template, det, size_word, pos in itertools.product(
        TEMPLATES, DETERMINERS[scene.count], SIZE_WORDS[scene.size], POSITION_PHRASES[scene.position]
    ):
        texts.append(template.format(np=_noun_phrase(scene, det, size_word), pos=pos, be=_be(scene.count)))
    return texts


def _alternatives(words) -> str:
    # Longest first, so "on the left side" is tried before "on the left".
    return "|".join(sorted(words, key=lambda w: (-len(w), w)))


_DET_OF = {w: n for n, ws in DETERMINERS.items() for w in ws}
_SIZE_OF = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
_SHAPE_OF = {**{s: (s, False) for s in SHAPES}, **{p: (s, True) for s, p in PLURALS.items()}}
_POSITION_OF = {p: pos for pos, ps in POSITION_PHRASES.items() for p in ps}
_NP_RE = (rf"(?P<det>{_alternatives(_DET_OF)}) (?P<size>{_alternatives(_SIZE_OF)}) "
          rf"(?P<colour>{_alternatives(COLOURS)}) (?P<shape>{_alternatives(_SHAPE_OF)})")
_TEMPLATE_RES = tuple(
    re.compile(t.format(np=_NP_RE, pos=f"(?P<pos>{_alternatives(_POSITION_OF)})", be="(?P<be>is|are)"))
    for t in TEMPLATES
)


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: how ``parse`` and WORDS see a text."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def parse(text: str) -> dict | None:
    """The attributes a caption states, or None when it is not a sentence of the grammar
    (number agreement included: "two red circle" does not parse)."""
    t = normalise(text)
    for rx in _TEMPLATE_RES:
        m = rx.fullmatch(t)
        if m is None:
            continue
        count = _DET_OF[m["det"]]
        shape, plural = _SHAPE_OF[m["shape"]]
        if plural != (count > 1) or (m.groupdict().get("be") not in (None, _be(count))):
            continue
        return {"shape": shape, "colour": m["colour"], "size": _SIZE_OF[m["size"]],
                "position": _POSITION_OF[m["pos"]], "count": count}
    return None


def matches(scene: Scene, text: str) -> bool:
    """Ground truth: the text is a caption of the grammar that states exactly this scene."""
    return parse(text) == scene.attributes()


def _words_of(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[0-9]", text.lower())


def _vocabulary() -> list[str]:
    words = set("0123456789") | {"is", "are"}
    for text in (*TEMPLATES, *UNDERSPECIFIED, *_WEB_JUNK, *_FILE_NAMES):
        words.update(_words_of(re.sub(r"\{\w+\}", " ", text)))
    for group in (*DETERMINERS.values(), *SIZE_WORDS.values(), *POSITION_PHRASES.values()):
        for phrase in group:
            words.update(phrase.split())
    words.update(COLOURS)
    words.update(SHAPES)
    words.update(PLURALS.values())
    return sorted(words)


# Every word any text of this module can contain, lower case. Numbers in junk file names are
# digit strings: a tokenizer should split them into single digits (WordPiece ##0-##9 does).
WORDS: list[str] = _vocabulary()


# --------------------------------------------------------------------------- noise

def junk_text(rng: np.random.Generator) -> str:
    roll = rng.random()
    if roll < 0.5:
        return _file_name(rng)
    if roll < 0.85:
        return _pick(rng, _WEB_JUNK)
    return f"{_pick(rng, _WEB_JUNK)} {_file_name(rng)}"


def _file_name(rng: np.random.Generator) -> str:
    return re.sub(r"\{(\d+)\}", lambda m: "".join(str(d) for d in rng.integers(0, 10, int(m[1]))),
                  _pick(rng, _FILE_NAMES))


def noisy_text(scene: Scene, noise: str, rng: np.random.Generator) -> tuple[str, str | None]:
    """(wrong text, swapped attribute or None) of the given noise type for this scene."""
    if noise == "other_image":
        # A random scene can equal this one in every attribute; its caption would then be true.
        while True:
            other = random_scene(rng)
            if other.attributes() != scene.attributes():
                return describe(other, rng), None
    if noise == "attribute_swap":
        attribute = _pick(rng, ATTRIBUTES)
        value = _pick(rng, [v for v in VALUES[attribute] if v != getattr(scene, attribute)])
        return describe(dataclasses.replace(scene, **{attribute: value}), rng), attribute
    if noise == "junk":
        return junk_text(rng), None
    if noise == "underspecified":
        return _pick(rng, UNDERSPECIFIED), None
    raise ValueError(f"unknown noise type {noise!r}; expected one of {NOISE_TYPES}")


# --------------------------------------------------------------------------- splits

def _name_seed(name: str) -> int:
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


def _example(key: str, rng: np.random.Generator, noise: str, image_size: int) -> Example:
    scene = random_scene(rng)
    truth = describe(scene, rng)
    text, swapped = (truth, None) if noise == CLEAN else noisy_text(scene, noise, rng)
    return Example(key=key, image=jpeg_bytes(render(scene, image_size)), text=text, truth=truth, noise=noise,
                   scene=scene, swapped=swapped)


def make_split(name: str, n: int, *, seed: int, noise_share: float = 0.0,
               noise_mix: dict[str, float] | None = None, image_size: int = DEFAULT_IMAGE_SIZE) -> list[Example]:
    """n examples keyed f"{name}-{i:06d}"; exactly round(n * noise_share) of them get a wrong text,
    spread over the noise types by noise_mix (default: equally). Splits with different names
    differ even under the same seed."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= noise_share <= 1.0:
        raise ValueError(f"noise_share must be within [0, 1], got {noise_share}")
    base = _name_seed(name)
    counts = _noise_counts(round(n * noise_share), noise_mix)
    plan = np.random.default_rng([seed, base, 0])
    noisy = sorted(int(i) for i in plan.permutation(n)[: sum(counts.values())])
    kinds = [t for t in NOISE_TYPES for _ in range(counts[t])]
    order = plan.permutation(len(kinds))
    labels = [CLEAN] * n
    for i, j in zip(noisy, order):
        labels[i] = kinds[int(j)]
    return [_example(f"{name}-{i:06d}", np.random.default_rng([seed, base, 1, i]), labels[i], image_size)
            for i in range(n)]


# --------------------------------------------------------------------------- writing shards

_MTIME = 1643328000  # fixed (BLIP's arXiv date), so the same examples give byte-identical tars
_TMP = ".tmp-"  # the partial-file mark capfilt.io.output sweeps
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


@dataclass
class _Entry:
    """One sample as written: its members, its sidecar row (None leaves the key out of the
    sidecar) and, for injected broken samples, what was broken and the expected reason."""

    key: str
    members: dict[str, bytes]
    sidecar: dict | None
    expected: str | None = None
    what: str | None = None  # set for every injected sample; those go into the manifest
    occurrence: int = 0


def _url(key: str) -> str:
    return f"https://example.com/img/{key}.jpg"


def _meta(ex: Example | None, key: str, expected: str | None = None, what: str | None = None) -> bytes:
    meta = {
        "key": key,
        "url": _url(key),
        "truth": ex.truth if ex else None,
        "noise": ex.noise if ex else None,
        "swapped": ex.swapped if ex else None,
        "scene": dataclasses.asdict(ex.scene) if ex else None,
        "expected": expected,
    }
    if what is not None:
        meta["broken"] = what
    return json.dumps(meta).encode()


def _entry(ex: Example) -> _Entry:
    return _Entry(
        key=ex.key,
        members={"jpg": ex.image, "txt": ex.text.encode(), "json": _meta(ex, ex.key)},
        sidecar={"key": ex.key, "url": _url(ex.key), "caption": ex.text, "status": "success"},
    )


def _slug(name: str) -> str:
    # A key must not contain "." (WebDataset splits key and extension at the first one).
    return re.sub(r"[^a-z0-9_-]+", "_", name.lower()).strip("_")[:40] or "case"


def _broken_entries(seed: int, image_size: int):
    """The injected samples: (rng for their placement, samples to spread over the shards, the
    duplicate-key trio, the sample the last shard is cut inside)."""
    from capfilt.testing import image_cases

    rng = np.random.default_rng([seed, _name_seed("broken")])
    serial = itertools.count()

    def scene_entry(slug: str, expected: str | None, what: str) -> tuple[_Entry, Example]:
        key = f"broken-{next(serial):03d}-{slug}"
        ex = _example(key, rng, CLEAN, image_size)
        entry = _entry(ex)
        entry.members["json"] = _meta(ex, key, expected, what)
        entry.expected, entry.what = expected, what
        return entry, ex

    spread = []
    for case in image_cases():
        key = f"broken-{next(serial):03d}-{_slug(case.name)}"
        text = describe(random_scene(rng), rng)  # any caption: the image is not a scene
        what = f"image case {case.name}"
        spread.append(_Entry(
            key=key,
            members={case.ext: case.data, "txt": text.encode(), "json": _meta(None, key, case.reason, what)},
            sidecar={"key": key, "url": _url(key), "caption": text, "status": "success"},
            expected=case.reason, what=what,
        ))

    missing_txt, _ = scene_entry("no_txt", Reason.WEB_TEXT_MISSING, "no .txt member and no sidecar row")
    del missing_txt.members["txt"]
    missing_txt.sidecar = None  # a sidecar caption would stand in for the missing .txt
    empty_txt, _ = scene_entry("blank_txt", Reason.WEB_TEXT_EMPTY, "whitespace-only .txt")
    empty_txt.members["txt"] = b" \t\n  "
    empty_txt.sidecar["caption"] = " \t\n  "
    no_image, _ = scene_entry("no_image", Reason.MISSING_IMAGE, "no image member")
    del no_image.members["jpg"]
    spread += [missing_txt, empty_txt, no_image]

    first, ex = scene_entry("dup", None, "duplicated key, first copy (valid)")
    between, _ = scene_entry("not_utf8", Reason.WEB_TEXT_NOT_UTF8, "non-UTF-8 .txt")
    between.members["txt"] = b"\xff\xfe bad"
    between.sidecar["caption"] = None
    second = _Entry(
        key=first.key,
        members={**first.members,
                 "json": _meta(ex, first.key, Reason.DUPLICATE_KEY, "duplicated key, second copy")},
        sidecar=None,  # one sidecar row per key
        expected=Reason.DUPLICATE_KEY, what="duplicated key, second copy", occurrence=1,
    )
    truncated, _ = scene_entry("truncated", Reason.TRUNCATED_TAR, "tar cut inside this sample's image data")
    return rng, spread, [first, between, second], truncated


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def _write_tar(path: Path, entries: list[_Entry], truncate_last: bool) -> None:
    tmp = path.with_name(f"{path.name}{_TMP}{os.getpid()}")
    cut = None
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for i, entry in enumerate(entries):
                for ext in sorted(entry.members):
                    data = entry.members[ext]
                    _add_member(tf, f"{entry.key}.{ext}", data)
                    if truncate_last and i == len(entries) - 1 and cut is None and ext in _IMAGE_EXTENSIONS:
                        # tf.offset is past the padded data block; cut halfway through the data.
                        cut = tf.offset - 512 * math.ceil(len(data) / 512) + len(data) // 2
        if cut is not None:
            f.truncate(cut)
    os.replace(tmp, path)


def _write_sidecar(path: Path, entries: list[_Entry], upstream: list[dict] = ()) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [e.sidecar for e in entries if e.sidecar is not None] + list(upstream)
    columns = ("key", "url", "caption", "status") + (("error_message",) if upstream else ())
    table = pa.table({c: pa.array([r.get(c) for r in rows], pa.string()) for c in columns})
    tmp = path.with_name(f"{path.name}{_TMP}{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


# (status, error_message) of samples img2dataset attempted and did not write, as it records them.
UPSTREAM_FAILURES = (
    ("failed_to_download", "HTTP Error 404: Not Found"),
    ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>"),
    ("failed_to_resize", "cannot identify image file <_io.BytesIO object at 0x7f3a2c1b9e50>"),
    ("failed_to_download", "HTTPSConnectionPool(host='example.com', port=443): Max retries exceeded with url: "
                           "/img/missing.jpg (Caused by SSLError(SSLCertVerificationError(1, '[SSL: "
                           "CERTIFICATE_VERIFY_FAILED] certificate verify failed')))"),
)


def _upstream_rows(shard: str, n: int) -> list[dict]:
    """n img2dataset-style failed rows: keys the tar does not hold, UPSTREAM_FAILURES in turn."""
    rows = []
    for i in range(n):
        status, message = UPSTREAM_FAILURES[i % len(UPSTREAM_FAILURES)]
        key = f"upstream-{shard}-{i:04d}"
        rows.append({"key": key, "url": _url(key), "caption": f"never downloaded {i}", "status": status,
                     "error_message": message})
    return rows


def _write_i2d_stats(path: Path, written: int, upstream: list[dict]) -> None:
    """img2dataset's {shard}_stats.json for a shard with `written` samples in its tar."""
    status_dict: dict[str, int] = {"success": written} if written else {}
    for r in upstream:
        status_dict[r["error_message"]] = status_dict.get(r["error_message"], 0) + 1
    stats = {"count": written + len(upstream), "successes": written,
             "failed_to_download": sum(r["status"] == "failed_to_download" for r in upstream),
             "failed_to_resize": sum(r["status"] == "failed_to_resize" for r in upstream),
             "duration": 0.0, "start_time": 0.0, "end_time": 0.0, "status_dict": status_dict}
    tmp = path.with_name(f"{path.name}{_TMP}{os.getpid()}")
    tmp.write_text(json.dumps(stats, indent=4))
    os.replace(tmp, path)


def _image_size_of(examples: list[Example]) -> int:
    if not examples:
        return DEFAULT_IMAGE_SIZE
    with Image.open(io.BytesIO(examples[0].image)) as im:
        return im.size[0]


def write_shards(out_dir, examples: list[Example], *, per_shard: int, broken: bool = False, seed: int = 0,
                 sidecar: bool = True, upstream_failed: int = 0) -> list[str]:
    """Write examples as img2dataset-style WebDataset shards 00000.tar, 00001.tar, ... (plus
    {shard}.parquet sidecars); returns the shard paths.

    upstream_failed=n adds, per shard, n samples that img2dataset "attempted but failed"
    (UPSTREAM_FAILURES in turn): rows in the sidecar with their status and error_message and no
    member in the tar, and a {shard}_stats.json with img2dataset's counts.

    broken=True mixes in samples of every failure class (one per capfilt.testing.image_cases()
    case, missing/empty/non-UTF-8 text, missing image, a duplicated key) and cuts the last shard
    inside its final sample's image. Each injected sample's .json carries its "expected" reason
    and out_dir/broken_manifest.json lists them all, including the truncated one whose .json is lost.
    """
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = [[_entry(ex) for ex in examples[i : i + per_shard]] for i in range(0, len(examples), per_shard)]
    manifest_path = out / "broken_manifest.json"
    if broken:
        groups = groups or [[]]
        rng, spread, duplicate, truncated = _broken_entries(seed, _image_size_of(examples))
        for j, entry in enumerate(spread):
            group = groups[j % len(groups)]
            group.insert(int(rng.integers(0, len(group) + 1)), entry)
        groups[0].extend(duplicate)  # another sample sits between the two copies
        groups[-1].append(truncated)
    elif manifest_path.exists():
        manifest_path.unlink()  # a stale manifest would describe samples these shards do not have

    paths, manifest = [], []
    for s, entries in enumerate(groups):
        shard = f"{s:05d}"
        path = out / f"{shard}.tar"
        _write_tar(path, entries, truncate_last=broken and s == len(groups) - 1)
        upstream = _upstream_rows(shard, upstream_failed)
        if sidecar:
            _write_sidecar(out / f"{shard}.parquet", entries, upstream)
        if upstream:
            _write_i2d_stats(out / f"{shard}_stats.json", len(entries), upstream)
        else:
            (out / f"{shard}_stats.json").unlink(missing_ok=True)  # a stale one would count failures
        paths.append(str(path))
        manifest += [{"shard": shard, "key": e.key, "occurrence": e.occurrence, "expected": e.expected,
                      "what": e.what} for e in entries if e.what is not None]
    if broken:
        tmp = manifest_path.with_name(f"{manifest_path.name}{_TMP}{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, manifest_path)
    return paths


def write_coco(out_dir, examples: list[Example], *, captions_per_image: int = 1) -> str:
    """A COCO-style clean set: out_dir/images/{key}.jpg and out_dir/captions.json with the TRUE
    captions (file_name is relative to out_dir). With captions_per_image > 1, further distinct
    true phrasings are added, like COCO's five captions per image. Returns the json path."""
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, ex in enumerate(examples):
        file_name = f"images/{ex.key}.jpg"
        (out / file_name).write_bytes(ex.image)
        with Image.open(io.BytesIO(ex.image)) as im:
            width, height = im.size
        images.append({"id": image_id, "file_name": file_name, "key": ex.key, "width": width, "height": height})
        captions = [ex.truth]
        if captions_per_image > 1:
            others = [t for t in phrasings(ex.scene) if t != ex.truth]
            rng = np.random.default_rng([_name_seed(ex.key), 7])
            picked = rng.choice(len(others), size=min(captions_per_image - 1, len(others)), replace=False)
            captions += [others[int(j)] for j in picked]
        for caption in captions:
            annotations.append({"id": len(annotations), "image_id": image_id, "caption": caption})
    path = out / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}, indent=1) + "\n")
    return str(path)


def main_synth(out_dir, shards: int, per_shard: int, *, noise: float = 0.3, broken: bool = False,
               seed: int = 0) -> dict:
    """What `capfilt synth` runs: shards x per_shard web examples (a `noise` share of wrong texts),
    optionally with broken samples; returns a summary of what was written."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    examples = make_split("web", shards * per_shard, seed=seed, noise_share=noise)
    paths = write_shards(out_dir, examples, per_shard=per_shard, broken=broken, seed=seed)
    noisy = {t: sum(ex.noise == t for ex in examples) for t in NOISE_TYPES}
    summary = {
        "out": str(out_dir),
        "shards": len(paths),
        "examples": len(examples),
        "clean": len(examples) - sum(noisy.values()),
        "noisy": noisy,
        "samples": len(examples),
    }
    if broken:
        manifest = json.loads((Path(out_dir) / "broken_manifest.json").read_text())
        by_reason: dict[str, int] = {}
        for row in manifest:
            if row["expected"] is not None:
                by_reason[row["expected"]] = by_reason.get(row["expected"], 0) + 1
        summary["samples"] += len(manifest)
        summary["broken"] = dict(sorted(by_reason.items()))
        summary["injected_valid"] = sum(row["expected"] is None for row in manifest)
        summary["manifest"] = str(Path(out_dir) / "broken_manifest.json")
    return summary
