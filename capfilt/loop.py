"""`capfilt loop CONFIG`: BLIP's bootstrap rounds, resumable, with the ablations as configuration.

round 0   pretrain a MED on the noisy web data (or start from a given MED)         -> eval
round r   fine-tune a captioner (LM) and a filter (ITC+ITM) from the last MED on the clean set,
          CapFilt the web shards with them, pretrain a fresh MED on the bootstrapped data plus the
          clean set                                                                   -> eval
Stop when a round no longer improves test recall@1 by `min_improvement` points.

Every step writes its own folder under OUTPUT/round-N/ and is skipped on resume when complete;
OUTPUT/state.json records each round's metrics.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from capfilt.config import ConfigError, Strict, _format, parse_config, read_yaml

log = logging.getLogger("capfilt")

ABLATIONS = ("none", "filter", "captioner", "captioner_filter")


class WorldSection(Strict):
    """The synthetic world the loop runs on when no data paths are given."""
    web: int = Field(1200, ge=10)
    clean: int = Field(300, ge=10)
    test: int = Field(150, ge=10)
    noise: float = Field(0.4, ge=0, le=1)
    image_size: int = Field(64, ge=16)
    per_shard: int = Field(300, ge=1)
    captions_per_image: int = Field(3, ge=1)


class DataPaths(Strict):
    web: list[str] = Field(..., description="noisy web shards")
    clean: str = Field(..., description="clean set: COCO-style captions JSON")
    test: str = Field(..., description="held-out test set: COCO-style captions JSON")


class CalibrationSection(Strict):
    """Choose the ITM thresholds each round on a small labelled set instead of fixed values."""
    samples: int = Field(200, ge=10, description="labelled synthetic samples (web texts half wrong)")
    noise: float = Field(0.5, gt=0, lt=1)
    beta: float = Field(0.5, gt=0, description="F-beta; < 1 favours precision")
    min_precision: float | None = Field(None, gt=0, le=1)
    score: Literal["itm", "itc", "auto"] = Field(
        "itm", description="filter score to threshold; auto = whichever separates the labelled set better")


class LoopConfig(Strict):
    output: str | None = None
    seed: int = 0
    preset: str = Field("tiny-blip", description="MED architecture for fresh pretraining")
    start_med: str | None = Field(None, description="round 0 starts from this MED instead of pretraining")
    world: WorldSection = WorldSection()
    data: DataPaths | None = None
    ablation: Literal["none", "filter", "captioner", "captioner_filter"] = "captioner_filter"
    max_rounds: int = Field(1, ge=1)
    min_improvement: float = Field(1.0, ge=0, description="recall@1 points a round must add to go on")
    pretrain: dict = Field(default_factory=dict, description="`capfilt train pretrain` keys")
    finetune_captioner: dict = Field(default_factory=dict)
    finetune_filter: dict = Field(default_factory=dict)
    capfilt: dict = Field(default_factory=dict, description="`capfilt run` keys (models are filled in)")
    eval_k: int = Field(16, ge=1)
    calibration: CalibrationSection | None = None
    parallel_finetune: bool = Field(
        True, description="fine-tune captioner and filter at the same time, in two processes (they are "
        "independent; on a CPU machine each takes half the cores)")


def load_loop_config(path: str | Path, overrides: list[str] = ()) -> LoopConfig:
    data = read_yaml(path, overrides)
    try:
        return LoopConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err)) from None


class State:
    def __init__(self, out: Path):
        self.path = out / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"rounds": []}

    def round(self, n: int, ablation: str = "-") -> dict | None:
        return next((r for r in self.data["rounds"] if r["round"] == n and r["ablation"] == ablation), None)

    def save_round(self, record: dict) -> None:
        same = (record["round"], record["ablation"])
        self.data["rounds"] = [r for r in self.data["rounds"] if (r["round"], r["ablation"]) != same] + [record]
        self.data["rounds"].sort(key=lambda r: (r["round"], ABLATIONS.index(r["ablation"])
                                                if r["ablation"] in ABLATIONS else -1))
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
    return DataPaths(web=[str(p) for p in sorted((root / "web").glob("*.tar"))],
                     clean=str(root / "clean" / "captions.json"), test=str(root / "test" / "captions.json"))


def _train(task: str, out: Path, model: dict, data: list[dict], overrides: dict, seed: int,
           threads: int | None = None) -> dict:
    """Run one training step of the loop (skipped when its exports exist); returns the export dirs."""
    from capfilt.train.config import parse_train_config
    from capfilt.train.loop import train

    config = parse_train_config({"output": str(out), "model": model, "data": data, "seed": seed,
                                 "device": "auto", "steps": 300, **overrides, "task": task})
    if (out / "outputs.json").is_file():
        saved = json.loads((out / "train_config.json").read_text())["fingerprint_data"]
        if config.changed_since(saved):
            raise ConfigError(f"{out} was trained under a different config; use a new loop --output")
        return json.loads((out / "outputs.json").read_text())
    if threads:
        import torch

        torch.set_num_threads(threads)
    result = train(config, resume=True, progress=True)
    return result["outputs"]


def _evaluate(filter_dir: str, captioner_dir: str | None, test: str, k: int) -> dict:
    from capfilt.eval import evaluate
    from capfilt.train.data import load_coco

    result = evaluate(load_coco(test), filter=filter_dir, captioner=captioner_dir, k_test=k)
    itm = result["retrieval"]["itm"]
    metrics = {"r1": (itm["txt_r1"] + itm["img_r1"]) / 2, "txt_r1": itm["txt_r1"], "img_r1": itm["img_r1"],
               "itc_r1": (result["retrieval"]["itc"]["txt_r1"] + result["retrieval"]["itc"]["img_r1"]) / 2}
    if "captioning" in result:
        metrics.update(bleu4=result["captioning"]["bleu4"], cider=result["captioning"]["cider"])
    return metrics


_OPEN = {"itm": 0.0, "itc": -1.0}  # keep everything: the calibration run only collects scores


def _calibrate(cfg: LoopConfig, rd: Path, captioner: str | None, filter_: str) -> tuple[str, dict]:
    """The filter score and its threshold per source, chosen on a labelled calibration split."""
    from capfilt import synthetic
    from capfilt.calibrate import best_score
    from capfilt.groundtruth import labelled_ledger

    c = cfg.calibration
    data_dir = rd / "calibration-data"
    if not (data_dir / "_done").is_file():
        split = synthetic.make_split("calib", c.samples, seed=cfg.seed, noise_share=c.noise,
                                     image_size=cfg.world.image_size)
        synthetic.write_shards(data_dir, split, per_shard=c.samples)
        (data_dir / "_done").write_text("")
    scored = _capfilt(cfg, rd / f"calibration-{cfg.ablation}", [str(p) for p in sorted(data_dir.glob("*.tar"))], captioner,
                      filter_, thresholds={"web": _OPEN, "synthetic": _OPEN})
    scores = ("itm", "itc") if c.score == "auto" else (c.score,)
    return best_score(labelled_ledger(scored), scores=scores, beta=c.beta, min_precision=c.min_precision)



def _capfilt(cfg: LoopConfig, out: Path, web: list[str], captioner: str | None, filter_: str | None,
             thresholds: dict | None = None, rank_by: str | None = None) -> Path:
    from capfilt.pipeline import run

    data = {"seed": cfg.seed, "batch_size": 32, "device": "auto",
            "decode": {"max_side": 256}, **cfg.capfilt, "input": web, "output": str(out)}
    if captioner:
        data["captioner"] = {"num_captions": 3, "min_new_tokens": 3, "max_new_tokens": 20,
                             **data.get("captioner", {}), "model": captioner}
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
    else:  # no filter: every text is kept
        data.pop("filter", None)
        data["decide"] = {**data.get("decide", {}), "web": {}, "synthetic": {}}
    data.pop("clip", None)
    result = run(parse_config(data), progress=True)
    if not result.ok:
        raise RuntimeError(f"CapFilt over the web shards failed: {result.shard_errors}")
    return out


def run_loop(cfg: LoopConfig) -> dict:
    if not cfg.output:
        raise ConfigError("no output directory: set `output` or pass --output")
    # Absolute, because the paths recorded in the steps' run.json must resolve from any directory
    # (`capfilt report` re-reads the input shards from wherever it is run).
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "loop.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    paths = cfg.data or make_world(cfg, out)
    state = State(out)
    web_data = [{"kind": "shards", "path": paths.web}]
    clean_data = [{"kind": "coco", "path": paths.clean}]
    fresh = {"preset": cfg.preset}

    r0 = out / "round-0"
    if cfg.start_med:
        med = cfg.start_med
        exports = {"filter": None, "captioner": None}
    else:
        exports = _train("pretrain", r0 / "pretrain", fresh, web_data, cfg.pretrain, cfg.seed)
        med = exports["med"]
    if state.round(0) is None and exports.get("filter"):
        state.save_round({"round": 0, "ablation": "-", "trained_on": "web (noisy)",
                          **_evaluate(exports["filter"], exports.get("captioner"), paths.test, cfg.eval_k)})
    best = state.round(0)["r1"] if state.round(0) else float("-inf")
    for n in range(1, cfg.max_rounds + 1):
        rd = out / f"round-{n}"
        record = state.round(n, cfg.ablation)
        if record is None:
            record = _round(cfg, rd, n, med, paths, web_data, clean_data, fresh)
            state.save_round(record)
        med = record["med"]
        gain = record["r1"] - best
        log.info("round %d: recall@1 %.1f (%+.1f)", n, record["r1"], gain)
        if gain < cfg.min_improvement:
            log.info("round %d improved recall@1 by %.1f < %.1f points: stopping", n, gain, cfg.min_improvement)
            break
        best = record["r1"]
    return state.data


def _finetune(cfg, rd: Path, med: str, clean_data, use_cap: bool, use_filter: bool):
    """The round's captioner and filter (export dirs, None where the ablation has none). Both start
    from the same MED and never see each other, so with `parallel_finetune` the captioner trains in
    a child process while the filter trains here."""
    cap_args = ("finetune-captioner", rd / "captioner", {"med": med}, clean_data, cfg.finetune_captioner, cfg.seed)
    filter_args = ("finetune-filter", rd / "filter", {"med": med}, clean_data, cfg.finetune_filter, cfg.seed)
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


def _round(cfg, rd: Path, n: int, med: str, paths: DataPaths, web_data, clean_data, fresh) -> dict:
    use_cap = cfg.ablation in ("captioner", "captioner_filter")
    use_filter = cfg.ablation in ("filter", "captioner_filter")
    captioner, filter_ = _finetune(cfg, rd, med, clean_data, use_cap, use_filter)
    record = {"round": n, "ablation": cfg.ablation}
    if use_cap or use_filter:
        thresholds, score = None, None
        if use_filter and cfg.calibration:
            score, chosen = _calibrate(cfg, rd, captioner, filter_)
            record.update(calibration=chosen, calibration_score=score)
            # The calibrated threshold replaces the filter thresholds of the recipe for that source.
            thresholds = {source: {"itm": None, "itc": None, score: r["threshold"]} for source, r in chosen.items()}
            log.info("round %d: calibrated %s thresholds %s", n, score,
                     {source: round(r["threshold"], 4) for source, r in chosen.items()})
        capfilt_dir = _capfilt(cfg, rd / f"capfilt-{cfg.ablation}", paths.web, captioner, filter_, thresholds,
                               rank_by=score)
        summary = json.loads((capfilt_dir / "summary.json").read_text())
        record.update(capfilt_input=summary["input"], capfilt_kept=summary["kept"])
        data = [{"kind": "shards", "path": str(capfilt_dir / "shards" / "*.tar")}, *clean_data]
        try:
            from capfilt.groundtruth import labelled_ledger, quality

            q = quality(labelled_ledger(capfilt_dir))
            record["quality"] = q
            record["bootstrapped_noise"] = q["bootstrapped_noise"]
        except Exception as err:  # noqa: BLE001 - real data has no ground truth
            log.info("no ground truth for round %d (%s)", n, err)
    else:
        data = [*web_data, *clean_data]
    exports = _train("pretrain", rd / f"pretrain-{cfg.ablation}", fresh, data, cfg.pretrain, cfg.seed)
    trained_on = "web + clean (no bootstrap)" if cfg.ablation == "none" else f"bootstrapped ({cfg.ablation}) + clean"
    record.update(med=exports["med"], trained_on=trained_on,
                  **_evaluate(exports["filter"], exports.get("captioner"), paths.test, cfg.eval_k))
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
    lines = [f"{'round':>5}  {'trained on':38s} {'R@1':>6} {'ITC R@1':>8} {'BLEU-4':>7} {'CIDEr':>6}  "
             f"{'kept':>6} {'noise':>6}"]
    for r in state["rounds"]:
        lines.append(f"{r['round']:>5}  {r['trained_on']:38s} {r['r1']:6.1f} {r['itc_r1']:8.1f} "
                     f"{r.get('bleu4', 0):7.3f} {r.get('cider', 0):6.3f}  {r.get('capfilt_kept', ''):>6} "
                     f"{_pct(r.get('bootstrapped_noise')) if 'bootstrapped_noise' in r else '':>6}")
    return "\n".join(lines)


def format_quality(record: dict) -> str:
    """The demo's table: what CapFilt did to the web data, against the ground truth."""
    q = record.get("quality")
    if not q:
        return ""
    w, s = q["web"], q["synthetic"]
    calib = record.get("calibration", {})
    score = record.get("calibration_score", "itm").upper()
    lines = [f"  {score} threshold {src}: {c['threshold']:.3f} (calibration precision {_pct(c['precision'])}, "
             f"recall {_pct(c['recall'])})" for src, c in calib.items()]
    return "\n".join([
        f"CapFilt on the web data (round {record['round']}, {record['ablation']}), against ground truth:",
        *lines,
        f"  web texts        {w['texts']:6d}   noise before {_pct(w['noise_before'])}   after {_pct(w['noise_after'])}",
        f"  filter on web    mismatched removed {_pct(w['wrong_removed'])}   matched kept {_pct(w['correct_kept'])}"
        f"   precision {_pct(w['precision'])}   recall {_pct(w['recall'])}",
        f"  synthetic        {s['texts']:6d}   correct {_pct(1 - s['noise_before'] if s['noise_before'] is not None else None)}"
        f"   kept {s['kept']}   correct among kept {_pct(s['precision'])}",
        f"  bootstrapped set {q['bootstrapped_texts']:6d} texts   noise {_pct(q['bootstrapped_noise'])}",
    ])
