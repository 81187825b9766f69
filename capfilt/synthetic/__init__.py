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

One module per concern; this package re-exports the names the rest of capfilt uses:

- ``world``:   what a scene is made of (``Scene``, its attribute values), ``random_scene``
- ``drawing``: a scene as pixels (``render``, ``jpeg_bytes``)
- ``text``:    the caption grammar (``describe``, ``phrasings``), its judge (``parse``, ``matches``),
  web junk texts, and ``WORDS``, every word any of these texts can contain
- ``splits``:  labelled noise and splits of examples (``make_split``)
- ``shards``:  the world on disk: WebDataset shards, COCO sets, ``main_synth`` (``capfilt synth``)
- ``broken``:  broken and odd image files (``image_cases``), for the tests and ``--broken`` corpora
- ``truth``:   a CapFilt run scored against the world's truth (``labelled_ledger``, ``quality``);
  not imported here, since it reads runs: ``from capfilt.synthetic.truth import ...``
"""

from capfilt.synthetic.drawing import DEFAULT_IMAGE_SIZE, JPEG_QUALITY, jpeg_bytes, render
from capfilt.synthetic.shards import UPSTREAM_FAILURES, main_synth, write_coco, write_shards
from capfilt.synthetic.splits import CLEAN, NOISE_TYPES, Example, make_split, noisy_text
from capfilt.synthetic.text import (
    DETERMINERS,
    POSITION_PHRASES,
    SIZE_WORDS,
    TEMPLATES,
    UNDERSPECIFIED,
    WORDS,
    describe,
    junk_text,
    matches,
    normalise,
    parse,
    phrasings,
)
from capfilt.synthetic.world import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    COUNTS,
    PLURALS,
    POSITIONS,
    SHAPES,
    SIZES,
    VALUES,
    Scene,
    random_scene,
)

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "CLEAN",
    "COLOURS",
    "COUNTS",
    "DEFAULT_IMAGE_SIZE",
    "DETERMINERS",
    "JPEG_QUALITY",
    "NOISE_TYPES",
    "PLURALS",
    "POSITIONS",
    "POSITION_PHRASES",
    "SHAPES",
    "SIZES",
    "SIZE_WORDS",
    "TEMPLATES",
    "UNDERSPECIFIED",
    "UPSTREAM_FAILURES",
    "VALUES",
    "WORDS",
    "Example",
    "Scene",
    "describe",
    "jpeg_bytes",
    "junk_text",
    "main_synth",
    "make_split",
    "matches",
    "noisy_text",
    "normalise",
    "parse",
    "phrasings",
    "random_scene",
    "render",
    "write_coco",
    "write_shards",
]
