"""Typed run configuration: YAML in, validated pydantic models out, with errors that name the key."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from capfilt.shipped import find_recipe

DEDUP_THRESHOLD = 0.95  # `capfilt dedup`: image embedding cosine at or above which two images are near duplicates
MAX_TEXT_BYTES = 4096  # web texts longer than this (UTF-8 bytes) are rejected: decode.max_text_bytes


class ConfigError(ValueError):
    """A config that cannot be used; the message names every offending key."""


_SCALARS = (bool, int, float)


def _scalar_type(annotation) -> type | None:
    """bool, int or float when a field holds that scalar (or None); else None (left to pydantic)."""
    args = [a for a in get_args(annotation) if a is not type(None)] if get_args(annotation) else [annotation]
    return args[0] if len(args) == 1 and args[0] in _SCALARS else None


class Strict(BaseModel):
    """A config section: unknown keys refused, NaN and inf refused, and scalars taken only as
    what they are: ``itm: "0.3"`` (a string) or ``num_captions: true`` (a bool) are mistakes that
    pydantic's lax mode would turn into 0.3 and 1 (an int is a fine float: ``temperature: 1``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _scalars_as_written(cls, data):
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            kind = _scalar_type(field.annotation)
            value = data.get(name, None)
            if kind is None or value is None:
                continue
            if kind is bool:
                ok = isinstance(value, bool)
            else:
                ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
            if not ok:
                expected = {float: "a number", int: "an integer", bool: "true or false"}[kind]
                raise ValueError(f"{name}: expected {expected}, got {_written(value)}")
        return data


def _written(value) -> str:
    """A value as the user wrote it in YAML, with its type when that is the surprise."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, float) and value != value:
        return ".nan (NaN, not a number)"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return f"{'-' if value < 0 else ''}.inf (infinite)"
    kind = {str: "a string", int: "an integer", float: "a number"}.get(type(value))
    return f"{value!r} ({kind})" if kind else repr(value)


class DecodeConfig(Strict):
    min_side: int = Field(16, ge=1, description="smaller image side below this fails the sample (image_too_small)")
    max_pixels: int = Field(50_000_000, ge=1, description="width*height from the header above this fails the sample")
    max_side: int = Field(1024, ge=0, description="decoded images are downsized to this longer side (0 = never)")
    max_text_bytes: int = Field(MAX_TEXT_BYTES, ge=1, description="a longer web text is rejected (web_text_too_long)")


class DecodingGroup(Strict):
    """``n`` of an image's samples with their own decoding settings; an unset one is the captioner's."""

    n: int = Field(..., ge=1, description="samples in this group")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, gt=0)
    repetition_penalty: float | None = Field(None, gt=0)
    min_new_tokens: int | None = Field(None, ge=0)
    max_new_tokens: int | None = Field(None, ge=1)
    force_eos_prob: float | None = Field(None, gt=0, le=1)

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}  # only what the group sets


class CaptionerConfig(Strict):
    model: str = Field(..., description="preset in models/, local directory, hub id or open_clip CoCa name")
    revision: str | None = None
    family: Literal["blip", "coca", "git", "image-text-to-text"] | None = Field(
        None,
        description="captioner family (capfilt/modeling/families); default: read from the checkpoint, "
        "refused when ambiguous",
    )
    pretrained: str | None = Field(None, description="coca: open_clip pretrained tag or checkpoint file")
    instruction: str | None = Field(
        None,
        description="image-text-to-text: the user message, rendered with the processor's chat template; "
        "prompt then starts the answer",
    )
    num_captions: int = Field(5, ge=1, le=256, description="K samples per image (default with a schedule: its sum)")
    sample: bool = True
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    temperature: float = Field(1.0, gt=0)
    repetition_penalty: float = Field(1.0, gt=0)
    min_new_tokens: int = Field(5, ge=0)
    max_new_tokens: int = Field(30, ge=1)
    prompt: str = "a picture of "
    force_eos_prob: float | None = Field(
        None,
        gt=0,
        le=1,
        description="LAION-COCO: a caption ends at the first step where the model's unfiltered "
        "end-of-sequence probability exceeds this (checked at every step, before min_new_tokens too)",
    )
    schedule: list[DecodingGroup] | None = Field(
        None,
        min_length=1,
        description="groups of the K samples with their own settings, e.g. LAION-COCO's "
        "[{n: 8, max_new_tokens: 20}, {n: 8, max_new_tokens: 30}, ...]; the n must sum to num_captions",
    )
    batch_size: int | None = Field(None, ge=1, description="images per captioner batch (default: run batch_size)")

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """force_eos_prob and schedule appear only when set: a config without them dumps, and so
        fingerprints, as before they existed (resuming an older run does not refuse)."""
        optional = ("force_eos_prob", "schedule", "family", "pretrained", "instruction")
        return {k: v for k, v in handler(self).items() if k not in optional or v is not None}

    @model_validator(mode="before")
    @classmethod
    def _k_from_schedule(cls, data):
        if isinstance(data, dict) and data.get("num_captions") is None and isinstance(data.get("schedule"), list):
            counts = [g.get("n") for g in data["schedule"] if isinstance(g, dict)]
            if counts and all(isinstance(c, int) for c in counts):
                data = {**data, "num_captions": sum(counts)}
        return data

    @model_validator(mode="after")
    def _lengths(self):
        if self.min_new_tokens > self.max_new_tokens and not self.schedule:
            raise ValueError("min_new_tokens must not exceed max_new_tokens")
        if self.schedule:
            if not self.sample:
                raise ValueError("schedule needs sample: true (greedy decoding writes one caption)")
            total = sum(g.n for g in self.schedule)
            if total != self.num_captions:
                raise ValueError(f"schedule: its groups' n sum to {total}, num_captions is {self.num_captions}")
            for i, g in enumerate(self.schedule):
                lo = self.min_new_tokens if g.min_new_tokens is None else g.min_new_tokens
                hi = self.max_new_tokens if g.max_new_tokens is None else g.max_new_tokens
                if lo > hi:
                    raise ValueError(f"schedule[{i}]: min_new_tokens {lo} exceeds max_new_tokens {hi}")
        return self


class CascadeConfig(Strict):
    """ITC on every text, the costlier ITM only where ITC lies in [itc_low, itc_high]."""

    itc_low: float | None = Field(None, ge=-1, le=1, description="below: rejected on ITC alone (itc_below_cascade)")
    itc_high: float | None = Field(None, ge=-1, le=1, description="above: accepted on ITC alone (no ITM score)")

    @model_validator(mode="after")
    def _ordered(self):
        if self.itc_low is not None and self.itc_high is not None and self.itc_low > self.itc_high:
            raise ValueError(f"filter.cascade: itc_low {self.itc_low} is above itc_high {self.itc_high}")
        return self


class FilterConfig(Strict):
    model: str = Field(..., description="preset, local directory or hub id (BlipForImageTextRetrieval)")
    revision: str | None = None
    max_text_tokens: int = Field(35, ge=4)
    batch_size: int | None = Field(None, ge=1)
    cascade: CascadeConfig | None = Field(None, description="ITC->ITM cascade; none = ITM for every text")


class ClipModel(Strict):
    """One model of the clip chain, and what it passes on to the next one (or to `decide`)."""

    model: str = Field(..., description="preset, local open_clip directory, or open_clip model name")
    pretrained: str | None = Field(None, description="open_clip pretrained tag or checkpoint file")
    min_score: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="a synthetic caption this model scores below this is not passed on (clip_below_min_score)",
    )
    keep_top: int | None = Field(
        None,
        ge=1,
        description="only this model's best keep_top synthetic captions "
        "(of those at or above min_score) are passed on (not_in_clip_top_k)",
    )
    embeddings: Literal["image", "image_text"] | None = Field(
        None,
        description="write this model's L2-normalised image embeddings (image_text: and its caption's text "
        "embeddings) as embeddings/{img_emb,text_emb}/{shard}.npy + embeddings/metadata/{shard}.parquet, "
        "clip-retrieval's layout; the `quality` heads read them; one model of the chain at most",
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return {k: v for k, v in handler(self).items() if k != "embeddings" or v is not None}  # fingerprint as before


class ClipConfig(Strict):
    """A rerank chain of open_clip models: each scores only the texts the one before it passed on
    (the web text always, synthetic captions within its cutoffs); the last one's cosine is `clip`.

    Written as one mapping (``clip: {model: ViT-L-14, pretrained: openai}``: a chain of one, the
    form every recipe had before chains) or as a list in chain order (``clip: [{model: ..,
    keep_top: 5}, {model: .., keep_top: 1}]``), or ``{chain: [...], batch_size: N}``. A chain of
    one dumps (run.json, the fingerprint) as the mapping it was written as."""

    chain: list[ClipModel] = Field(..., min_length=1, description="the models in the order they score")
    batch_size: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _chain_of(cls, data):
        if isinstance(data, list):
            return {"chain": data}
        if isinstance(data, dict) and "chain" not in data:
            link = {k: v for k, v in data.items() if k != "batch_size"}
            return {"chain": [link], **({"batch_size": data["batch_size"]} if "batch_size" in data else {})}
        return data

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        if len(self.chain) > 1:
            return data
        link = data["chain"][0]
        flat = {"model": link["model"], "pretrained": link["pretrained"], "batch_size": data["batch_size"]}
        return {**flat, **{k: link[k] for k in ("min_score", "keep_top", "embeddings") if link.get(k) is not None}}

    @model_validator(mode="after")
    def _one_embedder(self):
        if sum(link.embeddings is not None for link in self.chain) > 1:
            raise ValueError("embeddings: set it on one model of the clip chain at most (one embeddings/ folder)")
        return self

    @property
    def embedder(self) -> int | None:
        """The index of the chain model that writes image embeddings (`embeddings` set), or None."""
        return next((k for k, link in enumerate(self.chain) if link.embeddings is not None), None)

    @property
    def model(self) -> str:
        """The last model of the chain: the one whose cosine is `clip` (and run.json's ``clip``)."""
        return self.chain[-1].model

    @property
    def pretrained(self) -> str | None:
        return self.chain[-1].pretrained


class Thresholds(Strict):
    itm: float | None = Field(None, ge=0, le=1, description="minimum ITM match probability")
    itc: float | None = Field(None, ge=-1, le=1, description="minimum ITC cosine")
    clip: float | None = Field(None, ge=-1, le=1, description="minimum CLIP cosine")


class MinRule(Strict):
    min: float = Field(..., description="a sample whose image scores below this is rejected")


class MaxRule(Strict):
    max: float = Field(..., ge=0, le=1, description="a sample whose image scores above this is rejected")


IMAGE_RULES = ("aesthetic", "punsafe", "pwatermark")  # decide's image rules, in the order they are checked


class DecideConfig(Strict):
    mode: Literal["capfilt", "laion_coco"] = "capfilt"
    aesthetic: MinRule | None = Field(None, description="reject images the aesthetic head scores below min")
    punsafe: MaxRule | None = Field(None, description="reject images the NSFW head's probability puts above max")
    pwatermark: MaxRule | None = Field(None, description="reject images the watermark model puts above max")
    web: Thresholds = Thresholds(itm=0.5)
    synthetic: Thresholds = Thresholds(itm=0.5)
    top_m: int | None = Field(None, ge=1, description="keep at most this many synthetic captions (best first)")
    rank_by: Literal["auto", "clip", "itm", "itc"] = Field("auto", description="auto = clip if computed, else itm")
    select: Literal["best", "prefer_web", "mix"] = Field(
        "best",
        description="which kept text becomes {key}.txt: the best-ranked; the web text when kept; or mix: "
        "the best synthetic caption for a synthetic_share of the samples (drawn per key), the web text for the rest",
    )
    synthetic_share: float | None = Field(
        None,
        ge=0,
        le=1,
        description="select: mix: the share of kept samples whose {key}.txt is their best synthetic caption "
        "(Recap-DataComp: 0.8); the web text stays among the .json's texts when it passed",
    )

    @model_validator(mode="after")
    def _mix(self):
        if (self.select == "mix") != (self.synthetic_share is not None):
            raise ValueError("select: mix and synthetic_share go together (set both, or neither)")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """The image rules appear only when set: a config without them fingerprints as before."""
        return {k: v for k, v in handler(self).items() if k not in (*IMAGE_RULES, "synthetic_share") or v is not None}


class HeadConfig(Strict):
    """A LAION head on the clip chain's image embeddings (a small MLP; no second vision pass)."""

    model: str = Field(..., description="preset in models/, a .safetensors file, or a hub id (repo with the file)")
    revision: str | None = None


class QualityConfig(Strict):
    """Per-image scores from the embedding model's image embeddings (`clip.K.embeddings`)."""

    aesthetic: HeadConfig | None = Field(None, description="LAION improved aesthetic predictor (MLP)")
    punsafe: HeadConfig | None = Field(None, description="LAION CLIP-based NSFW detector")
    prefer: Literal["computed", "input"] = Field(
        "computed", description="when the input already has the column (a LAION sidecar): which value wins"
    )


class WatermarkConfig(Strict):
    """LAION's watermark detector (a timm image classifier) as its own model stage."""

    model: str = Field(..., description="preset in models/, a .safetensors file, or a hub id")
    revision: str | None = None
    batch_size: int | None = Field(None, ge=1)
    prefer: Literal["computed", "input"] = Field(
        "computed", description="when the input already has pwatermark (a LAION sidecar): which value wins"
    )


class ClaimsConfig(Strict):
    """Long captions verified claim by claim (capfilt/claims.py, stages/claims.py): each text is
    split into claims (sentences, then clauses), each claim scored with the filter or the clip
    model against the image, and the text kept, dropped or trimmed to its supported claims."""

    unit: Literal["clause", "sentence"] = Field("clause", description="split into sentences, or into their clauses")
    score: Literal["itm", "itc", "clip"] = Field("itm", description="the score of each claim: filter ITM/ITC or clip")
    threshold: float = Field(..., ge=-1, le=1, description="a claim scoring below this is unsupported")
    policy: Literal["drop", "trim"] = Field(
        "drop", description="a text with an unsupported claim: drop it, or trim it to its supported claims"
    )
    min_claims: int = Field(2, ge=1, description="texts with fewer claims are judged whole, as without this section")
    sources: Literal["all", "web", "synthetic"] = Field("all", description="which texts are verified claim by claim")
    whole_text: bool = Field(
        False,
        description="also apply decide's whole-text thresholds to a text verified claim by claim "
        "(false: its claims judge it; a long text's one score is of its first tokens only)",
    )


class EditConfig(Strict):
    """Caption post-edit (LAION-COCO polished each chosen caption with a grammar-fixing seq2seq
    model): the selected caption of every kept sample is rewritten by a seq2seq model's stock
    ``generate``, greedy or beam search (no sampling). The ledger keeps the original text."""

    model: str = Field(
        ...,
        description="preset, local directory or hub id of a seq2seq model (AutoModelForSeq2SeqLM, "
        "T5 family: google/flan-t5-small)",
    )
    revision: str | None = None
    prompt: str = Field("", description="prefix put before each caption, e.g. 'Fix the grammar: '")
    max_new_tokens: int = Field(40, ge=1, description="longest edited caption, in tokens")
    num_beams: int = Field(1, ge=1, description="1 = greedy; more = beam search")
    batch_size: int | None = Field(None, ge=1, description="captions per generate call (default: the run batch's)")


# RayConfig keys of the per-model actor pools, gone since a Ray worker runs whole shards with
# every model (runners/worker.py): refused with what to set instead, never silently ignored.
REMOVED_RAY_KEYS = {
    **{
        f"{section}_actors": "each Ray worker now holds every model and runs whole shards; "
        "size the pool of workers with ray.min_actors / ray.max_actors"
        for section in ("captioner", "filter", "clip", "edit", "watermark")
    },
    "decode_concurrency": "decoding now runs inside each worker on `decode_threads` threads",
    "max_shards_in_flight": "each worker runs one shard at a time; the pool's size (ray.max_actors) bounds it",
}


class RayConfig(Strict):
    address: str | None = Field(None, description="cluster address; none = start a local Ray")
    min_actors: int = Field(1, ge=1, description="shard workers the pool keeps while shards are left")
    max_actors: int | None = Field(
        None,
        ge=1,
        description="most shard workers; none = as many as the cluster's resources hold, re-read as "
        "it grows (set it above that to let an autoscaler add nodes)",
    )
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per shard worker; fractions share a GPU (0.5 = two)")
    max_task_retries: int = Field(
        3, ge=0, description="retries of a shard whose worker died for good (a restarted worker retries it anyway)"
    )
    max_actor_restarts: int = Field(-1, ge=-1, description="restarts of a dead shard worker (-1 = unlimited)")
    cpus_per_actor: float | None = Field(None, gt=0, description="CPUs reserved per shard worker; none = its `threads`")
    actor_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each shard worker requests, to pin workers to a node type, "
        "e.g. {gpu_node: 0.01}",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray started by us (none = this machine's)")
    object_store_memory: int | None = Field(None, ge=1 << 26, description="bytes, for a local Ray started by us")

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data):
        if isinstance(data, dict):
            for key in data:
                if key in REMOVED_RAY_KEYS:
                    raise ValueError(f"ray.{key} was removed: {REMOVED_RAY_KEYS[key]}")
        return data


def is_url(path: str | os.PathLike) -> bool:
    """Written as a URL (``s3://…``, ``file://…``): recorded and read as given, never through pathlib."""
    return "://" in os.fspath(path)


def absolute_path(path: str) -> str:
    """A local path or shard pattern made absolute (``~`` expanded), so that what a run records
    resolves from any directory; a URL as given."""
    return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


class RunConfig(Strict):
    input: list[str] = Field(default_factory=list, description="shards: paths, globs, {a..b} ranges, fsspec URLs")
    output: str | None = None
    seed: int = 0
    runner: Literal["local", "ray"] = "local"
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    batch_size: int = Field(32, ge=1, description="images per model batch")
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads of each shard worker, the same in every runner (CPU float results "
        "depend on it); none = this machine's CPUs",
    )
    decode_threads: int = Field(2, ge=1, description="threads of each shard worker decoding the next batches")
    self_check: bool = Field(
        True,
        description="each model stage compares its fast path with the stock model on a "
        "small probe when it loads and refuses to start if they disagree",
    )
    decode: DecodeConfig = DecodeConfig()
    captioner: CaptionerConfig | None = None
    filter: FilterConfig | None = None
    clip: ClipConfig | None = None
    decide: DecideConfig = DecideConfig()
    claims: ClaimsConfig | None = Field(None, description="verify long texts claim by claim; none = off")
    edit: EditConfig | None = Field(None, description="rewrite each kept sample's selected caption; none = off")
    quality: QualityConfig | None = Field(None, description="aesthetic / punsafe heads on the image embeddings")
    watermark: WatermarkConfig | None = Field(None, description="pwatermark from a watermark detector")
    ray: RayConfig = RayConfig()

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """quality and watermark appear only when set: a config without them fingerprints as before."""
        return {k: v for k, v in handler(self).items() if k not in ("quality", "watermark", "claims") or v is not None}

    @model_validator(mode="after")
    def _image_scores(self):
        if self.quality is not None and (self.clip is None or self.clip.embedder is None):
            raise ValueError("quality needs image embeddings: set `embeddings: image` on a model of the clip chain")
        needs = {"aesthetic": self.quality and self.quality.aesthetic, "punsafe": self.quality and self.quality.punsafe}
        needs["pwatermark"] = self.watermark
        for rule, stage in needs.items():
            if getattr(self.decide, rule) is not None and stage is None:
                section = "watermark" if rule == "pwatermark" else f"quality.{rule}"
                raise ValueError(f"decide.{rule} is set but no `{section}` model is configured")
        return self

    @model_validator(mode="before")
    @classmethod
    def _input_as_list(cls, data):
        if isinstance(data, dict) and isinstance(data.get("input"), str):
            data = {**data, "input": [data["input"]]}
        if isinstance(data, dict) and isinstance(data.get("input"), list):
            # Local paths made absolute (against this process's directory, where they were typed),
            # URLs kept as given: run.json records them, and `report`, `calibrate` and
            # `rethreshold` run later, from any directory, read the inputs from there.
            data = {**data, "input": [absolute_path(p) if isinstance(p, str) else p for p in data["input"]]}
        return data

    @model_validator(mode="after")
    def _scores_for_thresholds(self):
        needs = {"itm": self.filter, "itc": self.filter, "clip": self.clip}
        for source in ("web", "synthetic"):
            for score, stage in needs.items():
                value = getattr(getattr(self.decide, source), score)
                if value is not None and stage is None:
                    section = "filter" if score != "clip" else "clip"
                    written = score in getattr(self.decide, source).model_fields_set and (
                        source in self.decide.model_fields_set and "decide" in self.model_fields_set
                    )
                    raise ValueError(
                        f"decide.{source}.{score} is set but no `{section}` model is configured (you set it to {value})"
                        if written
                        else f"decide.{source}.{score} defaults to {value}, which needs a `{section}` model, and "
                        f"none is configured: add a `{section}` section, or set decide.{source}.{score}: null"
                    )
        if self.decide.mode == "laion_coco" and (self.captioner is None or self.clip is None):
            raise ValueError("decide.mode laion_coco needs a captioner and a clip model")
        if self.decide.rank_by in ("itm", "itc") and self.filter is None:
            raise ValueError(f"decide.rank_by {self.decide.rank_by} needs a `filter` model")
        if self.decide.rank_by == "clip" and self.clip is None:
            raise ValueError("decide.rank_by clip needs a `clip` model")
        if self.claims is not None:
            section = "clip" if self.claims.score == "clip" else "filter"
            if getattr(self, section) is None:
                raise ValueError(f"claims.score {self.claims.score} needs a `{section}` model")
        return self

    def fingerprint(self) -> str:
        """What decides the outputs: changing any of it makes a resume refuse (`output_settings`)."""
        return hashlib.sha256(json.dumps(output_settings(self.model_dump()), sort_keys=True).encode()).hexdigest()[:16]


# Input list, output path, runner, device, batch sizes, Ray settings and the load-time self-check do
# not change what a shard's outputs are (captions are batch-invariant): not part of the fingerprint.
NOT_OUTPUT_SETTINGS = (
    "input",
    "output",
    "runner",
    "device",
    "batch_size",
    "threads",
    "decode_threads",
    "ray",
    "self_check",
)


def output_settings(data: dict) -> dict:
    """The part of a dumped RunConfig (``model_dump()``, or run.json's "config") that decides the
    outputs: what the fingerprint hashes and what a refused resume lists as changed."""
    data = {k: v for k, v in data.items() if k not in NOT_OUTPUT_SETTINGS}
    for stage in ("captioner", "filter", "clip", "edit", "watermark"):
        if data.get(stage):
            data[stage] = {k: v for k, v in data[stage].items() if k != "batch_size"}
    return data


def flatten(data: dict, prefix: str = "") -> dict:
    """``{"decide": {"web": {"itm": 0.5}}}`` -> ``{"decide.web.itm": 0.5}``."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def format_errors(err: ValidationError) -> str:
    """One line per error: the dotted key, what is wrong, and what the user wrote there."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
            field, sep, rest = msg.partition(": ")
            if sep and field.isidentifier():  # a Strict section's "key: ..." error names its own key
                loc, msg = [*loc, field], rest
        elif e["type"] not in ("extra_forbidden", "missing") and not isinstance(e.get("input"), (dict, list)):
            msg += f", got {_written(e['input'])}"
        lines.append(f"  {'.'.join(loc) or '(top level)'}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def parse_config(data: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(format_errors(err)) from None


def set_dotted(data: dict, assignment: str) -> None:
    """Apply one `--set a.b.c=value` override (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if isinstance(node, list):  # a list in the config (the clip chain): `clip.0.keep_top=3`
            node = node[_index(key, part, node)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {key}: {part} is not a section")
    value = yaml.load(raw, Loader=_UniqueKeyLoader)  # the recipe's own rules: `--set optim.lr=1e-4` is a number
    if isinstance(node, list):
        node[_index(key, parts[-1], node)] = value
    else:
        node[parts[-1]] = value


def _index(key: str, part: str, items: list) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"--set {key}: {part!r} is not an index of that list (0..{len(items) - 1})")
    return int(part)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key written twice in one mapping is an error naming both lines
    (PyYAML keeps the last value silently: ``seed: 0`` then ``seed: 1`` would run seed 1)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if first != key_node.start_mark.line + 1:
                raise ConfigError(
                    f"{key_node.start_mark.name}: line {key_node.start_mark.line + 1}: duplicate key {key!r} "
                    f"(first set on line {first}); remove one of them"
                )
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads `1e-4` as a string because it has no dot; every user means a number, as
# YAML 1.2 says. Strict types refuse a string where a number belongs, so read it as YAML 1.2 does
# (a quoted "1e-4" stays a string and is refused).
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """A YAML mapping (empty when path is None) with `--set key=value` overrides applied."""
    data: dict = {}
    if path is not None:
        path = find_recipe(path)
        try:
            with open(path, encoding="utf-8") as f:  # a stream: YAML's marks name the file
                data = yaml.load(f, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if data is None:  # an empty file (or only comments): say so, not what its defaults lack
            raise ConfigError(f"{path}: the file is empty (no keys); a recipe needs at least its models' sections")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, not {_written(data)}")
    for assignment in overrides:
        set_dotted(data, assignment)
    return data


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    return parse_config(read_yaml(path, overrides))
