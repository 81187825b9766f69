"""`capfilt report` and `capfilt calibrate`: the commands that read a finished run."""

from __future__ import annotations

import json
import sys


def cmd_report(args) -> int:
    from capfilt.report import build_report

    print(
        build_report(
            args.run_dir, args.out, n_samples=args.examples, seed=args.seed, show=args.show, date=not args.no_date
        )
    )
    return 0


def cmd_calibrate(args) -> int:
    from capfilt.calibrate import calibrate, recipe_lines

    score, result, notes = calibrate(
        args.run_dir, score=args.score, keep_rate=args.keep_rate, beta=args.beta, min_precision=args.min_precision
    )
    for note in notes:
        print(f"capfilt: note: {note}", file=sys.stderr)
    print(json.dumps({"score": score, **result}, indent=1))
    print("# paste into the recipe, or pass to `capfilt rethreshold` with --set:")
    print("\n".join(recipe_lines(score, result)))
    return 0


def add_parsers(sub) -> None:
    from capfilt.config import IMAGE_RULES, SCORES
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
        choices=[*SCORES, "auto", *IMAGE_RULES],
        default="itm",
        help="score to threshold; auto (labels only) = the one that separates them best; aesthetic, "
        "punsafe, pwatermark: decide's image rules, by --keep-rate image=RATE",
    )
    p.set_defaults(func=cmd_calibrate)
