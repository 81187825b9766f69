"""`capfilt run`, `rethreshold`, `dedup` and `synth`: the commands that write shards."""

from __future__ import annotations

import json


def run_options(args) -> dict:
    """`capfilt run`'s options as the keyword arguments of `capfilt.api.run_config`, which alone
    resolves them with the recipe."""
    return {
        "input": args.input,
        "output": args.output,
        "overrides": args.set or [],
        "runner": args.runner,
        "ray_address": args.ray_address,
        "device": args.device,
    }


def cmd_run(args) -> int:
    from capfilt.api import run_config

    config = run_config(args.config, **run_options(args))  # a config error is reported before the pipeline's imports
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


def add_run_options(p, with_input: bool = True):
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


def add_parsers(sub) -> None:
    from capfilt.config import DEDUP_THRESHOLD

    p = sub.add_parser(
        "run",
        help="caption, filter and rerank shards (resumable)",
        description="Run CapFilt over input shards. Completed shards are skipped on a rerun.",
    )
    add_run_options(p)
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
