"""`make demo-dense`: whole-caption scoring vs claim-level verification, against the truth.

On the shapes world's dense captions (`synthetic.dense`: 3-4 claims each, half of the captions
with exactly one wrong claim), one `capfilt run` of the dense recipe scores every caption whole
(ITM/ITC of its first `max_text_tokens` tokens, as any filter reads a long text) and claim by
claim (the claims section). Then, for each method, a threshold is set so that the same share of
right captions is kept (the same false-drop rate), and the table says how many wrong captions
each method catches, and what `trim` makes of them: cut to a fully right caption, or not.

The filter is a tiny BLIP filter trained here on single true captions of the world (`train_filter`,
a few CPU minutes), or any filter given with --filter (`make demo`'s round-1 filter, say).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from capfilt.synthetic.text import normalise

KEEP_RATES = (0.95, 0.90)  # shares of right captions kept: the false-drop rates 5% and 10%
DEFAULTS = {"train_images": 800, "steps": 400, "batch_size": 16, "dense": 600, "seed": 0}


def train_filter(out: Path, *, images: int, steps: int, batch_size: int, seed: int) -> str:
    """A tiny BLIP filter (ITC + ITM with hard negatives) trained from the tiny preset on single
    true captions of the world; returns the stock BlipForImageTextRetrieval export's directory."""
    from capfilt import synthetic
    from capfilt.train.config import load_train_config
    from capfilt.train.loop import train

    export = out / "filter" / "filter"
    if export.is_dir():
        return str(export)
    data = out / "clean"
    if not (data / "_done").is_file():
        split = synthetic.make_split("dense-train", images, seed=seed, image_size=64)
        synthetic.write_shards(data, split, per_shard=images)
        (data / "_done").write_text("")
    overrides = [
        "model.med=null",
        "model.preset=tiny-blip",
        f"data.0.path={data}/*.tar",
        f"steps={steps}",
        f"batch_size={batch_size}",
        f"save_every={steps}",
        "log_every=100",
        "med.temp=0.2",  # as the demo loop: a tiny MED's ITC starts learning with 0.2, not 0.07
        "optim.lr=1.0e-3",
        "optim.warmup_steps=50",
    ]
    cfg = load_train_config(
        "pipelines/train/tiny-finetune-filter.yaml", "finetune-filter", overrides, output=str(out / "filter")
    )
    train(cfg, resume=True, progress=True)
    return str(export)


def score_run(out: Path, filter_dir: str, *, n: int, seed: int, recipe: str) -> Path:
    """Dense captions as web texts, one `capfilt run` of ``recipe`` with ``filter_dir`` over them."""
    from capfilt.config import load_config
    from capfilt.pipeline import run
    from capfilt.synthetic.dense import make_dense_split, write_dense

    data = out / "dense"
    if not (data / "_done").is_file():
        write_dense(data, make_dense_split("dense", n, seed=seed, image_size=64), per_shard=max(1, n // 2))
        (data / "_done").write_text("")
    shards = [str(p) for p in sorted(data.glob("*.tar"))]
    cfg = load_config(recipe, [f"filter.model={filter_dir}"]).model_copy(
        update={"input": shards, "output": str(out / "run")}
    )
    result = run(cfg, progress=True, fresh=True)
    if not result.ok:
        raise RuntimeError(f"the dense run failed: {result.shard_errors}")
    return out / "run"


def _caught_at(right: np.ndarray, wrong: np.ndarray, keep: float) -> tuple[float, float, float]:
    """(threshold, share of right kept, share of wrong caught) at the threshold that keeps ``keep``
    of the right captions (a caption is kept at or above it)."""
    drop = int(np.floor((1.0 - keep) * len(right) + 1e-9))  # right captions allowed below the threshold
    threshold = float(np.sort(right)[drop])
    return threshold, float(np.mean(right >= threshold)), float(np.mean(wrong < threshold))


def evaluate(run_dir: Path, truth_file: Path, score: str, max_tokens: int, tokenizer=None) -> dict:
    """The numbers of the table, from the run's ledger and the dense truth."""
    import pyarrow.parquet as pq

    truth = json.loads(truth_file.read_text())
    rows = [r for r in pq.read_table(run_dir / "ledger").to_pylist() if r["candidate"] == 0 and r["claim_scores"]]
    is_wrong = np.array([truth[r["key"]]["wrong"] is not None for r in rows])
    whole = np.array([r[score] for r in rows], dtype=float)
    claim = np.array([min(r["claim_scores"]) for r in rows], dtype=float)
    errors = [truth[r["key"]]["error"] for r in rows]
    out = {"captions": len(rows), "wrong": int(is_wrong.sum()), "score": score, "rates": []}
    for keep in KEEP_RATES:
        tw, kept_w, caught_w = _caught_at(whole[~is_wrong], whole[is_wrong], keep)
        tc, kept_c, caught_c = _caught_at(claim[~is_wrong], claim[is_wrong], keep)
        by_error = {}
        for e in ("attribute", "count", "position"):
            sel = np.array([x == e for x in errors])
            by_error[e] = (float(np.mean(whole[sel] < tw)), float(np.mean(claim[sel] < tc)), int(sel.sum()))
        out["rates"].append(
            {
                "keep": keep,
                "whole": {"threshold": tw, "right_kept": kept_w, "caught": caught_w},
                "claims": {"threshold": tc, "right_kept": kept_c, "caught": caught_c},
                "by_error": by_error,
                "trim": _trim(rows, truth, tc),
            }
        )
    if tokenizer is not None:  # how often the wrong claim starts past what a whole-text filter reads
        past = []
        for r in rows:
            t = truth[r["key"]]
            if t["wrong"] is not None:
                before = " ".join(t["claims"][: t["wrong"]])
                past.append(len(tokenizer(before, add_special_tokens=True)["input_ids"]) >= max_tokens)
        out["wrong_past_window"] = float(np.mean(past)) if past else None
    out["max_tokens"] = max_tokens
    return out


def _trim(rows: list[dict], truth: dict, threshold: float) -> dict:
    """Policy trim at ``threshold``: wrong captions cut to only right claims (recovered), wrong
    captions that still hold the wrong claim, and right captions that lose a claim."""
    recovered = still_wrong = emptied = right_cut = right_n = 0
    for r in rows:
        t = truth[r["key"]]
        kept = [c for c, s in zip(r["claims"], r["claim_scores"]) if s >= threshold]
        if t["wrong"] is None:
            right_n += 1
            right_cut += len(kept) < len(r["claims"])
            continue
        bad = normalise(t["claims"][t["wrong"]])
        if not kept:
            emptied += 1
        elif any(normalise(c) == bad for c in kept):
            still_wrong += 1
        else:
            recovered += 1
    n_wrong = max(1, recovered + still_wrong + emptied)
    return {
        "recovered": recovered / n_wrong,
        "still_wrong": still_wrong / n_wrong,
        "emptied": emptied / n_wrong,
        "right_cut": right_cut / max(1, right_n),
    }


def format_table(result: dict) -> str:
    s = result["score"].upper()
    lines = [
        f"Dense captions: {result['captions']} ({result['wrong']} with exactly one wrong claim); score {s}; "
        f"whole-caption scoring reads the first {result['max_tokens']} tokens",
    ]
    if result.get("wrong_past_window") is not None:
        lines.append(
            f"wrong claim starts past those tokens in {100 * result['wrong_past_window']:.1f}% of wrong captions"
        )
    lines += [
        "",
        "| right captions kept | wrong caught: whole caption | wrong caught: claim level | ratio "
        "| attribute / count / position caught (whole → claims) | trim: wrong → fully right | trim: still wrong "
        "| trim: right captions cut |",
        "|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in result["rates"]:
        w, c = r["whole"], r["claims"]
        ratio = c["caught"] / w["caught"] if w["caught"] else float("inf")
        errs = " / ".join(f"{100 * a:.0f}→{100 * b:.0f}%" for a, b, _ in r["by_error"].values())
        lines.append(
            f"| {100 * c['right_kept']:.1f}% (whole {100 * w['right_kept']:.1f}%) | {100 * w['caught']:.1f}% "
            f"| {100 * c['caught']:.1f}% | {ratio:.2f}x | {errs} | {100 * r['trim']['recovered']:.1f}% "
            f"| {100 * r['trim']['still_wrong']:.1f}% | {100 * r['trim']['right_cut']:.1f}% |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m capfilt.claims_demo", description=__doc__.splitlines()[0])
    p.add_argument("out", help="output folder (training, data, run, result.json)")
    p.add_argument("--filter", help="a filter to use instead of training one (preset, directory)")
    p.add_argument("--recipe", default="pipelines/demo/dense_demo.yaml")
    for key, value in DEFAULTS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    filter_dir = args.filter or train_filter(
        out, images=args.train_images, steps=args.steps, batch_size=args.batch_size, seed=args.seed
    )
    run_dir = score_run(out, filter_dir, n=args.dense, seed=args.seed, recipe=args.recipe)
    from capfilt.config import load_config
    from capfilt.modeling.presets import resolve_blip

    cfg = load_config(args.recipe)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_blip(filter_dir, "filter", None).location)
    result = evaluate(
        run_dir, out / "dense" / "dense_truth.json", cfg.claims.score, cfg.filter.max_text_tokens, tokenizer
    )
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
