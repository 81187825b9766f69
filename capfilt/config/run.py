"""The run recipe as a whole (`RunConfig`): its sections, the checks that span sections, and what
of it decides the outputs (the fingerprint)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_serializer, model_validator

from capfilt.config.base import ConfigError, Strict, absolute_path, format_errors
from capfilt.config.decoding import CaptionerConfig
from capfilt.config.reading import read_yaml
from capfilt.config.sections import (
    MODEL_SECTIONS,
    SCORE_SECTION,
    SOURCES,
    ClaimsConfig,
    ClipConfig,
    DecideConfig,
    DecodeConfig,
    EditConfig,
    FilterConfig,
    QualityConfig,
    RayConfig,
    WatermarkConfig,
    laion_mode,
)


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
        for source in SOURCES:
            for score, section in SCORE_SECTION.items():
                value = getattr(getattr(self.decide, source), score)
                if value is not None and getattr(self, section) is None:
                    written = score in getattr(self.decide, source).model_fields_set and (
                        source in self.decide.model_fields_set and "decide" in self.model_fields_set
                    )
                    raise ValueError(
                        f"decide.{source}.{score} is set but no `{section}` model is configured (you set it to {value})"
                        if written
                        else f"decide.{source}.{score} defaults to {value}, which needs a `{section}` model, and "
                        f"none is configured: add a `{section}` section, or set decide.{source}.{score}: null"
                    )
        if laion_mode(self.decide) and (self.captioner is None or self.clip is None):
            raise ValueError("decide.mode laion_coco needs a captioner and a clip model")
        rank = SCORE_SECTION.get(self.decide.rank_by)  # auto: whatever is computed
        if rank is not None and getattr(self, rank) is None:
            raise ValueError(f"decide.rank_by {self.decide.rank_by} needs a `{rank}` model")
        if self.claims is not None:
            section = SCORE_SECTION[self.claims.score]
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
    for stage in MODEL_SECTIONS:
        if data.get(stage):
            data[stage] = {k: v for k, v in data[stage].items() if k != "batch_size"}
    return data


def parse_config(data: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(format_errors(err)) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    return parse_config(read_yaml(path, overrides))
