"""`capfilt train ...` and `capfilt eval ...`: parse, load the config, call the library."""

from __future__ import annotations

import json
import sys

from capfilt.config import DEFAULT_PROMPT
from capfilt.train import TASKS


def cmd_train(args) -> int:
    from capfilt.train.config import load_train_config

    cfg = load_train_config(args.config, args.task, args.set or [], output=args.output)
    if cfg.workers > 1:
        from capfilt.runners.ray.train import train_ray

        result = train_ray(cfg, resume=args.resume)
    else:
        from capfilt.train.loop import train

        result = train(cfg, resume=args.resume, progress=not args.quiet)
    last = result["losses"][-1] if result["losses"] else {}
    print(
        f"{cfg.task}: step {result['step']}/{cfg.steps}, "
        + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k not in ("step", "lr"))
    )
    for role, path in result["outputs"].items():
        print(f"  {role}: {path}")
    return 0


def cmd_eval(args) -> int:
    from capfilt.eval import evaluate, format_report
    from capfilt.train.config import DataSource
    from capfilt.train.data import load_sources

    if bool(args.coco) == bool(args.shards):
        print("capfilt eval: give exactly one of --coco or --shards", file=sys.stderr)
        return 2
    source = (
        DataSource(kind="coco", path=args.coco, images=args.images)
        if args.coco
        else DataSource(kind="shards", path=args.shards)
    )
    result = evaluate(
        load_sources([source]),
        filter=args.filter,
        captioner=args.captioner,
        k_test=args.k_test,
        batch_size=args.batch_size,
        device=args.device,
        prompt=args.prompt,
        max_images=args.max_images,
    )
    print(format_report(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="pretrain the MED, fine-tune a captioner or a filter",
        description="BLIP training: `pretrain` (ITC+ITM+LM), `finetune-captioner` (LM), "
        "`finetune-filter` (ITC+ITM). Writes checkpoints, metrics.jsonl and stock "
        "transformers exports (OUTPUT/captioner, OUTPUT/filter) plus the MED (OUTPUT/med).",
    )
    tasks = p.add_subparsers(dest="task", required=True)
    for task in TASKS:
        t = tasks.add_parser(task, help=f"{task} (see pipelines/train/)")
        t.add_argument("config", help="training YAML, e.g. pipelines/train/tiny-finetune-filter.yaml")
        t.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)",
        )
        t.add_argument("--output", help="output directory (overrides the config's `output`)")
        t.add_argument(
            "--resume", action="store_true", help="continue from the output's latest checkpoint (same config required)"
        )
        t.add_argument("--quiet", action="store_true", help="no progress bar")
        t.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "eval",
        help="retrieval recall and caption BLEU-4/CIDEr on a held-out set",
        description="Evaluate an exported filter (ITC recall@1/5/10, ITM re-ranked recall, "
        "ITM AUC) and/or captioner (BLEU-4, CIDEr-D) on COCO-style captions or shards.",
    )
    p.add_argument("--filter", help="BlipForImageTextRetrieval: preset, directory or hub id")
    p.add_argument("--captioner", help="BlipForConditionalGeneration: preset, directory or hub id")
    p.add_argument("--coco", help="COCO-style captions JSON (or BLIP's [{image, caption}] list)")
    p.add_argument("--images", help="image root for --coco (default: the JSON's folder)")
    p.add_argument("--shards", nargs="+", help="WebDataset shards: references = .txt / kept texts")
    p.add_argument("--k-test", type=int, default=16, help="ITC candidates re-ranked by ITM (BLIP: 256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-images", type=int, help="evaluate the first N images only")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="captioner prompt (stripped from captions)")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", help="write the full result as JSON here")
    p.set_defaults(func=cmd_eval)
