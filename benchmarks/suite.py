"""One size of the benchmark: capfilt and the stock way on the same images, texts and weights.

Both sides of every comparison are timed alike: each model (capfilt's and stock) is loaded once,
both sides get an untimed warm-up, then they run alternately (ours, stock, ours, stock, ...) for
`Size.repeats` rounds (at least 2), so both see the same background load, and each side's fastest
round (wall clock) is reported, with that round's CPU time.

Order of work:
1. warm-ups on the 1-image warm-up shard: capfilt end to end, the plain way on its first text.
2. rounds of capfilt, then the plain transformers way:
   - capfilt end to end over a shard (decode -> caption -> score -> rerank -> decide -> write), with
     per-stage times; then the filter (all texts, and with the ITC->ITM cascade) and CLIP alone on
     the pre-decoded images. The first round's candidate texts (web text + K captions) are the
     texts every measurement scores, so both sides do exactly the same work.
   - the plain way, image by image: decode, generate, BlipForImageTextRetrieval per (image, text)
     pair (ITM forward + ITC forward), CLIP per pair; timed per part; its scores compared with ours.
3. captioner vs stock `generate(num_return_sequences=K)` on the same pixel tensors, alternately
   (`paired`); greedy ids compared.
4. (sizes in `--laion-sizes`) the same at LAION-COCO's K = 40 (`laion_rows`): with LAION-COCO's
   warps on both sides (equal work), and with its full schedule (max lengths 20/30/30/45/45 per
   group of 8, forced end of sequence) against the nearest single stock call.
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import ZERO, Size, Timing, fastest, make_corpus, once, paired, stock_mode
from benchmarks.limits import decode_part, model_parts


def _config(size: Size, args, shard: str, out: Path):
    from capfilt.config import parse_config

    return parse_config(
        {
            "input": [shard],
            "output": str(out),
            "seed": 0,
            "device": args.device,
            "precision": args.precision,
            "batch_size": size.images,
            "decode": {"max_side": max(1024, size.image_size)},
            "captioner": {
                "model": size.blip,
                "num_captions": args.k,
                "top_p": 0.9,
                "min_new_tokens": 5,
                "max_new_tokens": args.max_new_tokens,
            },
            "filter": {"model": size.blip},
            "clip": {"model": size.clip},
            "decide": {"web": {"itm": 0.5}, "synthetic": {"itm": 0.5}},
        }
    )


def run_pipeline(stages, config, url: str, out: Path, device):
    """The local runner's loop with stages built beforehand: (Timing, Timing per stage, batches)."""
    from capfilt.io.shard_writer import write_shard
    from capfilt.io.shards import shard_id
    from capfilt.runners.local import row_batches

    per_stage, batches = defaultdict(lambda: ZERO), []

    def loop():
        for batch in row_batches(url, config, config.batch_size):
            for stage in stages:
                t, batch = once(lambda: stage(batch), device)  # noqa: B023 - called right here
                per_stage[type(stage).__name__] += t
            batches.append(batch)
        t, _ = once(lambda: write_shard(out, shard_id(url), batches), device)
        per_stage["write"] += t

    total, _ = once(loop, device)
    return total, dict(per_stage), batches


def _work(batch: dict) -> dict:
    """The scored candidates of a decided batch, flattened: images, texts and our scores."""
    from capfilt.stages.rows import scorable

    rows, index, texts = scorable(batch)
    ours = {s: [batch[s][r][j] for r, idx in zip(rows, index) for j in idx] for s in ("itm", "itc", "clip")}
    return {
        "images": [batch["image"][r] for r in rows],
        "seeds": [int(batch["seed"][r]) for r in rows],
        "bytes": [batch["image_bytes"][r] for r in rows],
        "texts": texts,
        "ours": {s: np.asarray(v, dtype=np.float64) for s, v in ours.items()},
    }


def _stock_generate(model, pixels, cap, k: int, sample: bool, max_new: int):
    prompt = torch.tensor([cap.prompt_ids + [cap.eos]] * len(pixels), device=pixels.device)
    kw = dict(do_sample=True, top_p=0.9, top_k=0, num_return_sequences=k) if sample else dict(do_sample=False)
    return model.generate(
        pixel_values=pixels, input_ids=prompt, num_beams=1, min_new_tokens=5, max_new_tokens=max_new, **kw
    )


def greedy_check(cap, stock, pixels, seeds, device) -> tuple[bool, str]:
    """Greedy ids of our decode loop and of stock generate, in fp32, on the same pixels."""
    saved = cap.decoding, cap.precision
    cap.decoding, cap.precision = cap.decoding.replace(sample=False, max_new_tokens=12), "fp32"
    try:
        ours = cap.generate_ids(pixels, seeds)
    finally:
        cap.decoding, cap.precision = saved
    with torch.no_grad():
        ref = _stock_generate(stock, pixels, cap, 1, False, 12)[:, len(cap.prompt_ids) :]
    width = min(ours.shape[1], ref.shape[1])
    same = torch.equal(ours[:, :width].cpu(), ref[:, :width].cpu())
    return same, f"greedy ids {'identical' if same else 'DIFFER'} ({len(pixels)} images x {width} tokens)"


# LAION-COCO's production decoding (andreaskoepf/laion_idle_cap docker/c_h2.py; the same values as
# pipelines/laion_coco.yaml): warps shared by every sample, and the five groups' maximum lengths.
LAION_WARPS = dict(top_k=9607, top_p=0.2427084604681384, repetition_penalty=1.3, min_new_tokens=5)
LAION_FORCE_EOS = 0.17937666742679637
LAION_MAX = (20, 30, 30, 45, 45)


def _new_tokens(ids: torch.Tensor, pad: int) -> float:
    """Tokens decoded per caption (end-of-sequence included, padding not)."""
    return float((ids != pad).sum()) / max(1, len(ids))


def laion_decodings(decoding, k: int):
    """(LAION-COCO's warps with one maximum length, its whole schedule) at K = ``k``."""
    from capfilt.modeling.decoding import Group

    per = k // len(LAION_MAX)
    uniform = decoding.replace(
        num_captions=k,
        sample=True,
        temperature=1.0,
        max_new_tokens=max(LAION_MAX),
        force_eos_prob=None,
        schedule=None,
        **LAION_WARPS,
    )
    groups = tuple(
        Group(n=per + (k - per * len(LAION_MAX) if i == 0 else 0), max_new_tokens=m) for i, m in enumerate(LAION_MAX)
    )
    return uniform, uniform.replace(force_eos_prob=LAION_FORCE_EOS, schedule=groups)


def laion_rows(cap, stock, pixels, seeds, args, device, reps: int) -> list[dict]:
    """Captioner vs stock `generate(num_return_sequences=k)` at LAION-COCO's K, alternately, on the
    same pixel tensors: (b40) both sides with LAION's warps and one maximum length (the same work
    per row); (b40+) capfilt with LAION's whole schedule (per-group maximum lengths, forced EOS)
    against the nearest single stock call, which can express neither (every row up to the longest
    maximum). Checked: greedy ids with LAION's penalty and minimum length equal stock's."""
    k, longest = args.laion_k, max(LAION_MAX)
    uniform, scheduled = laion_decodings(cap.decoding, k)
    prompt = torch.tensor([cap.prompt_ids + [cap.eos]] * len(pixels), device=pixels.device)

    def stock_generate(images=pixels, ids=prompt, sample=True, steps=longest):
        kw = (
            dict(do_sample=True, num_return_sequences=k, top_k=LAION_WARPS["top_k"], top_p=LAION_WARPS["top_p"])
            if sample
            else dict(do_sample=False)
        )
        with stock_mode(device, args.precision):
            return stock.generate(
                pixel_values=images,
                input_ids=ids,
                num_beams=1,
                max_new_tokens=steps,
                min_new_tokens=LAION_WARPS["min_new_tokens"],
                repetition_penalty=LAION_WARPS["repetition_penalty"],
                **kw,
            )

    def ours_with(decoding):
        def run():
            saved, cap.decoding = cap.decoding, decoding
            try:
                return cap.generate_ids(pixels, seeds)
            finally:
                cap.decoding = saved

        return run

    # Greedy ids with LAION's penalty and minimum length, fp32, against stock's.
    saved = cap.decoding, cap.precision
    cap.decoding, cap.precision = uniform.replace(sample=False, max_new_tokens=12), "fp32"
    try:
        greedy = cap.generate_ids(pixels[:2], seeds[:2])
    finally:
        cap.decoding, cap.precision = saved
    with torch.no_grad():
        ref = stock.generate(
            pixel_values=pixels[:2],
            input_ids=prompt[:2],
            do_sample=False,
            num_beams=1,
            max_new_tokens=12,
            min_new_tokens=LAION_WARPS["min_new_tokens"],
            repetition_penalty=LAION_WARPS["repetition_penalty"],
        )[:, len(cap.prompt_ids) :]
    width = min(greedy.shape[1], ref.shape[1])
    same = torch.equal(greedy[:, :width].cpu(), ref[:, :width].cpu())
    note = f"greedy ids with penalty 1.3 {'identical' if same else 'DIFFER'} (2 images x {width} tokens)"

    ours_uniform, ours_scheduled = ours_with(uniform), ours_with(scheduled)
    flops = {}
    for name, fn in [("b40", ours_uniform), ("b40+", ours_scheduled)]:  # untimed warm-ups, FLOPs counted
        with FlopCounterMode(display=False) as counter:
            fn()
        flops[name] = counter.get_total_flops()
    stock_generate(pixels[:1], prompt[:1])
    t_u, t_gen, ids_u, stock_ids = paired(ours_uniform, stock_generate, device, reps)
    t_s, t_gen2, ids_s, _ = paired(ours_scheduled, stock_generate, device, reps)
    stock_tokens = _new_tokens(stock_ids[:, len(cap.prompt_ids) :], cap.pad)
    n = len(pixels)
    warps = f"top_k {LAION_WARPS['top_k']}, top_p {LAION_WARPS['top_p']:.4f}, penalty 1.3, min 5"
    return [
        _row(
            "b40",
            f"captioner K={k} vs stock generate(num_return_sequences={k}), LAION-COCO warps ({warps}), "
            f"max {longest} both",
            t_u,
            t_gen,
            f"{note}; tokens/caption {_new_tokens(ids_u, cap.pad):.1f} vs {stock_tokens:.1f}",
            same,
            n,
            flops["b40"],
        ),
        _row(
            "b40+",
            f"captioner with LAION-COCO's schedule (max {'/'.join(map(str, LAION_MAX))} per group, "
            f"force_eos_prob {LAION_FORCE_EOS:.4f}) vs the same stock call (max {longest}, no forced EOS)",
            t_s,
            t_gen2,
            f"tokens/caption {_new_tokens(ids_s, cap.pad):.1f} vs {stock_tokens:.1f}",
            None,
            n,
            flops["b40+"],
        ),
    ]


def plain_way(work, cap_model, filt_model, processor, clip, args, device):
    """What a user writes with transformers + open_clip alone, one image at a time."""
    t, scores = defaultdict(lambda: ZERO), defaultdict(list)

    def caption(image):
        inputs = processor(images=image, text="a picture of ", return_tensors="pt").to(device)
        out = cap_model.generate(
            **inputs,
            do_sample=True,
            top_p=0.9,
            top_k=0,
            num_return_sequences=args.k,
            min_new_tokens=5,
            max_new_tokens=args.max_new_tokens,
        )
        return processor.batch_decode(out, skip_special_tokens=True)

    def itm_itc(image, texts):
        for text in texts:
            pair = processor(images=image, text=text, truncation=True, max_length=35, return_tensors="pt")
            pair = pair.to(device)
            scores["itm"].append(filt_model(**pair).itm_score.float().softmax(-1)[0, 1].item())
            scores["itc"].append(filt_model(**pair, use_itm_head=False).itm_score.float()[0, 0].item())

    def clip_pairs(image, texts):
        for text in texts:
            image_feat = clip.model.encode_image(clip.preprocess(image)[None].to(device))
            text_feat = clip.model.encode_text(clip.tokenizer([text]).to(device))
            sim = (F.normalize(image_feat.float(), dim=-1) * F.normalize(text_feat.float(), dim=-1)).sum()
            scores["clip"].append(sim.item())

    for data, texts in zip(work["bytes"], work["texts"]):
        took, image = once(lambda: Image.open(io.BytesIO(data)).convert("RGB"), device)  # noqa: B023 - called within this iteration
        t["decode"] += took
        with stock_mode(device, args.precision):
            t["caption"] += once(lambda: caption(image), device)[0]  # noqa: B023 - called within this iteration
            t["filter"] += once(lambda: itm_itc(image, texts), device)[0]  # noqa: B023 - called within this iteration
            t["clip"] += once(lambda: clip_pairs(image, texts), device)[0]  # noqa: B023 - called within this iteration
    return dict(t), {s: np.asarray(v) for s, v in scores.items()}


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) if len(a) else 0.0


def cascade_band(full, quantiles):
    """The ITC->ITM cascade whose ITM band lies between the given quantiles of this run's ITC."""
    from capfilt.config import CascadeConfig

    lo, hi = (float(q) for q in np.quantile(np.concatenate(full.itc), quantiles))
    return CascadeConfig(itc_low=lo, itc_high=hi)


def cascade_effect(cascade, full, part, quantiles) -> dict:
    """The cascade's scores `part` vs the full scores on the same texts: ITM share, decisions changed."""
    lo, hi = cascade.itc_low, cascade.itc_high
    itm_full = np.concatenate(full.itm)
    threshold = float(np.median(itm_full))  # random weights: a threshold that splits the texts
    computed = np.concatenate(part.itm_computed)
    full_keep = itm_full >= threshold
    verdicts = [cascade.verdict(s) for s in np.concatenate(part.itc)]
    part_keep = np.array(
        [v == "above" or (v == "band" and m >= threshold) for v, m in zip(verdicts, np.concatenate(part.itm))]
    )
    return {
        "lo": lo,
        "hi": hi,
        "quantiles": list(quantiles),
        "threshold": threshold,
        "itm_share": float(computed.mean()),
        "decisions_same": float((full_keep == part_keep).mean()),
        "kept_full": int(full_keep.sum()),
        "kept_cascade": int(part_keep.sum()),
        "texts": len(itm_full),
    }


def _row(
    rid: str, what: str, ours: Timing, base: Timing, check: str, ok: bool | None, n: int, flops: float | None = None
) -> dict:
    """One comparison; ``flops``: what ours computed in that work (FlopCounterMode), for its share of the peak."""
    return {
        "flops": flops,
        "images": n,
        "id": rid,
        "what": what,
        "ours": ours.wall / n,
        "base": base.wall / n,
        "ratio": base.wall / ours.wall,
        "ours_cpu": ours.cpu / n,
        "base_cpu": base.cpu / n,
        "cpu_ratio": base.cpu / ours.cpu,
        "check": check,
        "ok": ok,
    }


def run_size(size: Size, args, workdir: Path, log) -> dict:
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    from capfilt.modeling.loading import pick_device
    from capfilt.stages import Caption, Clip, Filter, build_stages

    device, reps = pick_device(args.device), max(2, size.repeats)
    shard, warm_shard = make_corpus(workdir / "corpus", size)
    config = _config(size, args, shard, workdir / "out")
    log(f"[{size.name}] loading capfilt stages ({size.blip}, {size.clip}) and the stock models")
    stages = build_stages(config)
    by_class = {type(stage): stage for stage in stages}
    # (the benchmark's rerank is one CLIP model: the chain's last and only link)
    cap, filt, clip = by_class[Caption].captioner, by_class[Filter].filter, by_class[Clip].models[-1]
    checks = {name: round(m.check["seconds"], 3) for name, m in [("Caption", cap), ("Filter", filt), ("Clip", clip)]}
    stock_cap = BlipForConditionalGeneration.from_pretrained(cap.ref.location).eval().to(device)
    stock_filt = BlipForImageTextRetrieval.from_pretrained(filt.ref.location).eval().to(device)

    def plain(work):
        return plain_way(work, stock_cap, stock_filt, filt.processor, clip, args, device)

    # Untimed warm-ups of both sides, on the warm-up shard.
    warm = _work(run_pipeline(stages, config, warm_shard, workdir / "warm", device)[2][0])
    plain({**warm, "texts": [t[:1] for t in warm["texts"]]})

    # Rounds of ours then stock. Ours: end to end, then the filter (all texts, then with the
    # cascade) and CLIP alone on the first round's pre-decoded images and texts. Stock: the plain
    # way, timed per part. (a), (c) compare a stage alone with the plain way's part for it, (e) end
    # to end with the plain way's whole run; every side's fastest round is taken separately, and
    # for the plain way's parts too: the fastest filter part and the fastest CLIP part may come
    # from different rounds (each is still a whole measured part; both sides got the same rounds).
    log(
        f"[{size.name}] capfilt (end to end, then filter and CLIP alone) vs the plain transformers way "
        f"(image by image), alternating, {reps} rounds, {size.images} images, K={args.k}"
    )
    ours, stock, runs = defaultdict(list), defaultdict(list), []
    work = cascade = None
    for _ in range(reps):
        total, per_stage, batches = run_pipeline(stages, config, shard, workdir / "out", device)
        ours["e2e"].append(total)
        runs.append(per_stage)
        if work is None:  # the first round's texts are the work of every round, both sides
            work = _work(batches[0])
        images, texts = work["images"], work["texts"]
        took, full = once(lambda: filt.score_detailed(images, texts), device)  # noqa: B023 - called within this iteration
        ours["filter"].append(took)
        if cascade is None:
            cascade = cascade_band(full, args.cascade)
        took, part = once(lambda: filt.score_detailed(images, texts, cascade), device)  # noqa: B023 - called within this iteration
        ours["cascade"].append(took)
        ours["clip"].append(once(lambda: clip.score(images, texts), device)[0])  # noqa: B023 - called within this iteration
        parts, plain_scores = plain(work)
        for name, took in parts.items():
            stock[name].append(took)
        stock["total"].append(sum(parts.values(), ZERO))
    n, n_texts = len(work["images"]), sum(len(t) for t in work["texts"])
    e2e, t_filt, t_casc, t_clip = (fastest(ours[k]) for k in ("e2e", "filter", "cascade", "clip"))
    per_stage = runs[ours["e2e"].index(e2e)]  # the stage times of the fastest end-to-end round
    plain_t = {name: fastest(stock[name]) for name in parts}
    plain_total = fastest(stock["total"])
    casc = cascade_effect(cascade, full, part, args.cascade)
    tol = 1e-4 if args.precision == "fp32" else 5e-2
    diffs = {s: _max_diff(work["ours"][s], plain_scores[s]) for s in ("itm", "itc", "clip")}

    log(f"[{size.name}] captioner vs stock generate, alternating, {reps} rounds, on the same pixel tensors")
    pixels = cap.pixel_values(work["images"])

    def stock_generate():
        with stock_mode(device, args.precision):
            return _stock_generate(stock_cap, pixels, cap, args.k, True, args.max_new_tokens)

    with stock_mode(device, args.precision):
        _stock_generate(stock_cap, pixels[:1], cap, args.k, True, args.max_new_tokens)  # warm-up
    t_cap, t_gen, ids, stock_ids = paired(lambda: cap.generate_ids(pixels, work["seeds"]), stock_generate, device, reps)
    greedy_ok, greedy_note = greedy_check(cap, stock_cap, pixels[:2], work["seeds"][:2], device)
    laion = []
    if size.name in args.laion_sizes:
        log(f"[{size.name}] captioner vs stock generate at LAION-COCO's K={args.laion_k}, alternating, {reps} rounds")
        m = args.laion_images or n  # K = 40 on a CPU: a few images keep the stock side within minutes
        laion = laion_rows(cap, stock_cap, pixels[:m], work["seeds"][:m], args, device, reps)
    log(f"[{size.name}] model parts alone (ViT, text encoder, decode loop, CLIP towers), FLOPs counted")
    parts = model_parts(cap, filt, clip, work, device, reps)
    if laion:  # the decode loop alone at K = 40 too, on the images of the K = 40 rows
        saved, cap.decoding = cap.decoding, laion_decodings(cap.decoding, args.laion_k)[0]
        try:
            parts.append(decode_part(cap, pixels[:m], work["seeds"][:m], device, reps, "decode40"))
        finally:
            cap.decoding = saved
    part_flops = {p["key"]: p["flops"] for p in parts}

    alone = {"Caption": t_cap, "Filter": t_filt, "Clip": t_clip}
    slowest = max(alone, key=lambda k: alone[k].wall)
    stages_sum = sum(alone.values(), ZERO)
    e2e_casc = e2e - (t_filt - t_casc)
    scores_ok = diffs["itm"] < tol and diffs["itc"] < tol
    rows = [
        _row(
            "a",
            "filter: one pass per image vs stock per-pair forward (ITM + ITC)",
            t_filt,
            plain_t["filter"],
            f"max |Δitm| {diffs['itm']:.1e}, max |Δitc| {diffs['itc']:.1e}",
            scores_ok,
            n,
            part_flops["vit"] + part_flops["text"],
        ),
        _row(
            "a+",
            f"filter with ITC->ITM cascade (ITM on {casc['itm_share']:.0%} of texts) vs stock per-pair",
            t_casc,
            plain_t["filter"],
            f"{casc['decisions_same']:.0%} of keep decisions unchanged",
            None,
            n,
        ),
        _row(
            "b",
            f"captioner vs stock generate(num_return_sequences={args.k}, do_sample, top_p=0.9)",
            t_cap,
            t_gen,
            greedy_note + f"; sampled ids {tuple(ids.shape)} vs {tuple(stock_ids.shape)} (with prompt)",
            greedy_ok,
            n,
            part_flops["vit"] + part_flops["decode"],
        ),
        *laion,
        _row(
            "c",
            "CLIP: image once, trimmed text batches vs per candidate",
            t_clip,
            plain_t["clip"],
            f"max |Δclip| {diffs['clip']:.1e}",
            diffs["clip"] < tol,
            n,
            part_flops["clip_image"] + part_flops["clip_text"],
        ),
        _row(
            "d",
            f"pipeline efficiency: end to end vs slowest stage alone ({slowest})",
            e2e,
            alone[slowest],
            "same rounds as (e)",
            None,
            n,
        ),
        _row(
            "d+",
            "pipeline overhead: end to end vs sum of the model stages alone",
            e2e,
            stages_sum,
            "same rounds as (e)",
            None,
            n,
        ),
        _row(
            "e",
            "end to end vs the plain transformers way (per image / per pair)",
            e2e,
            plain_total,
            "scores of (a), (c) come from these rounds",
            scores_ok,
            n,
            sum(part_flops[k] for k in ("vit", "vit", "text", "decode", "clip_image", "clip_text")),
        ),
        _row(
            "e+",
            "end to end with the cascade (derived: (e) minus the filter time saved)",
            e2e_casc,
            plain_total,
            "derived, not a separate run",
            None,
            n,
        ),
    ]
    per_image = lambda d: {k: round(v.wall / n, 4) for k, v in d.items()}
    return {
        "size": size.name,
        "blip": size.blip,
        "clip": size.clip,
        "images": n,
        "k": args.k,
        "texts": n_texts,
        "image_size": size.image_size,
        "rows": rows,
        "stages": per_image(per_stage),
        "alone": per_image(alone),
        "plain": per_image(plain_t),
        "self_check_s": checks,
        "cascade": casc,
        "diffs": diffs,
        "repeats": reps,
        "parts": parts,
        "e2e": {"wall": e2e.wall, "cpu": e2e.cpu},
    }
