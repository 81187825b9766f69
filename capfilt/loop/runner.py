"""`run_loop`: the bootstrap rounds, each step skipped on resume when complete, state.json after
each round; `run_ablations`: the same loop once per ablation."""

from __future__ import annotations

import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from capfilt.config import ConfigError
from capfilt.loop.config import ABLATIONS, DataPaths, LoopConfig, absolute_data, role_init
from capfilt.loop.steps import calibrate_step, capfilt_step, check_steps, eval_round, make_world, train_step

log = logging.getLogger(__name__)


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


def run_loop(cfg: LoopConfig) -> dict:
    if not cfg.output:
        raise ConfigError("no output directory: set `output` or pass --output")
    check_steps(cfg)
    cfg = absolute_data(cfg)
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
        exports = train_step(cfg, "pretrain", out / "round-0" / "pretrain", {"preset": cfg.preset}, web_data)
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
                **eval_round(cfg, paths, exports["filter"], exports.get("captioner")),
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
        captioner = train_step(*cap_args)["captioner"] if use_cap else None
        filter_ = train_step(*filter_args)["filter"] if use_filter else None
        return captioner, filter_
    import torch

    threads = max(1, torch.get_num_threads() // 2)
    log.info("fine-tuning captioner and filter in parallel (%d torch threads each)", threads)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        child = pool.submit(train_step, *cap_args, threads)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            filter_ = train_step(*filter_args)["filter"]
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
            score, chosen = calibrate_step(cfg, rd, captioner, filter_)
            record.update(calibration=chosen, calibration_score=score)
            # The calibrated threshold replaces the filter thresholds of the recipe for that source.
            thresholds = {source: {"itm": None, "itc": None, score: r["threshold"]} for source, r in chosen.items()}
            log.info(
                "round %d: calibrated %s thresholds %s",
                n,
                score,
                {source: round(r["threshold"], 4) for source, r in chosen.items()},
            )
        capfilt_dir = capfilt_step(
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
    exports = train_step(cfg, "pretrain", rd / f"pretrain-{cfg.ablation}", cfg.retrain_init(), data)
    trained_on = "web + clean (no bootstrap)" if cfg.ablation == "none" else f"bootstrapped ({cfg.ablation}) + clean"
    record.update(
        med=exports["med"],
        trained_on=trained_on,
        **eval_round(cfg, paths, exports["filter"], exports.get("captioner")),
    )
    return record


def run_ablations(cfg: LoopConfig) -> dict:
    """BLIP's Table 1 on this data: one bootstrap round under each ablation, sharing round 0 and the
    fine-tuned captioner and filter."""
    for ablation in ABLATIONS:
        run_loop(cfg.model_copy(update={"ablation": ablation, "max_rounds": 1, "min_improvement": 0.0}))
    return State(Path(cfg.output)).data
