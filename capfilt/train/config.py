"""Typed training configs: `capfilt train pretrain | finetune-captioner | finetune-filter CONFIG`.

The sub-command sets `task`; the task decides the default loss weights and what is exported.
Unknown keys are errors that name the key (same style and helpers as capfilt.config).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from capfilt.config import DEFAULT_PROMPT, ConfigError, Strict, format_errors, read_yaml
from capfilt.modeling.med import MedOptions
from capfilt.train import TASKS  # noqa: F401 - re-exported: the tasks, as train configs name them

DEFAULT_LOSSES = {
    "pretrain": {"itc": 1.0, "itm": 1.0, "lm": 1.0},
    "finetune-captioner": {"itc": 0.0, "itm": 0.0, "lm": 1.0},
    "finetune-filter": {"itc": 1.0, "itm": 1.0, "lm": 0.0},
}
DEFAULT_EXPORTS = {
    "pretrain": ["med", "captioner", "filter"],
    "finetune-captioner": ["med", "captioner"],
    "finetune-filter": ["med", "filter"],
}
# Keys a resumed run may change: they do not change what is computed.
RESUME_FREE = ("output", "log_every", "save_every", "keep_checkpoints", "num_workers", "workers", "ray", "device")


class ModelInit(Strict):
    """Where the weights start. Exactly one of: preset (random init), med, or captioner/filter."""

    preset: str | None = Field(None, description="architecture + tokenizer from models/, seeded random init")
    med: str | None = Field(None, description="a MED directory written by `capfilt train` (OUTPUT/med)")
    captioner: str | None = Field(None, description="stock BlipForConditionalGeneration: preset, dir or hub id")
    filter: str | None = Field(None, description="stock BlipForImageTextRetrieval: preset, dir or hub id")

    @model_validator(mode="after")
    def _one_source(self):
        chosen = [
            n
            for n, v in (
                ("preset", self.preset),
                ("med", self.med),
                ("captioner/filter", self.captioner or self.filter),
            )
            if v
        ]
        if len(chosen) != 1:
            raise ValueError(f"set exactly one of preset, med, or captioner/filter (got {chosen or 'none'})")
        return self


class DataSource(Strict):
    kind: Literal["shards", "coco"]
    path: str | list[str] = Field(..., description="shards: paths/globs/{a..b} ranges; coco: captions JSON")
    images: str | None = Field(None, description="coco: image root (default: the JSON's folder)")


class MedSection(MedOptions):
    """The MED's options (`modeling.med.MedOptions`, one definition) and how alpha is scheduled."""

    alpha_warmup_steps: int = Field(1000, ge=0, description="alpha ramps up linearly over these steps (BLIP)")


class Losses(Strict):
    itc: float | None = Field(None, ge=0, description="None = the task's default")
    itm: float | None = Field(None, ge=0)
    lm: float | None = Field(None, ge=0)


class Optim(Strict):
    lr: float = Field(1e-5, gt=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0)


class Augment(Strict):
    """Training-time image augmentation, drawn per (seed, epoch, item): resume-safe and the same for
    any worker count. BLIP pretrains with random resized crops of scale (0.5, 1) and horizontal
    flips; both change what a caption stating positions says, so both are off unless asked for."""

    crop_scale: tuple[float, float] | None = Field(
        None, description="random square crop whose area is this share of the image's, resized back"
    )
    hflip: bool = Field(False, description="mirror half the images (wrong for captions that say left/right)")

    @model_validator(mode="after")
    def _scale(self):
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"augment.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        return self


class RaySection(Strict):
    address: str | None = Field(None, description="cluster address; none = start a local Ray")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)


class TrainConfig(Strict):
    task: Literal["pretrain", "finetune-captioner", "finetune-filter"]
    output: str | None = None
    model: ModelInit
    data: list[DataSource] = Field(..., min_length=1)
    seed: int = 0
    steps: int = Field(..., ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=2, description="samples per micro-batch, over all workers together")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    optim: Optim = Optim()
    losses: Losses = Losses()
    med: MedSection = MedSection()
    prompt: str = DEFAULT_PROMPT
    max_text_tokens: int = Field(35, ge=4, description="encoder (ITC/ITM) text length, as the filter")
    max_caption_tokens: int = Field(40, ge=4, description="decoder length, prompt included")
    augment: Augment = Augment()
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = Field("bf16", description="bf16 autocast on GPU; CPU always computes fp32")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per training worker")
    workers: int = Field(1, ge=1, description="training workers; >1 runs DDP under Ray Train")
    ray: RaySection = RaySection()
    log_every: int = Field(10, ge=1)
    save_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    export: list[Literal["med", "captioner", "filter"]] | None = Field(None, description="None = the task's")

    @model_validator(mode="after")
    def _checks(self):
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of workers {self.workers}")
        if self.batch_size // self.workers < 2:
            raise ValueError("each worker needs at least 2 samples per micro-batch (ITM negatives)")
        if not any(self.loss_weights().values()):
            raise ValueError("every loss weight is 0: nothing to train")
        return self

    def loss_weights(self) -> dict[str, float]:
        base = DEFAULT_LOSSES[self.task]
        return {k: float(base[k] if getattr(self.losses, k) is None else getattr(self.losses, k)) for k in base}

    def exports(self) -> list[str]:
        return list(DEFAULT_EXPORTS[self.task] if self.export is None else self.export)

    def fingerprint_data(self) -> dict:
        return self.model_dump(exclude=set(RESUME_FREE))

    def changed_since(self, saved: dict) -> list[str]:
        """Keys whose value differs from a saved `fingerprint_data`. The saved data is read through
        this version's schema first, so a key added since (at its default) is no change."""
        try:
            before = TrainConfig.model_validate({**saved, "task": saved.get("task", self.task)}).fingerprint_data()
        except ValidationError:
            before = saved
        before, now = json.loads(json.dumps(before)), json.loads(json.dumps(self.fingerprint_data()))
        return sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint_data(), sort_keys=True).encode()).hexdigest()[:16]


def parse_train_config(data: dict) -> TrainConfig:
    try:
        return TrainConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(format_errors(err)) from None


def load_train_config(
    path: str | Path | None, task: str, overrides: list[str] = (), output: str | None = None
) -> TrainConfig:
    data = read_yaml(path, overrides)
    if data.get("task", task) != task:
        raise ConfigError(f"config says task {data['task']!r} but the command is `train {task}`")
    data["task"] = task
    if output:
        data["output"] = output
    config = parse_train_config(data)
    if not config.output:
        raise ConfigError("no output directory: set `output` in the config or pass --output")
    return config
