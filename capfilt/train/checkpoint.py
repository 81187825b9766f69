"""Training checkpoints that resume exactly: nothing pickled, everything strict.

    OUTPUT/checkpoints/step-00000100/
        model.safetensors       MED weights + momentum copies + queues
        optimizer.safetensors   AdamW moments and step counts, keyed by parameter name
        rng-rank{r}.safetensors each worker's torch (and CUDA) RNG state
        state.json              step, micro-batches consumed, optimizer hyperparameters, config fingerprint
        .complete               written last; a directory without it is ignored (and swept)

The LR schedule is a pure function of the step, so "scheduler state" is the step itself.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes

from capfilt.io.folder import atomic_write
from capfilt.modeling.med import KeyMismatch, Med

_DIR = "checkpoints"


def checkpoint_dirs(output: Path) -> list[Path]:
    root = Path(output) / _DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / ".complete").is_file() and ".tmp-" not in p.name)


def latest(output: Path) -> Path | None:
    dirs = checkpoint_dirs(output)
    return dirs[-1] if dirs else None


def sweep(output: Path) -> None:
    for p in (Path(output) / _DIR).glob("*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, list]:
    state = optimizer.state_dict()
    tensors = {}
    for index, fields in state["state"].items():
        for field, value in fields.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{names[index]}::{field}"] = value.detach().cpu().contiguous()
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
        for g in state["param_groups"]
    ]
    return tensors, groups


def save(
    output: Path,
    step: int,
    consumed: int,
    med: Med,
    optimizer,
    param_names: list[str],
    fingerprint: str,
    rank: int,
    world: int,
) -> Path | None:
    """Rank 0 writes the shared files; every rank writes its RNG state. Call on all ranks."""
    root = Path(output) / _DIR
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp-shared"
    dist = world > 1 and torch.distributed.is_initialized()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(
            {k: v.cpu().contiguous() for k, v in med.canonical_state_dict(training_state=True).items()},
            str(tmp / "model.safetensors"),
        )
        tensors, groups = _optimizer_tensors(optimizer, dict(enumerate(param_names)))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        meta = {"step": step, "consumed": consumed, "world": world, "fingerprint": fingerprint, "param_groups": groups}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    if dist:
        torch.distributed.barrier()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    atomic_write(tmp / f"rng-rank{rank}.safetensors", safetensors_bytes(rng))
    if dist:
        torch.distributed.barrier()
    if rank == 0:
        (tmp / ".complete").write_text("")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    if dist:
        torch.distributed.barrier()
    return final


def prune(output: Path, keep: int) -> None:
    for old in checkpoint_dirs(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load(directory: Path, med: Med, optimizer, param_names: list[str], rank: int, seed: int) -> dict:
    """Restore model, optimizer and this rank's RNG; returns state.json."""
    directory = Path(directory)
    meta = json.loads((directory / "state.json").read_text())
    med.load_canonical(load_file(str(directory / "model.safetensors")), training_state=True)
    tensors = load_file(str(directory / "optimizer.safetensors"))
    index = {n: i for i, n in enumerate(param_names)}
    saved_names = [n for g in meta["param_groups"] for n in g["params"]]
    if sorted(saved_names) != sorted(param_names):
        raise KeyMismatch(
            f"{directory}: optimizer parameters differ from the model's trainable parameters "
            f"(missing {sorted(set(param_names) - set(saved_names))[:5]}, "
            f"unexpected {sorted(set(saved_names) - set(param_names))[:5]})"
        )
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        name, field = key.split("::")
        state.setdefault(index[name], {})[field] = value
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    rng_path = directory / f"rng-rank{rank}.safetensors"
    if rng_path.is_file():
        rng = load_file(str(rng_path))
        torch.set_rng_state(rng["torch"])
        cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    else:  # a resume on more workers than saved: new ranks get a fresh, still deterministic stream
        torch.manual_seed(hash((seed, meta["step"], rank)) & 0x7FFFFFFF)
    return meta
