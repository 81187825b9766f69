"""Dense captions of the shapes world: several claims per caption, at most one of them wrong.

A dense caption is 3-4 claims about one scene, written as a paragraph: each claim is a true
phrasing of the grammar (`text.describe`), some sentences join two claims (", and ..." or "; "),
so that a claim splitter has clauses to find as well as sentences. In a *wrong* caption exactly
one claim describes the scene with one thing changed: an attribute (colour, shape or size), the
count, or the position (`DENSE_ERRORS`); every other claim is right. The truth of each caption
(its claims, which one is wrong, what was changed) goes into ``dense_truth.json`` next to the
shards, and each claim can be judged on its own with `text.matches`.

This is what long VLM captions look like to a filter (Recap-DataComp 49 words, KALE 67): a filter
that reads 35 tokens and returns one number has to find one wrong clause among right ones, often
past the end of what it reads. `capfilt.claims_demo` (`make demo-dense`) measures that against the truth.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from capfilt.synthetic.drawing import DEFAULT_IMAGE_SIZE, jpeg_bytes, render
from capfilt.synthetic.splits import CLEAN, Example, name_seed
from capfilt.synthetic.text import DETERMINERS, POSITION_PHRASES, SIZE_WORDS, TEMPLATES
from capfilt.synthetic.world import PLURALS, VALUES, Scene, pick, random_scene

DENSE_ERRORS = ("attribute", "count", "position")  # what the one wrong claim changes
_ATTRIBUTE_SWAPS = ("colour", "shape", "size")
WRONG_NOISE = "dense_wrong"  # the `noise` label of a caption with a wrong claim (synthetic.truth reads it)
# Claims read as statements; "a picture of ..." opens the caption only.
_OPENING = TEMPLATES[2]
_CLAIM_TEMPLATES = tuple(t for t in TEMPLATES if t not in (TEMPLATES[2], TEMPLATES[3]))


@dataclass
class DenseExample:
    key: str
    image: bytes  # JPEG
    text: str  # the dense caption
    claims: list[str]  # its claims in order, as the generator wrote them
    wrong: int | None  # index of the wrong claim, or None when every claim is right
    error: str | None  # DENSE_ERRORS: what the wrong claim changes
    swapped: str | None  # the attribute it changes (colour, shape, size, count, position)
    scene: Scene

    def truth(self) -> dict:
        return {"claims": self.claims, "wrong": self.wrong, "error": self.error, "swapped": self.swapped}


def _claim(scene: Scene, rng: np.random.Generator, opening: bool) -> str:
    """One true phrasing of ``scene`` (the grammar of `text.describe`, a statement template)."""
    template = _OPENING if opening else pick(rng, _CLAIM_TEMPLATES)
    shape = scene.shape if scene.count == 1 else PLURALS[scene.shape]
    np_ = f"{pick(rng, DETERMINERS[scene.count])} {pick(rng, SIZE_WORDS[scene.size])} {scene.colour} {shape}"
    pos = pick(rng, POSITION_PHRASES[scene.position])
    return template.format(np=np_, pos=pos, be="is" if scene.count == 1 else "are")


def _changed(scene: Scene, error: str, rng: np.random.Generator) -> tuple[Scene, str]:
    attribute = pick(rng, _ATTRIBUTE_SWAPS) if error == "attribute" else error
    value = pick(rng, [v for v in VALUES[attribute] if v != getattr(scene, attribute)])
    return dataclasses.replace(scene, **{attribute: value}), attribute


def _paragraph(claims: list[str], rng: np.random.Generator) -> str:
    """Claims as sentences; after the first, a claim may join the one before it in one sentence."""
    sentences = [claims[0]]
    for claim in claims[1:]:
        if rng.random() < 0.4 and "," not in sentences[-1] and ";" not in sentences[-1]:
            sentences[-1] += pick(rng, (", and ", "; ")) + claim
        else:
            sentences.append(claim)
    return " ".join(f"{s[:1].upper()}{s[1:]}." for s in sentences)


def dense_caption(
    scene: Scene, rng: np.random.Generator, error: str | None = None, n_claims: int | None = None
) -> tuple[str, list[str], int | None, str | None]:
    """(caption, claims, index of the wrong claim or None, changed attribute or None)."""
    n = n_claims or int(rng.integers(3, 5))
    claims = [_claim(scene, rng, opening=j == 0) for j in range(n)]
    wrong, swapped = None, None
    if error is not None:
        if error not in DENSE_ERRORS:
            raise ValueError(f"unknown dense error {error!r}; expected one of {DENSE_ERRORS}")
        wrong = int(rng.integers(n))
        other, swapped = _changed(scene, error, rng)
        claims[wrong] = _claim(other, rng, opening=wrong == 0)
    return _paragraph(claims, rng), claims, wrong, swapped


def make_dense_split(
    name: str, n: int, *, seed: int, wrong_share: float = 0.5, image_size: int = DEFAULT_IMAGE_SIZE
) -> list[DenseExample]:
    """n examples keyed f"{name}-{i:06d}"; exactly round(n * wrong_share) have one wrong claim, the
    errors spread evenly over DENSE_ERRORS. Each example draws from its own generator."""
    if not 0.0 <= wrong_share <= 1.0:
        raise ValueError(f"wrong_share must be within [0, 1], got {wrong_share}")
    base = name_seed(name)
    plan = np.random.default_rng([seed, base, 0])
    n_wrong = round(n * wrong_share)
    wrong_rows = {int(i): DENSE_ERRORS[k % len(DENSE_ERRORS)] for k, i in enumerate(plan.permutation(n)[:n_wrong])}
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, base, 1, i])
        scene = random_scene(rng)
        text, claims, wrong, swapped = dense_caption(scene, rng, wrong_rows.get(i))
        out.append(
            DenseExample(
                key=f"{name}-{i:06d}",
                image=jpeg_bytes(render(scene, image_size)),
                text=text,
                claims=claims,
                wrong=wrong,
                error=wrong_rows.get(i),
                swapped=swapped,
                scene=scene,
            )
        )
    return out


TRUTH_FILE = "dense_truth.json"


def write_dense(out_dir, examples: list[DenseExample], *, per_shard: int) -> list[str]:
    """The examples as WebDataset shards (the dense caption is each sample's web text; its .json
    carries the scene and noise "none" / WRONG_NOISE) plus out_dir/dense_truth.json: per key its
    claims, the wrong one's index, the error and the changed attribute. Returns the shard paths."""
    from capfilt.synthetic.shards import write_shards

    plain = [
        Example(
            key=ex.key,
            image=ex.image,
            text=ex.text,
            truth=ex.text if ex.wrong is None else "",
            noise=CLEAN if ex.wrong is None else WRONG_NOISE,
            scene=ex.scene,
            swapped=ex.swapped,
        )
        for ex in examples
    ]
    paths = write_shards(out_dir, plain, per_shard=per_shard)
    truth = {ex.key: ex.truth() for ex in examples}
    (Path(out_dir) / TRUTH_FILE).write_text(json.dumps(truth, indent=1) + "\n")
    return paths
