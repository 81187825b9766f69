"""`capfilt loop`: BLIP's bootstrap rounds."""

from __future__ import annotations


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


def add_parsers(sub) -> None:
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
