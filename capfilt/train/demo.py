"""Before/after measurement on the synthetic shapes world (BLIP's recipe in miniature).

    python -m capfilt.train.demo OUT [--pretrain-steps N] [--finetune-steps N]

1. data: a noisy "web" set (shards, 30% wrong texts), a clean COCO-style set, a held-out clean test set;
2. pretrain the tiny MED on the web shards (ITC+ITM+LM);
3. fine-tune a captioner (LM) and a filter (ITC+ITM) from it on the clean set;
4. `capfilt eval` the random-init preset, the pretrained exports and the fine-tuned exports.
Prints a table and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from capfilt import synthetic
from capfilt.eval import evaluate
from capfilt.train.config import parse_train_config
from capfilt.train.data import load_coco
from capfilt.train.loop import train


def _config(task: str, out: Path, data: list[dict], init: dict, steps: int, lr: float, seed: int) -> dict:
    return {"task": task, "output": str(out), "model": init, "data": data, "steps": steps, "seed": seed,
            "batch_size": 32, "optim": {"lr": lr, "min_lr": lr / 10, "warmup_steps": min(50, steps // 10),
                                         "weight_decay": 0.05},
            # BLIP's momentum distillation pays off over 100k+ steps; over a few hundred, the lagging
            # momentum model only blurs the ITC targets, so the tiny recipe trains ITC in-batch.
            "med": {"momentum": False, "queue_size": 0}, "log_every": 50,
            "save_every": steps, "device": "cpu"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--web", type=int, default=2000)
    ap.add_argument("--clean", type=int, default=600)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--finetune-steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    size = 64
    web = synthetic.make_split("web", args.web, seed=args.seed, noise_share=0.3, image_size=size)
    synthetic.write_shards(out / "web", web, per_shard=500)
    clean = synthetic.write_coco(out / "clean", synthetic.make_split("clean", args.clean, seed=args.seed,
                                                                      image_size=size), captions_per_image=3)
    test = synthetic.write_coco(out / "test", synthetic.make_split("test", args.test, seed=args.seed,
                                                                    image_size=size), captions_per_image=3)
    test_items = load_coco(test)
    timings, results = {}, {}

    def run(name, task, data, init, steps, lr):
        t = time.time()
        cfg = parse_train_config(_config(task, out / name, data, init, steps, lr, args.seed))
        train(cfg, progress=True, resume=True)
        timings[name] = time.time() - t

    run("pretrain", "pretrain", [{"kind": "shards", "path": str(out / "web" / "*.tar")}], {"preset": "tiny-blip"},
        args.pretrain_steps, 1e-3)
    clean_data = [{"kind": "coco", "path": clean}]
    run("captioner", "finetune-captioner", clean_data, {"med": str(out / "pretrain" / "med")},
        args.finetune_steps, 5e-4)
    run("filter", "finetune-filter", clean_data, {"med": str(out / "pretrain" / "med")}, args.finetune_steps, 5e-4)
    for name, cap, filt in (("random init", "tiny-blip", "tiny-blip"),
                            ("pretrained (web)", out / "pretrain" / "captioner", out / "pretrain" / "filter"),
                            ("fine-tuned (clean)", out / "captioner" / "captioner", out / "filter" / "filter")):
        results[name] = evaluate(test_items, filter=str(filt), captioner=str(cap), device="cpu")
    rows = []
    for name, r in results.items():
        ret, capm = r["retrieval"], r["captioning"]
        rows.append(f"{name:20s} BLEU-4 {capm['bleu4']:.3f}  CIDEr {capm['cider']:.3f}  "
                    f"ITM-AUC {ret['itm_auc']:.3f}  ITC-AUC {ret['itc_auc']:.3f}  "
                    f"ITC R@1 txt/img {ret['itc']['txt_r1']:.1f}/{ret['itc']['img_r1']:.1f}  "
                    f"ITM R@1 txt/img {ret['itm']['txt_r1']:.1f}/{ret['itm']['img_r1']:.1f}")
        rows.append(f"{'':20s} e.g. {capm['examples'][0]['caption']!r} (ref {capm['examples'][0]['references'][0]!r})")
    print("\n".join(rows))
    print("train seconds:", {k: round(v) for k, v in timings.items()})
    (out / "results.json").write_text(json.dumps({"results": results, "train_seconds": timings}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
