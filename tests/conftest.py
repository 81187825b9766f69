import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Presets are materialised once per test session into a private cache, never into ~/.cache.
os.environ.setdefault("CAPFILT_CACHE_DIR", str(Path(tempfile.gettempdir()) / "capfilt-test-cache"))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8) for i in range(8)]


def write_image_sensitive_blip(
    directory: Path, role: str = "captioner", eos_bias: float = 0.0, scale: float = 1.0
) -> Path:
    """A tiny-blip checkpoint (a local directory, loaded as a user's would be) whose random weights
    are drawn at ``scale``/sqrt(fan-in) instead of BERT's 0.02, so its outputs depend clearly on the
    image and the text (the plain tiny preset scores every pair near 0.385 and writes the same
    tokens for every image). ``eos_bias`` raises the captioner's end-of-sequence logit so its
    captions end at varied lengths."""
    import torch
    from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForImageTextRetrieval

    from capfilt.modeling.presets import resolve_blip

    model_cls = {"captioner": BlipForConditionalGeneration, "filter": BlipForImageTextRetrieval}[role]
    ref = resolve_blip("tiny-blip", role)
    model = model_cls.from_pretrained(ref.location)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (p.dim() >= 2 and "embeddings" not in name) or name.endswith(("position_embedding", "class_embedding")):
                p.normal_(0, scale * max(1, p.shape[-1]) ** -0.5, generator=generator)
        if eos_bias:
            model.text_decoder.cls.predictions.decoder.bias[model.config.text_config.sep_token_id] += eos_bias
    model.save_pretrained(directory)
    AutoProcessor.from_pretrained(ref.location).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def sensitive_captioner(tmp_path_factory) -> Path:
    return write_image_sensitive_blip(tmp_path_factory.mktemp("sensitive-captioner"))


@pytest.fixture(scope="session")
def ending_captioner(tmp_path_factory) -> Path:
    """Image-sensitive, and its end-of-sequence token is reachable: sampled captions of 0 to 20
    tokens, about 8 on average (top_p 0.9)."""
    return write_image_sensitive_blip(tmp_path_factory.mktemp("ending-captioner"), eos_bias=3.0, scale=0.6)


@pytest.fixture(scope="session")
def sensitive_filter(tmp_path_factory) -> Path:
    return write_image_sensitive_blip(tmp_path_factory.mktemp("sensitive-filter"), role="filter")


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server for the session (tests/s3server.py) and an s3fs file system on it."""
    from s3server import s3_server

    with s3_server() as fs:
        yield fs


# --------------------------------------------------------------------------- the tiny recipe

TINY_RECIPE = ROOT / "pipelines" / "demo" / "tiny.yaml"  # the random-weight tiny presets: seconds a shard


@pytest.fixture(scope="session")
def tiny_recipe() -> Path:
    return TINY_RECIPE


@pytest.fixture(scope="session")
def tiny():
    """``tiny(inputs, output, extra=(), thresholds=None)``: the tiny recipe's config over the shard
    paths ``inputs`` into ``output``, with ``--set`` style ``extra`` overrides. ``thresholds`` are
    the decide overrides applied first; by default each source's ITM threshold sits at the median
    of the tiny models' own scores (tests/thresholds.py), so about half of the texts are kept."""
    from thresholds import split_thresholds

    from capfilt.config import load_config

    def config(inputs, output, extra=(), thresholds=None):
        decide = split_thresholds() if thresholds is None else list(thresholds)
        return load_config(TINY_RECIPE, [*decide, *extra]).model_copy(
            update={"input": [str(p) for p in inputs], "output": str(output)}
        )

    return config


# --------------------------------------------------------------------------- holding a run at a shard


class FifoGate:
    """Holds every reader of ``path`` until the test opens the gate.

    ``path`` becomes a named pipe (FIFO): opening it for reading blocks until a writer shows up.
    Made a shard's parquet sidecar, it holds a run at that shard (the reader opens the sidecar
    first), with no sleeps or timing. Once open, the gate lets every later reader through (a retried
    read, the upstream counts' second look). The reader then finds the sidecar unreadable (a pipe
    cannot seek), logs it and reads the shard as one without a sidecar.
    """

    def __init__(self, path: Path):
        import threading

        self.path = Path(path)
        os.mkfifo(self.path)
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def open(self) -> None:
        import threading

        def release_readers():
            while not self.stopped.is_set():
                os.close(os.open(self.path, os.O_WRONLY))  # returns once a reader has the pipe open

        if self.thread is None:
            self.thread = threading.Thread(target=release_readers, daemon=True)
            self.thread.start()

    def close(self) -> None:
        self.stopped.set()
        while self.thread is not None and self.thread.is_alive():
            os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))  # unblocks the writer's open
            self.thread.join(0.1)


@pytest.fixture
def fifo_gate():
    """``fifo_gate(path)``: a FifoGate at ``path``, closed at the end of the test."""
    gates: list[FifoGate] = []

    def make(path: Path) -> FifoGate:
        gates.append(FifoGate(path))
        return gates[-1]

    yield make
    for gate in gates:
        gate.close()
