"""A long caption as its claims: sentences, then clauses, each one scored on its own.

A dense caption (LLaVA/Recap, KALE, Florence-2 "more detailed") states many things; scored as one
text, it is truncated to the filter's 35 tokens (CLIP: 77) and summed up in one number, so one
wrong clause hides among right ones. `split_claims` cuts it into claims the filter can judge one
at a time; `text_verdict` turns their scores into keep / drop / trim.

Why rules and not a library (docs/demo-results.md, "Splitting captions into claims"): on 40
caption-style texts with hand-marked sentences (abbreviations, decimals, initials, numbered and
bulleted lists, lower-case starts; tests/test_claims.py holds them), pysbd 0.3.4 got 36 right and
sentencex 1.0.32 35; these rules get 39 (tuned on that set, so read it as "no worse", not "better").
Neither library splits a sentence into clauses (that needs a parser model, which capfilt does not
ship), so the clause rules are ours either way, and a dependency would buy nothing. The rules are
deterministic and stateless: the same text always gives the same claims.
"""

from __future__ import annotations

import re

# Tokens that end in "." without ending a sentence (compared lower case, without the dot).
ABBREVIATIONS = frozenset(
    "mr mrs ms dr st sr jr prof mt ft vs etc e.g i.e approx no nos fig figs inc ltd co corp dept est "
    "jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k a.m p.m ca cf al ave rd blvd".split()
)
# Of those, the ones a sentence often ends with: they end it when a capital letter follows.
FINAL_ABBREVIATIONS = frozenset({"etc", "a.m", "p.m", "inc", "ltd", "co", "corp", "u.s", "u.k"})
# Sentence ends: . ! ? (runs of them, an ellipsis too) and closing quotes/brackets after them, then
# whitespace; or a line break (bullet lists, VLM paragraphs).
_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\s*\n+\s*")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")
# Clause joints: a semicolon, or a comma followed by a conjunction that starts a new statement.
_JOINT = re.compile(r"\s*;\s*|,\s+(?=(?:and|but|while|whereas|and there|and it|and they)\s)", re.IGNORECASE)
_LEADING_CONJ = re.compile(r"^(?:and|but|while|whereas)\s+", re.IGNORECASE)
MIN_CLAIM_WORDS = 3  # a shorter piece is not a statement of its own ("and so on"): it stays joined


def _ends_sentence(before: str, after: str) -> bool:
    """Whether the text up to a candidate break (``before``) really ends a sentence."""
    words = before.rstrip("\"')]").split()
    word = words[-1] if words else ""
    if not word.endswith("."):
        return True  # ! or ?
    stem = word[:-1].lower().lstrip("(\"'").rstrip(".")
    if len(words) == 1 and stem.isdigit():
        return False  # a numbered item's "1." at the start of a line
    if stem in ABBREVIATIONS:
        return stem in FINAL_ABBREVIATIONS and after[:1].isupper()
    return not re.fullmatch(r"[a-z]", stem)  # an initial ("J. Smith")


def sentences(text: str) -> list[str]:
    """The sentences of ``text`` (bullets' markers removed), in order, stripped, none empty."""
    out, start = [], 0
    for m in _END.finditer(text):
        piece = text[start : m.start()]
        if "\n" in m.group() or _ends_sentence(piece, text[m.end() :]):
            out.append(piece)
            start = m.end()
    out.append(text[start:])
    return [s for s in (_BULLET.sub("", p).strip() for p in out) if s]


def clauses(sentence: str) -> list[str]:
    """The clauses of one sentence: cut at semicolons and at ", and/but/while/whereas ..." where
    both sides are statements of their own. A comma before "and" that ends a list ("red, green,
    and blue balls") is not a joint: the item before it is a word or two after another comma."""
    parts, start = [], 0
    for m in _JOINT.finditer(sentence):
        left = sentence[start : m.start()]
        is_list = m.group().strip() == "," and "," in left and len(left.rsplit(",", 1)[1].split()) <= 2
        if not is_list:
            parts.append(left)
            start = m.end()
    parts.append(sentence[start:])
    parts = [_LEADING_CONJ.sub("", p).strip().rstrip(".!?;,").strip() for p in parts]
    merged: list[str] = []
    for p in parts:  # a piece too short to be a claim stays with the one before it
        if merged and len(p.split()) < MIN_CLAIM_WORDS:
            merged[-1] = f"{merged[-1]}, {p}"
        elif p:
            merged.append(p)
    if len(merged) > 1 and len(merged[0].split()) < MIN_CLAIM_WORDS:
        merged[:2] = [f"{merged[0]}, {merged[1]}"]
    return merged


def split_claims(text: str, unit: str = "clause") -> list[str]:
    """``text``'s claims: its sentences (``unit="sentence"``), or their clauses (``"clause"``)."""
    if unit not in ("sentence", "clause"):
        raise ValueError(f"unit must be 'sentence' or 'clause', got {unit!r}")
    sents = [s.rstrip(".!?").strip() for s in sentences(text or "")]
    if unit == "sentence":
        return [s for s in sents if s]
    return [c for s in sents for c in clauses(s)]


def join_claims(claims: list[str]) -> str:
    """Supported claims written back as a caption: one sentence each, capitalised."""
    return " ".join(f"{c[:1].upper()}{c[1:]}." for c in claims)


# What a text becomes (a claim verdict is True = supported).
KEEP, DROP, TRIM = "keep", "drop", "trim"


def text_verdict(supported: list[bool], policy: str, min_supported: float = 1.0) -> str:
    """keep (every claim supported, or ``min_supported`` share of them under policy "drop"),
    drop, or trim (policy "trim" and some but not all claims supported: keep only those)."""
    if not supported:
        return KEEP
    if all(supported):
        return KEEP
    if policy == "trim":
        return TRIM if any(supported) else DROP
    return KEEP if sum(supported) / len(supported) >= min_supported else DROP
