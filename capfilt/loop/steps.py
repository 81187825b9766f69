"""The loop's steps: each step's `capfilt train` / `capfilt run` config (built once at load by
`check_steps`, so a bad key fails before round 0), the synthetic world, and the steps themselves."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from capfilt.config import FILTER_SCORES, ConfigError, RunConfig
from capfilt.loop.config import LOOP_FILLS, TRAIN_SECTIONS, DataPaths, LoopConfig, role_init

_OPEN = {"itm": 0.0, "itc": -1.0}  # keep everything: the calibration run only collects scores


def _errors(err: ValidationError, section: str) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in (section, *e["loc"]))
        lines.append(f"  {where}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}")
    return "invalid config:\n" + "\n".join(lines)


def train_step_config(cfg: LoopConfig, task: str, out: Path, model: dict, data: list[dict]):
    """The `capfilt train` config of one training step: its loop section plus output, model and
    data; with `runner: ray`, the Ray Train settings (the section's own `workers` / `ray` win)."""
    from capfilt.train.config import TrainConfig

    section = dict(getattr(cfg, TRAIN_SECTIONS[task]))
    if cfg.runner == "ray":
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
    (no captioner / no filter under the ablations), inputs and output; with `runner: ray`, the Ray
    runner on the cluster at `ray.address` (none: a local Ray)."""
    data = {"seed": cfg.seed, **json.loads(json.dumps(cfg.capfilt)), "input": web, "output": str(out)}
    if cfg.runner == "ray":
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
        if data["decide"].get("rank_by") in FILTER_SCORES:
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


def train_step(
    cfg: LoopConfig, task: str, out: Path, model: dict, data: list[dict], threads: int | None = None
) -> dict:
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


def eval_round(cfg: LoopConfig, paths: DataPaths, filter_: str, captioner: str | None) -> dict:
    kw = {"images": paths.test_images} if paths.test_images else {}
    return _evaluate(filter_, captioner, paths.test, cfg.eval_k, **kw)


def calibrate_step(cfg: LoopConfig, rd: Path, captioner: str | None, filter_: str) -> tuple[str, dict]:
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
    scored = capfilt_step(
        cfg,
        rd / f"calibration-{cfg.ablation}",
        [str(p) for p in sorted(data_dir.glob("*.tar"))],
        captioner,
        filter_,
        thresholds={"web": _OPEN, "synthetic": _OPEN},
    )
    scores = FILTER_SCORES if c.score == "auto" else (c.score,)
    return best_score(labelled_ledger(scored), scores=scores, beta=c.beta, min_precision=c.min_precision)


def capfilt_step(
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
