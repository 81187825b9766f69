"""What every benchmark needs: sizes, timing with device sync, the machine description, a corpus."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch


@dataclass(frozen=True)
class Size:
    name: str
    blip: str  # BLIP preset (captioner and filter architecture)
    clip: str  # open_clip preset
    images: int  # images in the workload (one batch)
    image_size: int  # side of the synthetic JPEGs
    repeats: int  # timed rounds per measurement, ours and stock alternated; each side's best is reported


SIZES = {
    "tiny": Size("tiny", "tiny-blip", "tiny-clip", images=16, image_size=128, repeats=3),
    # BLIP-base at 384px costs seconds per ViT pass on a small CPU: few images, two repetitions.
    "base": Size("base", "blip-base", "clip-vit-b-32", images=4, image_size=384, repeats=2),
    "large": Size("large", "blip-large", "clip-vit-l-14", images=32, image_size=384, repeats=3),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    wall: float  # seconds on the clock: the number reported
    cpu: float  # seconds of CPU used by this process (all threads): less sensitive to other load

    def __truediv__(self, n: float) -> Timing:
        return Timing(self.wall / n, self.cpu / n)

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.wall + other.wall, self.cpu + other.cpu)

    def __sub__(self, other: Timing) -> Timing:
        return Timing(self.wall - other.wall, self.cpu - other.cpu)


ZERO = Timing(0.0, 0.0)


def once(fn, device: torch.device):
    """(Timing, result) of one call; the device is synced before and after."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    sync(device)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu), result


def fastest(timings) -> Timing:
    """The Timing with the least wall-clock time (its CPU time is that same run's)."""
    return min(timings, key=lambda t: t.wall)


def timed(fn, device: torch.device, repeats: int = 1):
    """(fastest Timing over ``repeats`` calls, result of the last call)."""
    runs = [once(fn, device) for _ in range(max(1, repeats))]
    return fastest(t for t, _ in runs), runs[-1][1]


def paired(ours, stock, device: torch.device, repeats: int = 1):
    """Both sides alternately (ours, stock, ours, ...), so both see the same background load.
    Returns (ours Timing, stock Timing, ours result, stock result), fastest of each."""
    a, b = [], []
    for _ in range(max(1, repeats)):
        a.append(once(ours, device))
        b.append(once(stock, device))
    return fastest(t for t, _ in a), fastest(t for t, _ in b), a[-1][1], b[-1][1]


def autocast(device: torch.device, precision: str):
    """The same autocast the capfilt wrappers use, for the stock side of a comparison."""
    from capfilt.modeling.loading import inference_autocast as ours

    return ours(device, precision)


@contextlib.contextmanager
def stock_mode(device: torch.device, precision: str):
    """What a plain transformers user writes around a forward: no_grad (+ autocast on GPU)."""
    with torch.no_grad(), autocast(device, precision):
        yield


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],  # other work sharing the cores
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(libgomp default)"),
        "device": str(device),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("capfilt", "torch", "transformers", "open_clip_torch", "numpy")},
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def make_corpus(directory: Path, size: Size, seed: int = 0) -> tuple[str, str]:
    """Two shards of synthetic image-text pairs: (the measured shard of `size.images`, a 1-image
    warm-up shard). Images are JPEGs of the synthetic shapes world; web texts are its captions."""
    from capfilt.synthetic import make_split, write_shards

    examples = make_split("bench", size.images + 1, seed=seed, noise_share=0.3, image_size=size.image_size)
    paths = write_shards(directory, examples, per_shard=size.images, sidecar=False)
    return paths[0], paths[1]


def use_full_size_vocabulary(directory: Path, size: int = 30522) -> None:
    """Point capfilt at a copy of models/ whose BLIP-base/large presets tokenize with a generated
    WordPiece vocabulary of BERT's size (30522 + [DEC], [ENC] = the presets' 30524 ids).

    The shipped presets pair a 30524-id decoder with the 241-token test vocabulary, so a random
    decoder mostly samples ids the tokenizer cannot spell: captions decode to "" and are dropped
    before scoring, and the filter and CLIP would get almost no texts. With this vocabulary every
    id is a word (the tiny vocabulary's words, then generated ones), so each image really gets
    K non-empty captions to score, as with a real checkpoint.
    """
    import itertools
    import json
    import shutil
    import string

    from capfilt.modeling.presets import models_dir

    source, target = models_dir(), directory / "models"
    shutil.copytree(source, target)
    words = (source / "tokenizers" / "tiny-wordpiece" / "vocab.txt").read_text().split()
    seen = set(words)
    for n in itertools.count(3):
        if len(words) >= size:
            break
        for letters in itertools.product(string.ascii_lowercase, repeat=n):
            word = "".join(letters)
            if word not in seen:
                words.append(word)
                if len(words) >= size:
                    break
    (target / "tokenizers" / "bench-wordpiece").mkdir()
    (target / "tokenizers" / "bench-wordpiece" / "vocab.txt").write_text("\n".join(words) + "\n")
    for name in ("blip-base", "blip-large"):
        path = target / f"{name}.json"
        preset = json.loads(path.read_text())
        preset["tokenizer"] = "tokenizers/bench-wordpiece"
        path.write_text(json.dumps(preset, indent=1))
    os.environ["CAPFILT_MODELS_DIR"] = str(target)
