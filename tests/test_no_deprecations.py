"""capfilt calls its dependencies only in ways they do not deprecate (on the locked versions).

A deprecated call is the next release's silent break (transformers 5.24 renamed the BLIP cache
argument after deprecating the old name). This runs the whole pipeline, every model stage
included, over a tiny corpus with every warning shown, and fails on any DeprecationWarning or
FutureWarning raised while a capfilt frame is on the stack. Nothing is filtered.
"""

import traceback
import warnings
from pathlib import Path

import pytest

import capfilt
from capfilt.config import load_config
from capfilt.pipeline import run
from capfilt.synthetic import main_synth

PACKAGE = str(Path(capfilt.__file__).resolve().parent)
RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "demo" / "tiny.yaml"


def run_recording(config) -> list[str]:
    """Run the pipeline with every warning shown; the deprecations raised under a capfilt frame."""
    caught = []

    def record(message, category, filename, lineno, file=None, line=None):
        stack = [f for f in traceback.extract_stack() if f.filename.startswith(PACKAGE)]
        if issubclass(category, (DeprecationWarning, FutureWarning)) and stack:
            caught.append(
                f"{category.__name__}: {message} ({filename}:{lineno}; via {stack[-1].filename}:{stack[-1].lineno})"
            )

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        result = run(config, progress=False)
    assert result.ok
    return caught


def tiny_config(tmp_path, **update):
    main_synth(tmp_path / "data", shards=1, per_shard=12, broken=True, seed=5)
    return load_config(RECIPE).model_copy(
        update={"input": [str(p) for p in (tmp_path / "data").glob("*.tar")], "output": str(tmp_path / "out"), **update}
    )


def test_a_run_raises_no_deprecation_from_capfilt_calls(tmp_path):
    caught = run_recording(tiny_config(tmp_path))
    assert not caught, "\n".join(caught)


@pytest.mark.slow
def test_a_ray_run_raises_no_deprecation_from_capfilt_calls(tmp_path):
    """The Ray runner's calls (ray.init, actor options, ray.wait/get/kill) on the locked Ray: Ray
    2.60 deprecates, for instance, Ray Core options passed through Ray Data's ray_remote_args."""
    config = tiny_config(tmp_path, runner="ray", threads=1)
    caught = run_recording(config.model_copy(update={"ray": config.ray.model_copy(update={"num_cpus": 1})}))
    assert not caught, "\n".join(caught)
