"""Ray Train: a 2-worker DDP run (gloo on CPU) on a local Ray with 2 CPUs."""

import json

import numpy as np
import pytest
import torch

from capfilt import synthetic
from capfilt.train.config import parse_train_config

ray = pytest.importorskip("ray")


@pytest.mark.slow  # a local Ray and two worker processes: about a minute on 2 cores
def test_two_worker_ray_train_run(tmp_path):
    from capfilt.modeling.itm_filter import ItmFilter
    from capfilt.runners.ray.train import train_ray

    data = synthetic.write_coco(tmp_path / "clean", synthetic.make_split("clean", 32, seed=0, image_size=64))
    cfg = parse_train_config(
        {
            "task": "finetune-filter",
            "output": str(tmp_path / "run"),
            "model": {"preset": "tiny-blip"},
            "data": [{"kind": "coco", "path": data}],
            "steps": 4,
            "batch_size": 8,
            "workers": 2,
            "optim": {"lr": 1e-3},
            "med": {"queue_size": 8},
            "log_every": 2,
            "save_every": 2,
        }
    )
    result = train_ray(cfg, num_cpus=2)
    assert not ray.is_initialized()  # the local Ray it started is shut down again
    assert result["world"] == 2 and result["step"] == 4
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result["losses"])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [2, 4]
    # Both workers wrote their RNG state into the shared checkpoint; rank 0 exported a loadable filter.
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004"
    assert {p.name for p in ckpt.glob("rng-rank*.safetensors")} == {"rng-rank0.safetensors", "rng-rank1.safetensors"}
    image = np.array(synthetic.render(synthetic.random_scene(np.random.default_rng(0)), 64))
    itm, _ = ItmFilter(result["outputs"]["filter"], device="cpu").score([image], [["a red circle"]])
    assert 0.0 <= float(itm[0][0]) <= 1.0
