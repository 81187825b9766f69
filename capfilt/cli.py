"""`capfilt ...`: parse arguments, load the config, call the library. No logic lives here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _config(args):
    """`capfilt run`'s options handed to the API's resolution (`api.run_config`): one copy of it."""
    from capfilt.api import run_config

    return run_config(
        args.config,
        input=args.input,
        output=args.output,
        overrides=args.set or [],
        runner=args.runner,
        ray_address=args.ray_address,
        device=args.device,
    )


def cmd_run(args) -> int:
    config = _config(args)  # a config error is reported before the pipeline's imports
    from capfilt.pipeline import run
    from capfilt.summary import format_summary

    result = run(config, fresh=args.fresh, progress=not args.quiet)
    print(format_summary(result.summary, result.seconds, result.stage_seconds, result.processed))
    return 0 if result.ok else 1


def cmd_rethreshold(args) -> int:
    from capfilt.rethreshold import rethreshold
    from capfilt.summary import format_summary

    summary = rethreshold(
        args.run_dir,
        args.output,
        config_path=args.config,
        overrides=args.set or [],
        fresh=args.fresh,
        partial=args.partial,
    )
    print(format_summary(summary))
    return 0 if summary["shards_done"] == summary["shards"] else 1


def cmd_dedup(args) -> int:
    from capfilt.config import ConfigError
    from capfilt.dedup import dedup
    from capfilt.summary import format_summary

    if not args.output and not args.table:
        raise ConfigError("capfilt dedup: give --output (a run without the duplicates) and/or --table (the table)")
    result = dedup(
        args.run_dir,
        threshold=args.threshold,
        output=args.output,
        table=args.table,
        use_ray=args.runner == "ray",
        ray_address=args.ray_address,
        fresh=args.fresh,
    )
    summary = result.pop("summary", None)
    print(json.dumps(result))
    if summary is not None:
        print(format_summary(summary))
        return 0 if summary["shards_done"] == summary["shards"] else 1
    return 0


def cmd_synth(args) -> int:
    from capfilt.synthetic import main_synth

    summary = main_synth(args.out, args.shards, args.per_shard, noise=args.noise, broken=args.broken, seed=args.seed)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_report(args) -> int:
    from capfilt.report import build_report

    print(
        build_report(
            args.run_dir, args.out, n_samples=args.examples, seed=args.seed, show=args.show, date=not args.no_date
        )
    )
    return 0


def _run_dir(path: str) -> str:
    """A finished or running `capfilt run` output with a ledger (a local path, or the URL it was
    written to), or a one-line error saying why not."""
    from capfilt.io.run_dir import is_run, ledger_files

    if "://" not in path:
        run_dir = Path(path)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{path}: no such directory; give the --output of a `capfilt run`")
        if not (run_dir / "run.json").is_file():
            rounds = sorted(run_dir.glob("round-*/capfilt*/run.json"))
            hint = (
                f" (a loop output: calibrate one of its runs, e.g. {rounds[-1].parent})"
                if rounds
                else "; give the --output of a `capfilt run`"
            )
            raise FileNotFoundError(f"{path} is not a capfilt run (no run.json){hint}")
    elif not is_run(path):
        raise FileNotFoundError(f"{path} is not a capfilt run (no run.json); give the --output of a `capfilt run`")
    if not ledger_files(path):
        raise FileNotFoundError(f"{path} has no ledger yet: none of its shards has finished")
    return path


def cmd_calibrate(args) -> int:
    from capfilt.calibrate import SOURCES, calibrate_run, parse_keep_rates
    from capfilt.config import ConfigError

    run_dir = _run_dir(args.run_dir)
    if args.score in ("aesthetic", "punsafe", "pwatermark"):  # decide's image rules: one score per image
        return _calibrate_image(run_dir, args)
    if args.keep_rate and args.score == "auto":
        raise ConfigError("--score auto chooses by labels; with --keep-rate name the score to threshold")
    if args.keep_rate:
        from capfilt.io.run_dir import read_ledger

        keep = parse_keep_rates(args.keep_rate)
        rows = read_ledger(run_dir)
        result = calibrate_run(rows, keep_rate=keep, score=args.score)
    else:
        from capfilt.synthetic.truth import labelled_ledger

        rows = labelled_ledger(run_dir)
        if not rows:
            raise ValueError(
                f"no labelled texts in {args.run_dir}: its input samples carry no ground truth; "
                "choose thresholds by --keep-rate web=RATE synthetic=RATE instead"
            )
        if args.score == "auto":
            from capfilt.calibrate import best_score

            args.score, result = best_score(
                rows, scores=("itm", "itc", "clip"), beta=args.beta, min_precision=args.min_precision
            )
        else:
            result = calibrate_run(rows, beta=args.beta, min_precision=args.min_precision, score=args.score)
    scored = {r["source"] for r in rows if r.get(args.score) is not None}
    if not result:
        raise ValueError(
            f"{args.run_dir}: no {args.score} scores to calibrate"
            + (f" for {', '.join(args.keep_rate)}" if args.keep_rate else "")
            + (f" (it has {args.score} scores for: {', '.join(sorted(scored))})" if scored else "")
        )
    for source in SOURCES:
        if source not in result:
            why = "no --keep-rate for it and no labels" if source in scored else f"no {args.score} scores"
            print(f"capfilt: note: {source} texts not calibrated: {why}", file=sys.stderr)
    print(json.dumps({"score": args.score, **result}, indent=1))
    print("# paste into the recipe, or pass to `capfilt rethreshold` with --set:")
    print("decide:")
    for source, r in result.items():
        print(f"  {source}: {{{args.score}: {r['threshold']:.4f}}}")
    return 0


def _calibrate_image(run_dir, args) -> int:
    from capfilt.calibrate import calibrate_image
    from capfilt.config import ConfigError
    from capfilt.io.run_dir import read_ledger

    rates = dict(item.partition("=")[::2] for item in args.keep_rate or [])
    if set(rates) != {"image"}:
        raise ConfigError(f"--score {args.score} thresholds images: give --keep-rate image=RATE (e.g. image=0.8)")
    try:
        rate = float(rates["image"])
    except ValueError:
        raise ConfigError(f"--keep-rate image={rates['image']}: the rate must be a number in (0, 1]") from None
    result = calibrate_image(read_ledger(run_dir), args.score, rate)
    print(json.dumps({"score": args.score, **result}, indent=1))
    print("# paste into the recipe, or pass to `capfilt rethreshold` with --set:")
    print(f"decide:\n  {args.score}: {{{result['rule']}: {result['threshold']:.4f}}}")
    return 0


def cmd_loop(args) -> int:
    from capfilt.api import loop_config
    from capfilt.loop import format_quality, format_rounds, run_ablations, run_loop

    # The API's resolution: --output is a path as given (as `--set output=2024` it would be YAML, an int).
    config = loop_config(args.config, output=args.output, overrides=args.set or [])
    state = run_ablations(config) if args.ablations else run_loop(config)
    print()
    print(format_rounds(state))
    last = [r for r in state["rounds"] if r.get("capfilt_input") is not None and r["ablation"] == "captioner_filter"]
    if last and format_quality(last[-1]):
        print()
        print(format_quality(last[-1]))
    print(f"\nreport: capfilt report {config.output}")
    return 0


def cmd_models(args) -> int:
    from capfilt.modeling.presets import list_presets, load_preset, models_dir

    names = list_presets()
    if not names:
        where = "CAPFILT_MODELS_DIR" if os.environ.get("CAPFILT_MODELS_DIR") else "this installation"
        raise FileNotFoundError(
            f"no model presets (*.json) in {models_dir()} ({where}); point CAPFILT_MODELS_DIR "
            "at a folder of presets, or unset it to use the ones shipped with capfilt"
        )
    print(f"# presets in {models_dir()}")
    for name in names:
        print(f"{name:16s} {load_preset(name).get('description', '')}")
    return 0


def cmd_recipes(args) -> int:
    from capfilt.shipped import list_recipes, recipes_dir

    recipes = list_recipes()
    if not recipes:
        raise FileNotFoundError(f"no recipes (*.yaml) in {recipes_dir()}")
    print(
        f"# recipes in {recipes_dir()}; name one as CONFIG (e.g. `capfilt run demo/tiny.yaml ...`), or copy it and edit"
    )
    for name, description in recipes:
        print(f"{name:36s} {description}")
    return 0


def _add_run_options(p, with_input: bool = True):
    p.add_argument(
        "config", help="YAML recipe: a file, or a shipped recipe such as demo/tiny.yaml (`capfilt recipes` lists them)"
    )
    if with_input:
        p.add_argument("--input", nargs="+", help="shards: paths, globs, {00000..00099} ranges or fsspec URLs")
    p.add_argument("--output", help="output directory (overrides the config's `output`)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set decide.web.itm=0.3 (repeatable)",
    )
    p.add_argument("--fresh", action="store_true", help="discard outputs already in the output directory")


def parser() -> argparse.ArgumentParser:
    from capfilt.config import DEDUP_THRESHOLD

    ap = argparse.ArgumentParser(
        prog="capfilt",
        description="BLIP CapFilt at scale: caption, filter and rerank "
        "image-text WebDataset shards; write cleaned shards and a per-caption ledger.",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument(
        "--debug",
        action="store_true",
        help="on an error, show the Python traceback (accepted anywhere on the command line)",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "run",
        help="caption, filter and rerank shards (resumable)",
        description="Run CapFilt over input shards. Completed shards are skipped on a rerun.",
    )
    _add_run_options(p)
    p.add_argument("--runner", choices=["local", "ray"], help="local (in-process, default) or ray")
    p.add_argument("--ray-address", help="join this Ray cluster (implies --runner ray); none = local Ray")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "rethreshold",
        help="re-decide an existing run from its ledger, without models",
        description="Apply new thresholds/policy to a finished run's ledger and write new cleaned "
        "shards (images are copied from the original input shards). A run with unfinished "
        "shards is refused unless --partial.",
    )
    p.add_argument("run_dir", help="output directory of an earlier `capfilt run`")
    p.add_argument("--config", help="YAML whose `decide` section replaces the run's (other sections ignored)")
    p.add_argument("--output", required=True, help="new output directory")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. --set decide.synthetic.itm=0.7")
    p.add_argument("--fresh", action="store_true", help="discard outputs already in the new output directory")
    p.add_argument(
        "--partial",
        action="store_true",
        help="the run has unfinished shards: derive from its finished ones only (the new summary "
        "says partial and names the missing shards); without it such a run is refused",
    )
    p.set_defaults(func=cmd_rethreshold)

    p = sub.add_parser(
        "dedup",
        help="find exact and near-duplicate images across a run, from its embeddings",
        description="A second pass over a finished run's image embeddings (clip.K.embeddings): exact "
        "duplicates by decoded-pixel hash, near ones by cosine >= --threshold; the first occurrence (input "
        "order) stays. Writes the duplicates table and/or a derived run whose cleaned shards lack them "
        "(reason near_duplicate; no model runs).",
    )
    p.add_argument("run_dir", help="output directory of an earlier `capfilt run` that wrote embeddings")
    p.add_argument(
        "--threshold",
        type=float,
        default=DEDUP_THRESHOLD,
        help="cosine at or above which two images are near duplicates",
    )
    p.add_argument("--output", help="new output directory: the run without its duplicates (and duplicates.parquet)")
    p.add_argument("--table", help="write the duplicates table (parquet) here")
    p.add_argument("--runner", choices=["local", "ray"], default="local", help="ray: one Ray task per shard")
    p.add_argument("--ray-address", help="join this Ray cluster (default: a local Ray)")
    p.add_argument("--fresh", action="store_true", help="discard outputs already in --output")
    p.set_defaults(func=cmd_dedup)

    p = sub.add_parser(
        "synth",
        help="write a small noisy image-text corpus with ground truth",
        description="Synthetic shapes world: images, web texts (a share of them wrong in labelled "
        "ways), the truth in each sample's .json.",
    )
    p.add_argument("out", help="output directory for the shards")
    p.add_argument("--shards", type=int, default=2, help="shards to write (default: %(default)s)")
    p.add_argument("--per-shard", type=int, default=50, help="samples per shard (default: %(default)s)")
    p.add_argument("--noise", type=float, default=0.3, help="share of web texts that are wrong (default: %(default)s)")
    p.add_argument("--broken", action="store_true", help="also mix in broken samples of every failure class")
    p.add_argument("--seed", type=int, default=0, help="seed of the world (default: %(default)s)")
    p.set_defaults(func=cmd_synth)

    from capfilt.report import CATEGORIES, DEFAULT_SHOW, LAION_DEFAULT_SHOW

    p = sub.add_parser(
        "report",
        help="write a self-contained HTML report of a run or a loop",
        description="One HTML file: the run's models, thresholds and config; per-round metrics of "
        "a loop; counts and rejections by reason; score histograms by source; example samples "
        "by category, each image with its texts kept (green) or rejected (red), scores and reasons.",
    )
    p.add_argument("run_dir", metavar="RUN_OR_LOOP_DIR")
    p.add_argument(
        "--out", help="HTML file (default RUN_OR_LOOP_DIR/report.html; for an s3://… run, NAME-report.html here)"
    )
    p.add_argument(
        "--show",
        action="append",
        metavar="CATEGORY",
        help=f"example categories, repeatable or comma-separated: {', '.join(CATEGORIES)} "
        f"(default {','.join(DEFAULT_SHOW)}: the BLIP paper's figure, or in decide.mode laion_coco "
        f"{','.join(LAION_DEFAULT_SHOW)}; borderline: scores nearest the threshold); the page says what "
        "each one holds",
    )
    p.add_argument(
        "--examples",
        "--samples",
        dest="examples",
        type=int,
        default=12,
        metavar="N",
        help="sample cards per category (default 12)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the rejected and random draws")
    p.add_argument(
        "--no-date", action="store_true", help="leave out the 'report written' date: the same run gives the same bytes"
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "calibrate",
        help="choose ITM thresholds per source for a run",
        description="From a target keep rate per source (--keep-rate web=0.7 synthetic=0.5), or "
        "from ground-truth labels in the input samples (the synthetic world's .json): the "
        "threshold with the best F-beta, or the lowest reaching --min-precision.",
    )
    p.add_argument("run_dir")
    p.add_argument("--keep-rate", nargs="+", metavar="SOURCE=RATE")
    p.add_argument("--beta", type=float, default=0.5, help="F-beta weighting; < 1 favours precision")
    p.add_argument("--min-precision", type=float)
    p.add_argument(
        "--score",
        choices=["itm", "itc", "clip", "auto", "aesthetic", "punsafe", "pwatermark"],
        default="itm",
        help="score to threshold; auto (labels only) = the one that separates them best; aesthetic, "
        "punsafe, pwatermark: decide's image rules, by --keep-rate image=RATE",
    )
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "loop",
        help="bootstrap rounds: pretrain, fine-tune captioner+filter, CapFilt, retrain",
        description="BLIP's bootstrap loop, resumable: every step has its own folder under "
        "OUTPUT/round-N and is skipped when complete. --ablations runs BLIP's Table 1 "
        "(no bootstrap / filter / captioner / captioner+filter) and prints it.",
    )
    p.add_argument("config", help="loop YAML: a file, or a shipped recipe such as demo/loop.yaml")
    p.add_argument("--output", help="output directory")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--ablations", action="store_true", help="run one round under each ablation")
    p.set_defaults(func=cmd_loop)

    from capfilt.train.cli import add_parsers as add_train_parsers

    add_train_parsers(sub)

    p = sub.add_parser(
        "models",
        help="list the model presets (CAPFILT_MODELS_DIR, or the shipped ones)",
        description="The model presets a config can name as captioner.model, filter.model or "
        "clip.model: JSON architectures built once with seeded random weights. capfilt ships them "
        "(models/ in a checkout, capfilt/presets in an installed package); CAPFILT_MODELS_DIR "
        "points at a folder of your own instead.",
    )
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "recipes",
        help="list the recipes shipped with capfilt",
        description="Recipes (YAML configs) shipped with capfilt. A CONFIG that is not a file here "
        "names one of them: `capfilt run demo/tiny.yaml` (or pipelines/demo/tiny.yaml) works from "
        "any directory; a file here wins.",
    )
    p.set_defaults(func=cmd_recipes)
    return ap


# What to do after Ctrl-C, by command: the resumable ones pick up where they stopped.
RESUME_HINTS = {
    "run": "rerun the same command to resume",
    "loop": "rerun the same command to resume",
    "rethreshold": "rerun the same command to resume",
    "dedup": "rerun the same command to resume",
    "train": "rerun the same command with --resume to continue from the last checkpoint",
}


# capfilt's errors whose messages are written for the user (printed as they are), and those that
# are a user's mistake (exit 2), as (module, class): a module the command never imported cannot
# have raised one, so neither --help nor a config error imports the model code to catch them.
OWN_MESSAGES = (
    ("capfilt.config", "ConfigError"),
    ("capfilt.io.run_dir", "ResumeRefused"),
    ("capfilt.modeling.presets", "ModelRefError"),
)
USER_ERRORS = (("capfilt.io.run_dir", "ResumeRefused"),)


def _raised_types(names) -> tuple[type, ...]:
    """The classes of ``names`` whose modules this process has imported."""
    return tuple(getattr(sys.modules[m], c) for m, c in names if m in sys.modules)


def _message(err: BaseException) -> str:
    """The error as capfilt prints it: its own messages as written, anyone else's on one line."""
    if isinstance(err, _raised_types(OWN_MESSAGES)):
        return str(err)
    if isinstance(err, OSError) and err.filename and err.strerror and type(err).__module__ == "builtins":
        text = f"{err.filename}: {err.strerror[:1].lower()}{err.strerror[1:]}"
    else:
        text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, ImportError) and ("s3fs" in text or "gcsfs" in text):
        text += " (pip install 'capfilt[s3]' or 'capfilt[gcs]')"
    if isinstance(err, ImportError) and "aiohttp" in text:
        text += " (http:// and https:// inputs: pip install 'capfilt[http]')"
    return text if len(text) <= 600 else text[:600] + " …"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = parser().parse_args([a for a in argv if a != "--debug"])
    # Our own log lines at INFO; third-party libraries (open_clip logs every load step) only at WARNING.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The package's logger: every module logs to getLogger(__name__), a child of it.
    logging.getLogger("capfilt").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # A mistake a user can make (config, model reference, input, output, device) is one message and
    # exit 2; an interrupt is one line and 130; anything else one line and 1. --debug: the traceback.
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        hint = RESUME_HINTS.get(args.command)
        print("capfilt: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        if not isinstance(err, (ValueError, OSError, ImportError, *_raised_types(USER_ERRORS))):
            print(
                f"capfilt: error: {type(err).__name__}: {_message(err)} (rerun with --debug for the traceback)",
                file=sys.stderr,
            )
            return 1
        print(f"capfilt: error: {_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
