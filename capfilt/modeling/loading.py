"""Device/dtype choice and quiet, strict model loading shared by the model wrappers."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on accelerators; fp32 math everywhere else."""
    if precision in ("bf16", "fp16") and device.type != "cpu":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


@functools.cache
def cpu_has_bf16() -> bool:
    """Native bf16 dot products on this CPU (AVX512-BF16 or AMX), read from /proc/cpuinfo (Linux;
    elsewhere: no). Where present a bf16 matmul runs at several times the fp32 rate."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def inference_autocast(device: torch.device, precision: str):
    """`autocast` for the inference model stages, plus bf16 on CPUs with native bf16 (precision
    bf16 only; fp16 and CPUs without it compute fp32). Training keeps `autocast`: fp32 on a CPU."""
    if precision == "bf16" and device.type == "cpu" and cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return autocast(device, precision)


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc `malloc_trim`; elsewhere a no-op).

    Loading a model and its self-check free hundreds of MB of temporaries in small blocks that
    glibc keeps for reuse, so each loaded stage would otherwise hold ~0.3 GB it no longer uses;
    the next stage's load then peaks on top of it (docs/benchmarks.md, peak memory)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def from_pretrained(model_cls, location: str, revision: str | None = None):
    """Load a transformers model; a missing or unexpected weight is an error, never a warning."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, info = model_cls.from_pretrained(location, revision=revision, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"{location}: checkpoint does not match {model_cls.__name__}: {problems}")
    return model.eval()


def index_tensor(values, device: torch.device) -> torch.Tensor:
    """A long tensor of host values on ``device``, copied without waiting for queued device work.

    A plain ``torch.tensor(values, device="cuda")`` synchronises the stream; inner loops use this.
    """
    tensor = torch.as_tensor(values, dtype=torch.long)
    return tensor.to(device, non_blocking=True) if torch.device(device).type != "cpu" else tensor
