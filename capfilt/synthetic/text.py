"""The caption grammar: true captions of a scene in varied phrasings, the judge that reads a text
back into attributes (``parse``, ``matches``), the web's junk texts, and every word they use."""

from __future__ import annotations

import itertools
import re

import numpy as np

from capfilt.synthetic.world import COLOURS, PLURALS, SHAPES, Scene, pick

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
    "a shape",
    "an object",
    "a nice picture",
    "something colourful",
    "something",
    "a thing",
    "shapes",
    "objects",
    "a drawing",
    "an image",
    "a photo",
    "a nice photo",
    "a beautiful picture",
    "a colorful image",
    "the picture",
)
# {N} stands for N random digits. Letters and digits only: a WordPiece vocabulary with single
# digits (and ##digits) covers every file name.
_FILE_NAMES = ("IMG_{4}.jpg", "IMG_{4}.JPG", "DSC{5}.JPG", "DSC_{4}.jpg", "image{3}.png", "photo_{4}.jpeg", "{8}.jpg")
_WEB_JUNK = (
    "buy now free shipping",
    "best price click here",
    "stock photo",
    "download wallpaper hd",
    "hd wallpaper free download",
    "cheap sale buy now",
    "click here to download",
    "free stock image",
    "new best price",
    "beautiful wallpaper hd",
)


def _be(count: int) -> str:
    return "is" if count == 1 else "are"


def _noun_phrase(scene: Scene, det: str, size_word: str) -> str:
    shape = scene.shape if scene.count == 1 else PLURALS[scene.shape]
    return f"{det} {size_word} {scene.colour} {shape}"


def describe(scene: Scene, rng: np.random.Generator) -> str:
    """A random phrasing of the scene's true caption (every attribute stated)."""
    template = pick(rng, TEMPLATES)
    np_ = _noun_phrase(scene, pick(rng, DETERMINERS[scene.count]), pick(rng, SIZE_WORDS[scene.size]))
    return template.format(np=np_, pos=pick(rng, POSITION_PHRASES[scene.position]), be=_be(scene.count))


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
_NP_RE = (
    rf"(?P<det>{_alternatives(_DET_OF)}) (?P<size>{_alternatives(_SIZE_OF)}) "
    rf"(?P<colour>{_alternatives(COLOURS)}) (?P<shape>{_alternatives(_SHAPE_OF)})"
)
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
        return {
            "shape": shape,
            "colour": m["colour"],
            "size": _SIZE_OF[m["size"]],
            "position": _POSITION_OF[m["pos"]],
            "count": count,
        }
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


# --------------------------------------------------------------------------- web junk


def junk_text(rng: np.random.Generator) -> str:
    roll = rng.random()
    if roll < 0.5:
        return _file_name(rng)
    if roll < 0.85:
        return pick(rng, _WEB_JUNK)
    return f"{pick(rng, _WEB_JUNK)} {_file_name(rng)}"


def _file_name(rng: np.random.Generator) -> str:
    return re.sub(
        r"\{(\d+)\}", lambda m: "".join(str(d) for d in rng.integers(0, 10, int(m[1]))), pick(rng, _FILE_NAMES)
    )
