"""`capfilt loop CONFIG`: BLIP's bootstrap rounds, resumable, with the ablations as configuration.

round 0   pretrain a MED on the noisy web data, or start from given checkpoints (`start_med`: a MED
          directory, or BLIP's published captioner and filter)                      -> eval
round r   fine-tune a captioner (LM) and a filter (ITC+ITM) from the last MED on the clean set,
          CapFilt the web shards with them, pretrain a MED on the bootstrapped data plus the clean
          set (a fresh `preset` MED, or the start checkpoints again: `retrain_from`)   -> eval
Stop when a round no longer improves test recall@1 by `min_improvement` points.

Every step writes its own folder under OUTPUT/round-N/ and is skipped on resume when complete;
OUTPUT/state.json records each round's metrics. A step's config is its loop section (`pretrain`,
`finetune_captioner`, `finetune_filter`: `capfilt train` keys; `capfilt`: `capfilt run` keys) plus
what the loop fills in (output, data, models, the loop's seed, calibrated thresholds); no other
value is added, so the defaults are those of `capfilt train` and `capfilt run` (the real
recipe's, pipelines/loop-blip.yaml); the demo's small settings are in pipelines/demo/loop.yaml.
Every step's config is built once at load, so a typo in any section fails before round 0 trains.

Where the steps run: without `ray.address`, in this process (CapFilt with the local runner,
training in-process on this machine's GPU or CPU). With it, CapFilt steps run on the Ray runner
(actor settings under `capfilt.ray`) and training steps on `ray.train_workers` Ray Train workers.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from capfilt.config import ConfigError, RunConfig, Strict, format_errors, read_yaml

log = logging.getLogger(__name__)

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
    score: Literal["itm", "itc", "auto"] = Field(
        "itm", description="filter score to threshold; auto = whichever separates the labelled set better"
    )


class LoopRaySection(Strict):
    """Run the loop's steps on Ray. Without an address nothing uses Ray (unlike `capfilt run`,
    whose `ray.address: none` starts a local Ray): give `local` for a Ray on this machine."""

    address: str | None = Field(
        None,
        description="auto (a cluster node, `ray job submit`), HOST:6379, or local; "
        "none = run every step in this process",
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
    ray: LoopRaySection = LoopRaySection()

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


def _errors(err: ValidationError, section: str) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in (section, *e["loc"]))
        lines.append(f"  {where}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}")
    return "invalid config:\n" + "\n".join(lines)


def train_step_config(cfg: LoopConfig, task: str, out: Path, model: dict, data: list[dict]):
    """The `capfilt train` config of one training step: its loop section plus output, model and
    data; with `ray.address`, the Ray Train settings (the section's own `workers` / `ray` win)."""
    from capfilt.train.config import TrainConfig

    section = dict(getattr(cfg, TRAIN_SECTIONS[task]))
    if cfg.ray.address:
        r = cfg.ray
        section = {
            "workers": r.train_workers,
            **section,
            "ray": {
                "address": r.address,
                "use_gpu": r.use_gpu,
                "cpus_per_worker": r.cpus_per_worker,
                **(section.get("ray") or {}),
            },
        }
    values = {"seed": cfg.seed, **section, "task": task, "output": str(out), "model": model, "data": data}
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as err:
        raise ConfigError(_errors(err, TRAIN_SECTIONS[task])) from None


def capfilt_step_config(
    cfg: LoopConfig,
    out: Path,
    web: list[str],
    captioner: str | None,
    filter_: str | None,
    thresholds: dict | None = None,
    rank_by: str | None = None,
) -> RunConfig:
    """The `capfilt run` config of one CapFilt step: the `capfilt` section with the round's models
    (no captioner / no filter under the ablations), inputs and output; with `ray.address`, the Ray
    runner on that cluster."""
    data = {"seed": cfg.seed, **json.loads(json.dumps(cfg.capfilt)), "input": web, "output": str(out)}
    if cfg.ray.address:
        data.setdefault("runner", "ray")
        data["ray"] = {"address": cfg.ray.address, **(data.get("ray") or {})}
    if captioner:
        data["captioner"] = {**data.get("captioner", {}), "model": captioner}
    else:
        data.pop("captioner", None)
    if filter_:
        data["filter"] = {**data.get("filter", {}), "model": filter_}
        if thresholds:
            decide = dict(data.get("decide", {}))
            for source, values in thresholds.items():
                decide[source] = {**decide.get(source, {}), **values}
            if rank_by:
                decide.setdefault("rank_by", rank_by)
            data["decide"] = decide
    else:  # no filter: every text is kept, and nothing is ranked by a filter score
        data.pop("filter", None)
        data["decide"] = {**data.get("decide", {}), "web": {}, "synthetic": {}}
        if data["decide"].get("rank_by") in ("itm", "itc"):
            data["decide"]["rank_by"] = "auto"
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_errors(err, "capfilt")) from None


def check_steps(cfg: LoopConfig) -> None:
    """Build every step's config with placeholder paths: a bad key in any section fails now, not
    after hours of training. The same functions build the configs the steps run with."""
    problems = [
        f"  {name}.{key}: set by the loop; remove it"
        for kind, keys in LOOP_FILLS.items()
        for name in (TRAIN_SECTIONS.values() if kind == "train" else ("capfilt",))
        for key in keys
        if key in getattr(cfg, name)
    ]
    for stage in ("captioner", "filter"):
        if isinstance(cfg.capfilt.get(stage), dict) and "model" in cfg.capfilt[stage]:
            problems.append(f"  capfilt.{stage}.model: set by the loop (the round's fine-tuned {stage}); remove it")
    if "clip" in cfg.capfilt:
        problems.append(
            "  capfilt.clip: the loop's CapFilt scores with its own filter; a CLIP rerank is not "
            "part of it (run `capfilt run` with a clip section on the loop's outputs instead)"
        )
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))
    out, web, coco = Path("<output>"), ["<web shards>"], [{"kind": "coco", "path": "<clean set>"}]
    start, shards = cfg.start_init(), [{"kind": "shards", "path": web}]
    if start is None:
        train_step_config(cfg, "pretrain", out, {"preset": cfg.preset}, shards)
    train_step_config(cfg, "pretrain", out, cfg.retrain_init(), shards + coco)
    init = start or {"med": "<MED>"}
    train_step_config(cfg, "finetune-captioner", out, role_init(init, "captioner"), coco)
    train_step_config(cfg, "finetune-filter", out, role_init(init, "filter"), coco)
    for ablation in ("filter", "captioner", "captioner_filter"):
        capfilt_step_config(
            cfg,
            out,
            web,
            "<captioner>" if ablation != "filter" else None,
            "<filter>" if ablation != "captioner" else None,
        )
    if cfg.calibration:
        capfilt_step_config(cfg, out, web, "<captioner>", "<filter>", {"web": _OPEN, "synthetic": _OPEN})


def _absolute(cfg: LoopConfig) -> LoopConfig:
    """Local data paths made absolute: the steps' run.json and train_config.json must resolve from
    any directory (`capfilt report` re-reads the input shards)."""
    if cfg.data is None:
        return cfg

    def absolute(p: str | None) -> str | None:
        return p if p is None or "://" in p else os.path.abspath(p)

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
    check_steps(cfg)
    return cfg


def load_loop_config(path: str | Path, overrides: list[str] = ()) -> LoopConfig:
    return parse_loop_config(read_yaml(path, overrides))


class State:
    def __init__(self, out: Path):
        self.path = out / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"rounds": []}

    def round(self, n: int, ablation: str = "-") -> dict | None:
        return next((r for r in self.data["rounds"] if r["round"] == n and r["ablation"] == ablation), None)

    def save_round(self, record: dict) -> None:
        same = (record["round"], record["ablation"])
        self.data["rounds"] = [r for r in self.data["rounds"] if (r["round"], r["ablation"]) != same] + [record]
        self.data["rounds"].sort(
            key=lambda r: (r["round"], ABLATIONS.index(r["ablation"]) if r["ablation"] in ABLATIONS else -1)
        )
        tmp = self.path.with_suffix(".json.tmp-w")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def make_world(cfg: LoopConfig, out: Path) -> DataPaths:
    """Write the synthetic world once (web shards, clean and test COCO sets) and return its paths."""
    from capfilt import synthetic

    root = out / "world"
    done = root / "_done"
    w = cfg.world
    if not done.is_file():
        web = synthetic.make_split("web", w.web, seed=cfg.seed, noise_share=w.noise, image_size=w.image_size)
        synthetic.write_shards(root / "web", web, per_shard=w.per_shard)
        for name, n in (("clean", w.clean), ("test", w.test)):
            split = synthetic.make_split(name, n, seed=cfg.seed, image_size=w.image_size)
            synthetic.write_coco(root / name, split, captions_per_image=w.captions_per_image)
        done.write_text("")
    return DataPaths(
        web=[str(p) for p in sorted((root / "web").glob("*.tar"))],
        clean=str(root / "clean" / "captions.json"),
        test=str(root / "test" / "captions.json"),
    )


def _train(cfg: LoopConfig, task: str, out: Path, model: dict, data: list[dict], threads: int | None = None) -> dict:
    """Run one training step of the loop (skipped when its exports exist); returns the export dirs.
    More than one worker (`ray.train_workers`, or the section's `workers`) runs it on Ray Train, as
    `capfilt train` does."""
    config = train_step_config(cfg, task, out, model, data)
    if (out / "outputs.json").is_file():
        saved = json.loads((out / "train_config.json").read_text())["fingerprint_data"]
        if config.changed_since(saved):
            raise ConfigError(f"{out} was trained under a different config; use a new loop --output")
        return json.loads((out / "outputs.json").read_text())
    if config.workers > 1:
        from capfilt.runners.ray.train import train_ray

        return train_ray(config, resume=True)["outputs"]
    from capfilt.train.loop import train

    if threads:
        import torch

        torch.set_num_threads(threads)
    result = train(config, resume=True, progress=True)
    return result["outputs"]


def _evaluate(filter_dir: str, captioner_dir: str | None, test: str, k: int, images: str | None = None) -> dict:
    from capfilt.eval import evaluate
    from capfilt.train.data import load_coco

    result = evaluate(load_coco(test, images), filter=filter_dir, captioner=captioner_dir, k_test=k)
    itm = result["retrieval"]["itm"]
    metrics = {
        "r1": (itm["txt_r1"] + itm["img_r1"]) / 2,
        "txt_r1": itm["txt_r1"],
        "img_r1": itm["img_r1"],
        "itc_r1": (result["retrieval"]["itc"]["txt_r1"] + result["retrieval"]["itc"]["img_r1"]) / 2,
    }
    if "captioning" in result:
        metrics.update(bleu4=result["captioning"]["bleu4"], cider=result["captioning"]["cider"])
    return metrics


def _eval_round(cfg: LoopConfig, paths: DataPaths, filter_: str, captioner: str | None) -> dict:
    kw = {"images": paths.test_images} if paths.test_images else {}
    return _evaluate(filter_, captioner, paths.test, cfg.eval_k, **kw)


_OPEN = {"itm": 0.0, "itc": -1.0}  # keep everything: the calibration run only collects scores


def _calibrate(cfg: LoopConfig, rd: Path, captioner: str | None, filter_: str) -> tuple[str, dict]:
    """The filter score and its threshold per source, chosen on a labelled calibration split."""
    from capfilt import synthetic
    from capfilt.calibrate import best_score
    from capfilt.synthetic.truth import labelled_ledger

    c = cfg.calibration
    data_dir = rd / "calibration-data"
    if not (data_dir / "_done").is_file():
        split = synthetic.make_split(
            "calib", c.samples, seed=cfg.seed, noise_share=c.noise, image_size=cfg.world.image_size
        )
        synthetic.write_shards(data_dir, split, per_shard=c.samples)
        (data_dir / "_done").write_text("")
    scored = _capfilt(
        cfg,
        rd / f"calibration-{cfg.ablation}",
        [str(p) for p in sorted(data_dir.glob("*.tar"))],
        captioner,
        filter_,
        thresholds={"web": _OPEN, "synthetic": _OPEN},
    )
    scores = ("itm", "itc") if c.score == "auto" else (c.score,)
    return best_score(labelled_ledger(scored), scores=scores, beta=c.beta, min_precision=c.min_precision)


def _capfilt(
    cfg: LoopConfig,
    out: Path,
    web: list[str],
    captioner: str | None,
    filter_: str | None,
    thresholds: dict | None = None,
    rank_by: str | None = None,
) -> Path:
    from capfilt.pipeline import run

    result = run(capfilt_step_config(cfg, out, web, captioner, filter_, thresholds, rank_by), progress=True)
    if not result.ok:
        raise RuntimeError(f"CapFilt over the web shards failed: {result.shard_errors}")
    return out


def run_loop(cfg: LoopConfig) -> dict:
    if not cfg.output:
        raise ConfigError("no output directory: set `output` or pass --output")
    check_steps(cfg)
    cfg = _absolute(cfg)
    # Absolute, because the paths recorded in the steps' run.json must resolve from any directory
    # (`capfilt report` re-reads the input shards from wherever it is run).
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = cfg.data or make_world(cfg, out)
    state = State(out)
    web_data = [{"kind": "shards", "path": paths.web}]
    clean_data = [{"kind": "coco", "path": paths.clean}]
    if paths.clean_images:
        clean_data[0]["images"] = paths.clean_images

    start = cfg.start_init()
    if start is None:
        exports = _train(cfg, "pretrain", out / "round-0" / "pretrain", {"preset": cfg.preset}, web_data)
        init, trained_on = {"med": exports["med"]}, "web (noisy)"
    else:  # the given checkpoints are round 0: stock ones are evaluated as they are
        init, trained_on = start, "start checkpoints"
        exports = {} if "med" in start else start
    if state.round(0) is None and exports.get("filter"):
        state.save_round(
            {
                "round": 0,
                "ablation": "-",
                "trained_on": trained_on,
                **_eval_round(cfg, paths, exports["filter"], exports.get("captioner")),
            }
        )
    best = state.round(0)["r1"] if state.round(0) else float("-inf")
    for n in range(1, cfg.max_rounds + 1):
        rd = out / f"round-{n}"
        record = state.round(n, cfg.ablation)
        if record is None:
            record = _round(cfg, rd, n, init, paths, web_data, clean_data)
            state.save_round(record)
        init = {"med": record["med"]}
        gain = record["r1"] - best
        log.info("round %d: recall@1 %.1f (%+.1f)", n, record["r1"], gain)
        if gain < cfg.min_improvement:
            log.info("round %d improved recall@1 by %.1f < %.1f points: stopping", n, gain, cfg.min_improvement)
            break
        best = record["r1"]
    # The config of a loop that ran to its end (a failed one leaves no record claiming it ran).
    (out / "loop.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return state.data


def _finetune(cfg: LoopConfig, rd: Path, init: dict, clean_data, use_cap: bool, use_filter: bool):
    """The round's captioner and filter (export dirs, None where the ablation has none). Both start
    from the last MED (or each from its own start checkpoint: `role_init`) and never see each other,
    so with `parallel_finetune` the captioner trains in a child process while the filter trains here."""
    cap_args = (cfg, "finetune-captioner", rd / "captioner", role_init(init, "captioner"), clean_data)
    filter_args = (cfg, "finetune-filter", rd / "filter", role_init(init, "filter"), clean_data)
    if not (use_cap and use_filter and cfg.parallel_finetune):
        captioner = _train(*cap_args)["captioner"] if use_cap else None
        filter_ = _train(*filter_args)["filter"] if use_filter else None
        return captioner, filter_
    import torch

    threads = max(1, torch.get_num_threads() // 2)
    log.info("fine-tuning captioner and filter in parallel (%d torch threads each)", threads)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        child = pool.submit(_train, *cap_args, threads)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            filter_ = _train(*filter_args)["filter"]
        finally:
            torch.set_num_threads(previous)
        captioner = child.result()["captioner"]
    return captioner, filter_


def _round(cfg: LoopConfig, rd: Path, n: int, init: dict, paths: DataPaths, web_data, clean_data) -> dict:
    use_cap = cfg.ablation in ("captioner", "captioner_filter")
    use_filter = cfg.ablation in ("filter", "captioner_filter")
    captioner, filter_ = _finetune(cfg, rd, init, clean_data, use_cap, use_filter)
    record = {"round": n, "ablation": cfg.ablation}
    if use_cap or use_filter:
        thresholds, score = None, None
        if use_filter and cfg.calibration:
            score, chosen = _calibrate(cfg, rd, captioner, filter_)
            record.update(calibration=chosen, calibration_score=score)
            # The calibrated threshold replaces the filter thresholds of the recipe for that source.
            thresholds = {source: {"itm": None, "itc": None, score: r["threshold"]} for source, r in chosen.items()}
            log.info(
                "round %d: calibrated %s thresholds %s",
                n,
                score,
                {source: round(r["threshold"], 4) for source, r in chosen.items()},
            )
        capfilt_dir = _capfilt(
            cfg, rd / f"capfilt-{cfg.ablation}", paths.web, captioner, filter_, thresholds, rank_by=score
        )
        summary = json.loads((capfilt_dir / "summary.json").read_text())
        record.update(capfilt_input=summary["input"], capfilt_kept=summary["kept"])
        data = [{"kind": "shards", "path": str(capfilt_dir / "shards" / "*.tar")}, *clean_data]
        try:
            from capfilt.synthetic.truth import labelled_ledger, quality

            labelled = labelled_ledger(capfilt_dir)
            if labelled:  # real data carries no ground truth: no noise figures to record
                q = quality(labelled)
                record["quality"] = q
                record["bootstrapped_noise"] = q["bootstrapped_noise"]
        except Exception as err:  # noqa: BLE001 - real data has no ground truth
            log.info("no ground truth for round %d (%s)", n, err)
    else:
        data = [*web_data, *clean_data]
    exports = _train(cfg, "pretrain", rd / f"pretrain-{cfg.ablation}", cfg.retrain_init(), data)
    trained_on = "web + clean (no bootstrap)" if cfg.ablation == "none" else f"bootstrapped ({cfg.ablation}) + clean"
    record.update(
        med=exports["med"],
        trained_on=trained_on,
        **_eval_round(cfg, paths, exports["filter"], exports.get("captioner")),
    )
    return record


def run_ablations(cfg: LoopConfig) -> dict:
    """BLIP's Table 1 on this data: one bootstrap round under each ablation, sharing round 0 and the
    fine-tuned captioner and filter."""
    for ablation in ABLATIONS:
        run_loop(cfg.model_copy(update={"ablation": ablation, "max_rounds": 1, "min_improvement": 0.0}))
    return State(Path(cfg.output)).data


def _pct(v) -> str:
    return "    –" if v is None else f"{100 * v:5.1f}%"


def format_rounds(state: dict) -> str:
    lines = [
        f"{'round':>5}  {'trained on':38s} {'R@1':>6} {'ITC R@1':>8} {'BLEU-4':>7} {'CIDEr':>6}  "
        f"{'kept':>6} {'noise':>6}"
    ]
    for r in state["rounds"]:
        lines.append(
            f"{r['round']:>5}  {r['trained_on']:38s} {r['r1']:6.1f} {r['itc_r1']:8.1f} "
            f"{r.get('bleu4', 0):7.3f} {r.get('cider', 0):6.3f}  {r.get('capfilt_kept', ''):>6} "
            f"{_pct(r.get('bootstrapped_noise')) if 'bootstrapped_noise' in r else '':>6}"
        )
    return "\n".join(lines)


def format_quality(record: dict) -> str:
    """What CapFilt did to the web data: against the ground truth where the samples carry it (the
    synthetic world), else only what exists: its counts and calibrated thresholds."""
    q = record.get("quality")
    calib = record.get("calibration", {})
    score = record.get("calibration_score", "itm").upper()
    lines = [
        f"  {score} threshold {src}: {c['threshold']:.3f} (calibration precision {_pct(c['precision'])}, "
        f"recall {_pct(c['recall'])})"
        for src, c in calib.items()
    ]
    if not q or not (q["web"]["texts"] or q["synthetic"]["texts"]):
        if record.get("capfilt_input") is None:
            return ""
        return "\n".join(
            [
                f"CapFilt on the web data (round {record['round']}, {record['ablation']}):",
                *lines,
                f"  kept {record['capfilt_kept']} of {record['capfilt_input']} samples "
                "(no ground truth in these samples: no noise figures)",
            ]
        )
    w, s = q["web"], q["synthetic"]
    synthetic_correct = 1 - s["noise_before"] if s["noise_before"] is not None else None
    return "\n".join(
        [
            f"CapFilt on the web data (round {record['round']}, {record['ablation']}), against ground truth:",
            *lines,
            f"  web texts        {w['texts']:6d}   noise before {_pct(w['noise_before'])}"
            f"   after {_pct(w['noise_after'])}",
            f"  filter on web    mismatched removed {_pct(w['wrong_removed'])}   matched kept {_pct(w['correct_kept'])}"
            f"   precision {_pct(w['precision'])}   recall {_pct(w['recall'])}",
            f"  synthetic        {s['texts']:6d}   correct {_pct(synthetic_correct)}"
            f"   kept {s['kept']}   correct among kept {_pct(s['precision'])}",
            f"  bootstrapped set {q['bootstrapped_texts']:6d} texts   noise {_pct(q['bootstrapped_noise'])}",
        ]
    )
