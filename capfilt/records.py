"""The record and ledger schemas, and every reason string, in one place.

A *sample* is one image with its web text (one key of an input shard). A *candidate* is one
text of a sample: the web text or a synthetic caption. The ledger has one row per candidate,
plus one row per sample that failed before scoring (``source`` null, ``candidate`` -1).
`candidates` and `row_candidates` give a sample's candidates in that shape (the stages, the
writers and `rethreshold` all read them from here).
"""

from __future__ import annotations

import hashlib
import math

import pyarrow as pa

from capfilt.config.sections import IMAGE_RULES, SCORES, SOURCES

# Sample status: every input sample ends in exactly one of these.
KEPT, REJECTED, FAILED = "kept", "rejected", "failed"

WEB, SYNTHETIC = SOURCES  # a candidate text's source: the web text, or a captioner's caption


class Reason:
    """Why a sample failed or a candidate text was rejected. Values are stable ledger strings."""

    # --- sample failures (before scoring; the sample gets status "failed") ---
    MISSING_IMAGE = "missing_image"  # no image member for the key
    EMPTY_FILE = "empty_image_file"  # zero-byte image member
    NOT_AN_IMAGE = "not_an_image"  # bytes are not an image (HTML served as .jpg, text, ...)
    TRUNCATED_IMAGE = "truncated_image"  # image data ends early
    CORRUPT_IMAGE = "corrupt_image"  # header readable, pixel data broken
    IMAGE_TOO_SMALL = "image_too_small"  # below decode.min_side
    IMAGE_TOO_LARGE = "image_too_large"  # pixel count over decode.max_pixels (checked from the header)
    UNSUPPORTED_MODE = "unsupported_image_mode"  # a pixel format we cannot convert to RGB
    DUPLICATE_KEY = "duplicate_key"  # key already seen earlier in the same shard
    TRUNCATED_TAR = "truncated_tar"  # the tar ended inside this sample's members
    # key unsafe as a tar member name: empty, ., .., /, \, control chars, NUL, not UTF-8, over 255 bytes
    UNSAFE_KEY = "unsafe_key"
    NONFINITE_SCORE = "nonfinite_score"  # a model produced NaN/inf for this sample
    MODEL_ERROR = "model_error"  # a model stage raised for this sample's batch

    # --- candidate rejections (the text is dropped; the sample may still be kept) ---
    WEB_TEXT_MISSING = "web_text_missing"
    WEB_TEXT_EMPTY = "web_text_empty"
    WEB_TEXT_NOT_UTF8 = "web_text_not_utf8"
    WEB_TEXT_TOO_LONG = "web_text_too_long"
    CAPTION_EMPTY = "caption_empty"  # captioner produced nothing after stripping the prompt
    DUPLICATE_TEXT = "duplicate_text"  # same text as an earlier candidate of this sample
    ITM_BELOW = "itm_below_threshold"
    ITC_BELOW = "itc_below_threshold"
    ITC_BELOW_CASCADE = "itc_below_cascade"  # filter.cascade: rejected on ITC alone, ITM not computed
    CLIP_BELOW = "clip_below_threshold"
    # clip chain (a `clip` section with cutoffs): a model of the chain did not pass the caption on
    CLIP_BELOW_MIN = "clip_below_min_score"  # below that chain model's min_score
    NOT_IN_CLIP_TOP_K = "not_in_clip_top_k"  # outside that chain model's keep_top best captions
    NOT_TOP_M = "not_in_top_m"  # passed thresholds but outside the top-m synthetic captions
    # `claims` section: a text verified claim by claim (its sentences / clauses scored one by one)
    CLAIM_UNSUPPORTED = "claim_unsupported"  # a claim scored below claims.threshold (policy drop)
    NO_CLAIM_SUPPORTED = "no_claim_supported"  # policy trim, and not one claim of the text passed

    # --- sample rejection ---
    NO_TEXT_KEPT = "no_text_kept"
    # image rules (`decide.aesthetic`, `decide.punsafe`, `decide.pwatermark`; `capfilt dedup`): the
    # whole sample is rejected for its image; each of its texts carries the reason
    AESTHETIC_BELOW_MIN = "aesthetic_below_min"  # aesthetic predictor score below decide.aesthetic.min
    UNSAFE = "unsafe"  # NSFW detector probability (punsafe) above decide.punsafe.max
    WATERMARKED = "watermarked"  # watermark detector probability (pwatermark) above decide.pwatermark.max
    NEAR_DUPLICATE = "near_duplicate"  # same pixels as, or embedding cosine >= dedup threshold to, an earlier image


# Every Reason in words (the report's meaning column and verdicts). Threshold reasons name their
# score; the report adds the number and the threshold beside them.
REASON_TEXT = {
    Reason.ITM_BELOW: "the ITM score is below its source's threshold",
    Reason.ITC_BELOW: "the ITC score is below its source's threshold",
    Reason.CLIP_BELOW: "the CLIP score is below its source's threshold",
    Reason.ITC_BELOW_CASCADE: "rejected on ITC alone, below filter.cascade.itc_low (ITM not computed)",
    Reason.CLIP_BELOW_MIN: "below a CLIP chain model's min_score",
    Reason.NOT_IN_CLIP_TOP_K: "outside a CLIP chain model's keep_top best captions",
    Reason.MISSING_IMAGE: "no image member for the key",
    Reason.EMPTY_FILE: "zero-byte image member",
    Reason.NOT_AN_IMAGE: "the bytes are not an image",
    Reason.TRUNCATED_IMAGE: "image data ends early",
    Reason.CORRUPT_IMAGE: "image header readable, pixel data broken",
    Reason.IMAGE_TOO_SMALL: "image below decode.min_side",
    Reason.IMAGE_TOO_LARGE: "image over decode.max_pixels",
    Reason.UNSUPPORTED_MODE: "pixel format not convertible to RGB",
    Reason.DUPLICATE_KEY: "key already seen earlier in the shard",
    Reason.TRUNCATED_TAR: "the tar ends inside this sample",
    Reason.UNSAFE_KEY: "key unusable as a tar member name",
    Reason.NONFINITE_SCORE: "a model returned NaN or inf",
    Reason.MODEL_ERROR: "a model stage raised for this sample's batch",
    Reason.WEB_TEXT_MISSING: "no web text in the sample",
    Reason.WEB_TEXT_EMPTY: "the web text is empty",
    Reason.WEB_TEXT_NOT_UTF8: "the web text is not UTF-8",
    Reason.WEB_TEXT_TOO_LONG: "the web text is over decode.max_text_bytes",
    Reason.CAPTION_EMPTY: "the captioner wrote nothing",
    Reason.DUPLICATE_TEXT: "same text as an earlier candidate",
    Reason.NOT_TOP_M: "passed its threshold, outside the top-m synthetic captions",
    Reason.CLAIM_UNSUPPORTED: "a claim of the text scored below claims.threshold",
    Reason.NO_CLAIM_SUPPORTED: "no claim of the text scored at or above claims.threshold",
    Reason.NO_TEXT_KEPT: "no text of the sample was kept",
    Reason.AESTHETIC_BELOW_MIN: "the image's aesthetic score is below decide.aesthetic.min",
    Reason.UNSAFE: "the NSFW detector's probability (punsafe) is above decide.punsafe.max",
    Reason.WATERMARKED: "the watermark detector's probability (pwatermark) is above decide.pwatermark.max",
    Reason.NEAR_DUPLICATE: "the same or a near-identical image came earlier in the run (capfilt dedup)",
}

CLIP_CHAIN_CUTS = frozenset({Reason.CLIP_BELOW_MIN, Reason.NOT_IN_CLIP_TOP_K})  # a clip chain's own cutoffs
# The reason of a text whose score (SCORES) is below its source's decide threshold.
BELOW_THRESHOLD = {"itm": Reason.ITM_BELOW, "itc": Reason.ITC_BELOW, "clip": Reason.CLIP_BELOW}
# Reasons that reject a sample for its image (every text of it carries one): stats count the sample
# under it rather than no_text_kept.
IMAGE_REJECTIONS = frozenset({Reason.AESTHETIC_BELOW_MIN, Reason.UNSAFE, Reason.WATERMARKED, Reason.NEAR_DUPLICATE})
# Per-image scores (one per sample, on each of its ledger rows): the quality heads on the clip
# chain's image embeddings (`aesthetic`, `punsafe`) and the watermark detector (`pwatermark`).
IMAGE_SCORES = IMAGE_RULES  # per-image scores (aesthetic, punsafe, pwatermark): one per decide image rule

SAMPLE_FAILURE_REASONS = frozenset(
    {
        Reason.MISSING_IMAGE,
        Reason.EMPTY_FILE,
        Reason.NOT_AN_IMAGE,
        Reason.TRUNCATED_IMAGE,
        Reason.CORRUPT_IMAGE,
        Reason.IMAGE_TOO_SMALL,
        Reason.IMAGE_TOO_LARGE,
        Reason.UNSUPPORTED_MODE,
        Reason.DUPLICATE_KEY,
        Reason.TRUNCATED_TAR,
        Reason.UNSAFE_KEY,
        Reason.NONFINITE_SCORE,
        Reason.MODEL_ERROR,
    }
)

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        # 0 for the first time a key appears in its shard; later copies are failed duplicate_key rows.
        pa.field("occurrence", pa.int32(), nullable=False),
        # Why the key, though safe to write, may mislead a reader: it displays as another name (not
        # NFC; invisible or direction-changing characters) or starts with "." (io.sample_keys.key_warning);
        # null for an ordinary key.
        pa.field("key_warning", pa.string()),
        pa.field("sample_status", pa.string(), nullable=False),  # kept | rejected | failed
        pa.field("source", pa.string()),  # web | synthetic | null for a failed sample
        pa.field("candidate", pa.int32(), nullable=False),  # 0 = web text, 1..K synthetic, -1 failed
        pa.field("text", pa.string()),
        pa.field("itm", pa.float32()),  # ITM match probability
        pa.field("itc", pa.float32()),  # ITC cosine similarity
        pa.field("clip", pa.float32()),  # CLIP cosine similarity (of the clip chain's last model)
        # A clip chain of two or more models: each model's cosine in chain order, null where that
        # model did not see the text (an earlier one cut it); null for a one-model clip section.
        pa.field("clip_scores", pa.list_(pa.float32())),
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # "" for a kept candidate
        pa.field("selected", pa.bool_(), nullable=False),  # the caption written as {key}.txt
        # `edit` section: the selected text as the edit model rewrote it (the .txt holds it unless
        # it came out empty: ""); null on every other row and in runs without `edit`.
        pa.field("edited_text", pa.string()),
        pa.field("seed", pa.int64(), nullable=False),  # per-key sampling seed
        # `claims` section: the text's claims (sentences / clauses) as scored one by one, each
        # claim's score (claims.score), and whether it passed claims.threshold; null for a text not
        # verified claim by claim. trimmed_text: policy trim's text of only the supported claims
        # (what {key}.txt / .json hold when the text is selected), null when nothing was cut.
        pa.field("claims", pa.list_(pa.string())),
        pa.field("claim_scores", pa.list_(pa.float32())),
        pa.field("claim_supported", pa.list_(pa.bool_())),
        pa.field("trimmed_text", pa.string()),
        pa.field("url", pa.string()),
        # Per-image scores (records.IMAGE_SCORES), the same on each row of a sample; null where not
        # computed (no `quality` / `watermark` section) and on a failed sample's row.
        pa.field("aesthetic", pa.float32()),  # LAION improved aesthetic predictor (about 1..10)
        pa.field("punsafe", pa.float32()),  # LAION CLIP-based NSFW detector probability
        pa.field("pwatermark", pa.float32()),  # LAION watermark detector probability
    ]
)

# The laion_coco mode's parquet: LAION-COCO's published columns, names, order and types (plus the
# WebDataset key first). The laion/laion-coco card itself is disabled; the types are those of its
# re-upload huggingface.co/datasets/Mayfull/laion-coco-1m (README dataset_info): URL, TEXT string;
# top_caption string; all_captions list<string>; all_similarities list<float64>; WIDTH, HEIGHT
# int64; similarity float64; hash int64; pwatermark, punsafe float64. Fixed, never inferred per
# shard, so that every shard's file has the same schema and the files concatenate.
LAION_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("URL", pa.string()),
        pa.field("TEXT", pa.string()),
        pa.field("top_caption", pa.string()),
        pa.field("all_captions", pa.list_(pa.string())),
        pa.field("all_similarities", pa.list_(pa.float64())),
        pa.field("WIDTH", pa.int64()),
        pa.field("HEIGHT", pa.int64()),
        pa.field("similarity", pa.float64()),
        pa.field("hash", pa.int64()),
        pa.field("pwatermark", pa.float64()),
        pa.field("punsafe", pa.float64()),
    ]
)

# LAION metadata columns an input may carry (img2dataset's parquet sidecar, or the sample's .json:
# img2dataset copies a source's extra columns into both with --save_additional_columns): passed
# through to the LAION parquet under the same name, null when the input has none.
LAION_PASSTHROUGH = ("WIDTH", "HEIGHT", "hash", "pwatermark", "punsafe")
# Where a LAION column is not given under its own name, img2dataset's own columns stand in: it
# writes the downloaded image's size before resizing as original_width / original_height, and the
# size of the image in the tar as width / height, into both its parquet sidecar and each sample's
# .json (img2dataset 1.47 downloader.py: key, status, error_message, width, height, original_width,
# original_height). LAION's WIDTH / HEIGHT are the web image's size: original_* first.
LAION_ALIASES = {"WIDTH": ("original_width", "width"), "HEIGHT": ("original_height", "height")}
_INT64 = (-(1 << 63), (1 << 63) - 1)


def laion_value(column: str, value):
    """``value`` (from a sidecar or a .json) as LAION_SCHEMA types ``column``, or None: an integral
    number for an int64 column (a float such as 640.0 too: pandas writes integer columns with
    nulls as floats), any number for a float64 one; a bool, a string or an out-of-range number
    is not one."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if pa.types.is_integer(LAION_SCHEMA.field(column).type):
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            return None
        value = int(value)
        return value if _INT64[0] <= value <= _INT64[1] else None
    return float(value)


# --------------------------------------------------------------------------- candidates


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def candidates(web_text: str | None, web_reason: str, captions: list[str] | None) -> list[dict]:
    """Candidate 0 is the web text, 1..K the synthetic captions; `reason` is set when a text is
    rejected before any model scores it (missing/empty/too long web text, empty or duplicate caption)."""
    out = [{"source": WEB, "text": web_text, "reason": web_reason or ""}]
    seen = {_norm(web_text)} if web_text and not web_reason else set()
    for caption in captions or []:
        reason = ""
        if not caption.strip():
            reason = Reason.CAPTION_EMPTY
        elif _norm(caption) in seen:
            reason = Reason.DUPLICATE_TEXT
        seen.add(_norm(caption))
        out.append({"source": SYNTHETIC, "text": caption, "reason": reason})
    return out


# SCORES (itm, itc, clip): the per-candidate score columns the model stages add (declared in config)
CLAIM_COLUMNS = ("claims", "claim_scores")  # the Claims stage's per-candidate columns (None: not verified)


def row_candidates(batch: dict, i: int) -> list[dict]:
    """Row ``i`` of a scored batch as its candidates, each with its scores: ``itm``, ``itc``,
    ``clip``, and for a clip chain ``clip_scores`` (one per chain model) and ``clip_cut`` (the
    reason the chain did not pass the caption on, or "")."""
    cands = candidates(batch["web_text"][i], batch["web_reason"][i], batch["captions"][i])
    for score in (*SCORES, "clip_scores", "clip_cut", *CLAIM_COLUMNS):
        column = batch.get(score)
        values = (column[i] if column is not None else None) or [None] * len(cands)
        for c, v in zip(cands, values):
            c[score] = v
    for c in cands:
        c["clip_cut"] = c["clip_cut"] or ""
    return cands


def key_seed(run_seed: int, key: str) -> int:
    """The sampling seed of one key: independent of batch size, order, workers and resume."""
    digest = hashlib.sha256(f"{run_seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def empty_stats(shard: str) -> dict:
    return {
        "shard": shard,
        "input": 0,
        "kept": 0,
        "rejected": 0,
        "failed": 0,
        "rejected_by_reason": {},
        "failed_by_reason": {},
        "candidates": {"web": {"kept": 0, "rejected": 0}, "synthetic": {"kept": 0, "rejected": 0}},
        "candidate_rejections_by_reason": {},
        # Which source's text became {key}.txt, per kept sample (decide.select: mix sets the share).
        "selected": {"web": 0, "synthetic": 0},
        # Samples img2dataset attempted but did not write into the shard (its sidecar / _stats.json):
        # not capfilt input, so outside input = kept + rejected + failed (capfilt.io.upstream).
        "upstream_failed": 0,
        "upstream_failed_by_reason": {},
        "upstream_failed_by_status": {},
    }
