"""The loop recipe's schema (`capfilt loop CONFIG`): data or the synthetic world, the start
checkpoints, the step sections, calibration and Ray; parsed and checked whole at load."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from capfilt.config import FILTER_SCORES, ConfigError, Strict, absolute_path, format_errors, read_yaml

ABLATIONS = ("none", "filter", "captioner", "captioner_filter")
TRAIN_SECTIONS = {
    "pretrain": "pretrain",
    "finetune-captioner": "finetune_captioner",
    "finetune-filter": "finetune_filter",
}
# Keys of the step sections that the loop itself fills in; a recipe that sets one is refused
# rather than silently overridden.
LOOP_FILLS = {"train": ("task", "output", "model", "data"), "capfilt": ("input", "output")}


class WorldSection(Strict):
    """The synthetic shapes world (ground truth known): the demo's data, used instead of `data`."""

    web: int = Field(1200, ge=10)
    clean: int = Field(300, ge=10)
    test: int = Field(150, ge=10)
    noise: float = Field(0.4, ge=0, le=1)
    image_size: int = Field(64, ge=16)
    per_shard: int = Field(300, ge=1)
    captions_per_image: int = Field(3, ge=1)


class DataPaths(Strict):
    """Real data. Local paths are taken relative to the directory the loop is started from."""

    web: list[str] = Field(..., description="noisy web shards: paths, globs, {a..b} ranges or fsspec URLs")
    clean: str = Field(..., description="clean set: COCO captions JSON or BLIP's [{image, caption}] list")
    clean_images: str | None = Field(None, description="image root of `clean` (default: the JSON's folder)")
    test: str = Field(..., description="held-out test set, same formats as `clean`")
    test_images: str | None = Field(None, description="image root of `test` (default: the JSON's folder)")

    @field_validator("web", mode="before")
    @classmethod
    def _one_pattern(cls, value):
        return [value] if isinstance(value, str) else value


class StartCheckpoints(Strict):
    """Stock checkpoints round 0 starts from: BLIP's published captioner and filter (or any
    directory in their layout). Each is a preset, a local directory or a hub id (``org/name@revision``
    pins a revision), loaded with `from_pretrained` as `capfilt run` loads its models."""

    captioner: str | None = Field(
        None, description="BlipForConditionalGeneration, e.g. Salesforce/blip-image-captioning-large"
    )
    filter: str | None = Field(None, description="BlipForImageTextRetrieval, e.g. Salesforce/blip-itm-large-coco")

    @model_validator(mode="after")
    def _some(self):
        if not (self.captioner or self.filter):
            raise ValueError("start_med needs a captioner and/or a filter checkpoint")
        return self


class CalibrationSection(Strict):
    """Choose the ITM thresholds each round on a small labelled set instead of fixed values."""

    samples: int = Field(200, ge=10, description="labelled synthetic samples (web texts half wrong)")
    noise: float = Field(0.5, gt=0, lt=1)
    beta: float = Field(0.5, gt=0, description="F-beta; < 1 favours precision")
    min_precision: float | None = Field(None, gt=0, le=1)
    score: Literal[(*FILTER_SCORES, "auto")] = Field(
        "itm", description="filter score to threshold; auto = whichever separates the labelled set better"
    )


class LoopRaySection(Strict):
    """Ray settings of a loop whose `runner` is ray. ``address`` means what it means in a run
    recipe's `ray` section: the cluster to join; none = start a local Ray."""

    address: str | None = Field(
        None,
        description="runner ray: the cluster to join, auto (a cluster node, `ray job submit`) or HOST:6379; "
        "none = start a Ray on this machine (as in `capfilt run`)",
    )
    train_workers: int = Field(1, ge=1, description="Ray Train workers (DDP) per training step")
    use_gpu: bool = Field(False, description="one GPU per training worker")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per training worker (its torch threads)")


class LoopConfig(Strict):
    output: str | None = None
    seed: int = 0
    data: DataPaths | None = Field(None, description="your web shards, clean and test sets")
    world: WorldSection | None = Field(None, description="or: the synthetic world (the demo)")
    start_med: str | StartCheckpoints | None = Field(
        None,
        description="round 0 starts here instead of pretraining: a MED directory (`capfilt train` "
        "OUTPUT/med) or {captioner, filter} stock checkpoints",
    )
    preset: str | None = Field(None, description="architecture + tokenizer (models/) of a freshly initialised MED")
    retrain_from: Literal["preset", "start_med"] | None = Field(
        None,
        description="what each round's pretraining starts from: a fresh `preset` MED (BLIP) or the "
        "start checkpoints; none = start_med when it is given, else preset",
    )
    ablation: Literal["none", "filter", "captioner", "captioner_filter"] = "captioner_filter"
    max_rounds: int = Field(1, ge=1)
    min_improvement: float = Field(1.0, ge=0, description="recall@1 points a round must add to go on")
    pretrain: dict = Field(default_factory=dict, description="`capfilt train pretrain` keys")
    finetune_captioner: dict = Field(default_factory=dict, description="`capfilt train finetune-captioner` keys")
    finetune_filter: dict = Field(default_factory=dict, description="`capfilt train finetune-filter` keys")
    capfilt: dict = Field(default_factory=dict, description="`capfilt run` keys (input, output, models: the loop's)")
    eval_k: int = Field(256, ge=1, description="ITC candidates re-ranked by ITM in the test recall (BLIP: 256)")
    calibration: CalibrationSection | None = None
    parallel_finetune: bool = Field(
        False,
        description="fine-tune captioner and filter at the same time, in two processes (they are "
        "independent; on a CPU machine each takes half the cores)",
    )
    runner: Literal["local", "ray"] = Field(
        "local",
        description="where the steps run, as `capfilt run`'s runner: local (CapFilt with the local runner, "
        "training in this process) or ray (CapFilt on the Ray runner, training on ray.train_workers Ray Train "
        "workers, on the cluster at ray.address)",
    )
    ray: LoopRaySection = LoopRaySection()

    @model_validator(mode="before")
    @classmethod
    def _address_without_runner(cls, data):
        """A recipe written when ``ray.address`` alone turned Ray on (``local`` for a Ray on this
        machine): refused with what to write, never run in-process against the author's intent."""
        ray = data.get("ray") if isinstance(data, dict) else None
        if isinstance(ray, dict) and ray.get("address") is not None and "runner" not in data:
            address = ray["address"]
            keep = "leave ray.address out" if address == "local" else f"keep ray.address: {address}"
            raise ValueError(
                f"ray: address {address} no longer turns Ray on in a loop recipe (it names the cluster, as in a "
                f"run recipe; none = start a local Ray): write `runner: ray` and {keep}, or `runner: local` "
                "to run every step in this process"
            )
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if (self.data is None) == (self.world is None):
            raise ValueError(
                "give `data` (your web shards, clean and test sets) or `world` (the synthetic "
                "demo world), " + ("not both" if self.data else "one of them")
            )
        if self.calibration and self.world is None:
            raise ValueError(
                "calibration scores a labelled split of the synthetic world; with `data`, set the "
                "thresholds under capfilt.decide (`capfilt calibrate` helps pick them)"
            )
        if self.retrain_from == "start_med" and self.start_med is None:
            raise ValueError("retrain_from start_med needs start_med")
        if self.preset is None and (self.start_med is None or self.retrain_from == "preset"):
            raise ValueError(
                "preset: needed to pretrain a fresh MED (round 0 without start_med, or "
                "retrain_from: preset); e.g. tiny-blip"
            )
        return self

    def start_init(self) -> dict | None:
        """`capfilt train`'s `model:` for the start checkpoints (None: round 0 pretrains)."""
        if self.start_med is None:
            return None
        if isinstance(self.start_med, str):
            return {"med": self.start_med}
        return self.start_med.model_dump(exclude_none=True)

    def retrain_init(self) -> dict:
        """`model:` of each round's pretraining."""
        source = self.retrain_from or ("start_med" if self.start_med is not None else "preset")
        return self.start_init() if source == "start_med" else {"preset": self.preset}


def role_init(init: dict, role: str) -> dict:
    """Where the fine-tuning of `role` starts. From stock checkpoints each starts from its own: one
    MED cannot hold both published models (they were fine-tuned apart, so their ViTs, cross-attention
    and feed-forward weights differ, which the MED shares), and the MED built from a captioner alone
    computes exactly that captioner's logits, the one from a filter alone that filter's scores."""
    if "med" in init or "preset" in init or not init.get(role):
        return init
    return {role: init[role]}


def absolute_data(cfg: LoopConfig) -> LoopConfig:
    """Local data paths made absolute: the steps' run.json and train_config.json must resolve from
    any directory (`capfilt report` re-reads the input shards)."""
    if cfg.data is None:
        return cfg

    def absolute(p: str | None) -> str | None:
        return None if p is None else absolute_path(p)

    d = cfg.data
    data = d.model_copy(
        update={
            "web": [absolute(p) for p in d.web],
            "clean": absolute(d.clean),
            "test": absolute(d.test),
            "clean_images": absolute(d.clean_images),
            "test_images": absolute(d.test_images),
        }
    )
    return cfg.model_copy(update={"data": data})


def parse_loop_config(data: dict) -> LoopConfig:
    try:
        cfg = LoopConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(format_errors(err)) from None
    from capfilt.loop.steps import check_steps  # steps build on this schema

    check_steps(cfg)
    return cfg


def load_loop_config(path: str | Path, overrides: list[str] = ()) -> LoopConfig:
    return parse_loop_config(read_yaml(path, overrides))
