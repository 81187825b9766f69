"""Multi-worker MED training (`capfilt train ... --workers N`) with Ray Train's `TorchTrainer` (DDP).

Each worker runs the same `capfilt.train.loop.train` as the single-process path, on its share of
every micro-batch; Ray sets up the process group (gloo on CPU, nccl on GPU). Checkpoints and
exports are written by rank 0 straight into `output`, so on a cluster `output` must be on storage
every worker sees (NFS, a mounted bucket); resume works as in the single-process path.
"""

from __future__ import annotations

import json
from pathlib import Path

import ray


def _train_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from capfilt.train.config import TrainConfig
    from capfilt.train.loop import train

    torch.set_num_threads(loop_config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrainConfig.model_validate(loop_config["config"])
    device = "cpu"
    if cfg.ray.use_gpu:
        device = str(ray.train.torch.get_device())
    result = train(
        cfg,
        resume=loop_config["resume"],
        progress=False,
        rank=rank,
        world=world,
        device=device,
        stop_after=loop_config["stop_after"],
        report=ray.train.report,
    )
    if rank == 0:
        summary = {"step": result["step"], "losses": result["losses"], "outputs": result["outputs"], "world": world}
        (Path(cfg.output) / "ray_result.json").write_text(json.dumps(summary))


def train_ray(cfg, *, resume: bool = False, stop_after: int | None = None, num_cpus: int | None = None) -> dict:
    """Run `cfg` on `cfg.workers` Ray Train workers; returns what the single-process `train` returns.

    Joins `cfg.ray.address` when set, else starts a local Ray (with `num_cpus`) and shuts it down
    afterwards; an already initialised Ray is used as it is.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"output": str(out)})
    (out / "ray_result.json").unlink(missing_ok=True)
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=cfg.ray.address,
            num_cpus=None if cfg.ray.address else num_cpus,
            include_dashboard=False,
            log_to_driver=True,
        )
    try:
        threads = max(1, int(cfg.ray.cpus_per_worker))  # a worker's torch threads stay within its CPU share
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={
                "config": cfg.model_dump(),
                "resume": resume,
                "stop_after": stop_after,
                "threads": threads,
            },
            torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=cfg.workers, use_gpu=cfg.ray.use_gpu, resources_per_worker={"CPU": cfg.ray.cpus_per_worker}
            ),
            run_config=RunConfig(name=f"capfilt-{cfg.task}", storage_path=str(out / "ray")),
        )
        trainer.fit()
    finally:
        if started:
            ray.shutdown()
    summary_path = out / "ray_result.json"
    if not summary_path.is_file():
        raise RuntimeError(f"Ray Train finished without a result from rank 0 (see the logs under {out / 'ray'})")
    return json.loads(summary_path.read_text())
