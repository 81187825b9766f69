"""The sections of a run recipe, one pydantic model each (`decode`, `captioner`, `filter`, `clip`,
`decide`, `quality`, `watermark`, `claims`, `edit`, `ray`)."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_serializer, model_validator

from capfilt.config.base import Strict

DEDUP_THRESHOLD = 0.95  # `capfilt dedup`: image embedding cosine at or above which two images are near duplicates
MAX_TEXT_BYTES = 4096  # web texts longer than this (UTF-8 bytes) are rejected: decode.max_text_bytes


class DecodeConfig(Strict):
    min_side: int = Field(16, ge=1, description="smaller image side below this fails the sample (image_too_small)")
    max_pixels: int = Field(50_000_000, ge=1, description="width*height from the header above this fails the sample")
    max_side: int = Field(1024, ge=0, description="decoded images are downsized to this longer side (0 = never)")
    max_text_bytes: int = Field(MAX_TEXT_BYTES, ge=1, description="a longer web text is rejected (web_text_too_long)")


class CascadeConfig(Strict):
    """ITC on every text, the costlier ITM only where ITC lies in [itc_low, itc_high]."""

    itc_low: float | None = Field(None, ge=-1, le=1, description="below: rejected on ITC alone (itc_below_cascade)")
    itc_high: float | None = Field(None, ge=-1, le=1, description="above: accepted on ITC alone (no ITM score)")

    @model_validator(mode="after")
    def _ordered(self):
        if self.itc_low is not None and self.itc_high is not None and self.itc_low > self.itc_high:
            raise ValueError(f"filter.cascade: itc_low {self.itc_low} is above itc_high {self.itc_high}")
        return self

    def verdict(self, itc: float) -> str:
        """ "below" / "above" (decided on ITC alone) or "band" (ITM decides); an open bound never decides."""
        if self.itc_low is not None and itc < self.itc_low:
            return "below"
        if self.itc_high is not None and itc > self.itc_high:
            return "above"
        return "band"

    def needs_itm(self, itc):
        """Which of an array of ITC cosines fall in the band, where the filter computes ITM."""
        import numpy as np  # here: reading a recipe does not need it

        inside = np.ones(np.shape(itc), dtype=bool)
        if self.itc_low is not None:
            inside &= itc >= self.itc_low
        if self.itc_high is not None:
            inside &= itc <= self.itc_high
        return inside


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


# The score words, each declared once here (records, stages, report and calibrate import them):
SCORES = tuple(Thresholds.model_fields)  # a text's scores, as decide thresholds them: itm, itc, clip
SCORE_SECTION = {"itm": "filter", "itc": "filter", "clip": "clip"}  # the model section that computes each
FILTER_SCORES = tuple(s for s in SCORES if SCORE_SECTION[s] == "filter")  # the filter's two heads
AUTO_RANK = ("clip", "itm", "itc")  # decide.rank_by auto: the first of these the sample's texts have
RANK_BY = ("auto", *AUTO_RANK)


class MinRule(Strict):
    min: float = Field(..., description="a sample whose image scores below this is rejected")


class MaxRule(Strict):
    max: float = Field(..., ge=0, le=1, description="a sample whose image scores above this is rejected")


IMAGE_RULES = ("aesthetic", "punsafe", "pwatermark")  # decide's image rules, in the order they are checked
LAION_MODE = "laion_coco"  # decide.mode: LAION-COCO's policy and its output schema


class DecideConfig(Strict):
    mode: Literal["capfilt", LAION_MODE] = "capfilt"
    aesthetic: MinRule | None = Field(None, description="reject images the aesthetic head scores below min")
    punsafe: MaxRule | None = Field(None, description="reject images the NSFW head's probability puts above max")
    pwatermark: MaxRule | None = Field(None, description="reject images the watermark model puts above max")
    web: Thresholds = Thresholds(itm=0.5)
    synthetic: Thresholds = Thresholds(itm=0.5)
    top_m: int | None = Field(None, ge=1, description="keep at most this many synthetic captions (best first)")
    rank_by: Literal[RANK_BY] = Field("auto", description="auto = clip if computed, else itm")
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


def laion_mode(decide) -> bool:
    """decide.mode is laion_coco: for a `DecideConfig` or its dump (run.json's ``config.decide``)."""
    mode = (decide or {}).get("mode") if isinstance(decide, dict) or decide is None else decide.mode
    return mode == LAION_MODE


SOURCES = tuple(k for k, f in DecideConfig.model_fields.items() if f.annotation is Thresholds)  # web, synthetic


def _side(rule: str) -> str:
    """Which side of its limit an image rule keeps an image on: its section's one key (`MinRule`'s
    "min", `MaxRule`'s "max")."""
    kind = next(a for a in get_args(DecideConfig.model_fields[rule].annotation) if a is not type(None))
    return next(iter(kind.model_fields))


IMAGE_RULE_SIDES = {rule: _side(rule) for rule in IMAGE_RULES}  # aesthetic: min, punsafe / pwatermark: max


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
    score: Literal[SCORES] = Field("itm", description="the score of each claim: filter ITM/ITC or clip")
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


# The sections of a model stage (stages.MODEL_STAGES): each loads its model once per shard worker.
MODEL_SECTIONS = ("captioner", "filter", "clip", "watermark", "edit")

# RayConfig keys of the per-model actor pools, gone since a Ray worker runs whole shards with
# every model (runners/worker.py): refused with what to set instead, never silently ignored.
REMOVED_RAY_KEYS = {
    **{
        f"{section}_actors": "each Ray worker now holds every model and runs whole shards; "
        "size the pool of workers with ray.min_actors / ray.max_actors"
        for section in MODEL_SECTIONS
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
