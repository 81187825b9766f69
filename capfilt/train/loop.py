"""The training loop, shared by the single-process path and each Ray Train worker.

One optimizer step = `grad_accum` micro-batches of `batch_size` samples (split over workers).
Everything that decides the numbers (data order, texts drawn, hard negatives, dropout, queues,
momentum weights, optimizer moments, LR) is either a function of (seed, step) or saved in the
checkpoint, so `N steps` and `N/2 steps, kill, resume, N/2 steps` produce the same losses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from capfilt.config import ConfigError
from capfilt.io.folder import atomic_write
from capfilt.modeling.loading import autocast, pick_device
from capfilt.modeling.med import LOSSES, Med, MedOptions
from capfilt.modeling.med_export import export, import_med, load_med, new_med, save_med
from capfilt.train import checkpoint
from capfilt.train.config import TrainConfig
from capfilt.train.data import Collate, TrainSet, batch_plan, load_sources

log = logging.getLogger(__name__)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at the last step."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def med_options(cfg: TrainConfig) -> MedOptions:
    return MedOptions(**cfg.med.model_dump(exclude={"alpha_warmup_steps"}))


def build_model(cfg: TrainConfig):
    """(med, processor) from the config's starting point; a function of the config alone."""
    options, init = med_options(cfg), cfg.model
    if init.preset:
        return new_med(init.preset, options, seed=cfg.seed)
    if init.med:
        return load_med(init.med, options)
    med, processor, report = import_med(init.captioner, init.filter, options, seed=cfg.seed)
    log.info(
        "imported %d tensors; copied %d; fresh %s; superseded %d",
        len(report.loaded),
        len(report.copied),
        report.initialised,
        len(report.superseded),
    )
    return med, processor


def _prepare_output(cfg: TrainConfig, resume: bool, rank: int) -> Path | None:
    """The checkpoint to resume from, after refusing a resume under a changed config."""
    out = Path(cfg.output)
    saved = out / "train_config.json"
    ckpt = checkpoint.latest(out)
    if ckpt is not None and not resume:
        raise ConfigError(
            f"{out} already holds checkpoints ({ckpt.name}): pass --resume to continue, or choose another --output"
        )
    if ckpt is not None and saved.is_file():
        changed = cfg.changed_since(json.loads(saved.read_text())["fingerprint_data"])
        if changed:
            raise ConfigError(
                f"cannot resume {out}: the config changed in {changed} "
                "(only output/logging/checkpoint/worker settings may change)"
            )
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.sweep(out)
        # Atomic: under Ray the other ranks may be reading it for the same resume check.
        atomic_write(
            saved,
            json.dumps({"config": cfg.model_dump(), "fingerprint_data": cfg.fingerprint_data()}, indent=1).encode(),
        )
    return ckpt


def _trim_metrics(path: Path, step: int) -> None:
    """Drop log lines past the resumed step: they are about to be recomputed."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    device: str | None = None,
    stop_after: int | None = None,
    report=None,
) -> dict:
    """Run (or continue) training; returns {"step", "losses": [per-step dict], "outputs"}.

    `stop_after` ends the run after that step without saving or exporting, as a kill would
    (tests); `report(metrics)` is called at every logging step (Ray Train's report).
    """
    dev = pick_device(device or cfg.device)
    ckpt = _prepare_output(cfg, resume, rank)
    out = Path(cfg.output)
    torch.manual_seed(cfg.seed)
    med, processor = build_model(cfg)
    losses = cfg.loss_weights()
    med.set_trainable(losses)
    med.to(dev)
    named = [(n, p) for n, p in med.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    optimizer = torch.optim.AdamW(
        [p for _, p in named],
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    step = consumed = 0
    torch.manual_seed(cfg.seed + rank)  # ranks draw different hard negatives, deterministically
    if ckpt is not None:
        meta = checkpoint.load(ckpt, med, optimizer, names, rank, cfg.seed)
        step, consumed = meta["step"], meta["consumed"]
        log.info("resuming %s at step %d", out, step)
    if rank == 0:
        _trim_metrics(out / "metrics.jsonl", step)
    model = med
    if world > 1:
        # Queues are per-worker state: broadcasting rank 0's buffers each step would erase them.
        with warnings.catch_warnings():  # its replacement still syncs at init; until then this is the way
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            model = torch.nn.parallel.DistributedDataParallel(
                med, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False
            )
    items = load_sources(cfg.data)
    collate = Collate(
        processor.tokenizer,
        cfg.prompt,
        cfg.max_text_tokens,
        cfg.max_caption_tokens,
        bos_token_id=med.config.text_config.bos_token_id,
    )
    loader = torch.utils.data.DataLoader(
        TrainSet(items, processor.image_processor, cfg.augment),
        batch_sampler=batch_plan(len(items), cfg.batch_size, cfg.seed, consumed, rank, world),
        collate_fn=collate,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the loader off the global RNG
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
    )
    batches = iter(loader)
    history, window, t0 = [], [], time.time()
    # Redrawn every 30 s when stderr is a log file rather than a terminal.
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        disable=not progress or rank != 0,
        desc=cfg.task,
        unit="step",
        mininterval=0.1 if sys.stderr.isatty() else 30,
    )
    med.train()
    while step < cfg.steps:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        alpha = cfg.med.alpha * min(1.0, (step + 1) / max(1, cfg.med.alpha_warmup_steps))
        parts = {k: 0.0 for k in (*LOSSES, "loss")}
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(dev, non_blocking=True) for k, v in next(batches).items()}
            sync = world == 1 or micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else model.no_sync(), autocast(dev, cfg.precision):
                result = model(batch, losses, alpha)
            (result["loss"] / cfg.grad_accum).backward()
            for k, v in result.items():
                parts[k] += float(v.detach()) / cfg.grad_accum
            consumed += 1
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        record = {"step": step, "lr": lr, **{k: v for k, v in parts.items() if k == "loss" or losses.get(k)}}
        history.append(record)
        window.append(record)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            _log(out, window, world, rank, bar, t0, report)
            window, t0 = [], time.time()
        if stop_after is not None and step >= stop_after and step < cfg.steps:
            bar.close()
            return {"step": step, "losses": history, "outputs": {}}
        if step % cfg.save_every == 0 or step == cfg.steps:
            checkpoint.save(out, step, consumed, med, optimizer, names, cfg.fingerprint(), rank, world)
            if rank == 0:
                checkpoint.prune(out, cfg.keep_checkpoints)
    bar.close()
    outputs = _export(cfg, med, processor, out) if rank == 0 else {}
    if world > 1:
        torch.distributed.barrier()
    return {"step": step, "losses": history, "outputs": outputs}


def _log(out: Path, window: list[dict], world: int, rank: int, bar, t0: float, report) -> None:
    keys = [k for k in window[-1] if k not in ("step", "lr")]
    mean = torch.tensor([sum(r[k] for r in window) / len(window) for k in keys], dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(mean)
        mean /= world
    metrics = {
        "step": window[-1]["step"],
        "lr": window[-1]["lr"],
        **dict(zip(keys, mean.tolist())),
        "steps_per_s": len(window) / max(1e-9, time.time() - t0),
    }
    if rank == 0:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        bar.set_postfix({k: f"{metrics[k]:.3f}" for k in keys})
    if report is not None:
        report(metrics)


def _export(cfg: TrainConfig, med: Med, processor, out: Path) -> dict:
    med = med.to("cpu").eval()
    written = {}
    for role in cfg.exports():
        target = out / role
        written[role] = str(save_med(med, target, processor) if role == "med" else export(med, role, target, processor))
    (out / "outputs.json").write_text(json.dumps(written, indent=1))
    return written
