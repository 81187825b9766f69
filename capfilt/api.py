"""capfilt's Python API: the main jobs of the command line as functions.

    import capfilt

    summary = capfilt.run("pipelines/capfilt.yaml", input="data/{00000..00099}.tar", output="out/capfilt")
    print(f"kept {summary['kept']} of {summary['input']} images")

    state = capfilt.bootstrap("pipelines/loop-blip.yaml", output="runs/loop")
    print(state["rounds"][-1]["r1"])

Each function does what its command does, through the same code: the recipe is resolved as the
command resolves it (a YAML path, or a mapping of the same keys, or a config object; `overrides`
are `--set key=value` assignments applied first; the keyword arguments are the command's options
and win over the recipe), then `capfilt.pipeline.run` (`capfilt run`) or `capfilt.loop.run_loop`
(`capfilt loop`) runs it. A bad key raises `capfilt.config.ConfigError` naming the key; a resume
under a changed config raises `capfilt.io.run_dir.ResumeRefused` (unless `fresh=True`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capfilt.config import RunConfig
    from capfilt.loop import LoopConfig


def _recipe(config, overrides: Iterable[str], model_type) -> dict:
    """The recipe as a plain mapping with the `--set` overrides applied."""
    from capfilt.config import read_yaml, set_dotted

    if isinstance(config, (str, os.PathLike)):
        return read_yaml(config, list(overrides))
    if isinstance(config, model_type):
        data = config.model_dump(mode="json")
    elif isinstance(config, Mapping):
        data = copy.deepcopy(dict(config))
    else:
        raise TypeError(
            f"config must be a YAML path, a mapping or a {model_type.__name__}, got {type(config).__name__}"
        )
    for assignment in overrides:
        set_dotted(data, assignment)
    return data


def run_config(
    config,
    *,
    input: str | Iterable[str] | None = None,
    output: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    runner: str | None = None,
    ray_address: str | None = None,
    device: str | None = None,
) -> RunConfig:
    """The validated `RunConfig` that `capfilt run CONFIG [options]` would run.

    input        shards (one pattern or several): paths, globs, {a..b} ranges, fsspec URLs (`--input`)
    output       output directory or fsspec URL (`--output`)
    overrides    `--set` assignments, e.g. ["decide.web.itm=0.3"]
    runner       "local" or "ray" (`--runner`)
    ray_address  join this Ray cluster; implies runner "ray" (`--ray-address`)
    device       auto, cpu, cuda, cuda:1, ... (`--device`)
    """
    from capfilt.config import RunConfig, parse_config

    data = _recipe(config, overrides, RunConfig)
    if input:
        data["input"] = [input] if isinstance(input, (str, os.PathLike)) else list(input)
        data["input"] = [os.fspath(p) for p in data["input"]]
    if output:
        data["output"] = os.fspath(output)
    if runner:
        data["runner"] = runner
    if ray_address:
        data["runner"] = "ray"
        data["ray"] = {**(data.get("ray") or {}), "address": ray_address}
    if device:
        data["device"] = device
    return parse_config(data)


def run(
    config,
    *,
    input: str | Iterable[str] | None = None,
    output: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    fresh: bool = False,
    runner: str | None = None,
    ray_address: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Run CapFilt over shards, as `capfilt run`; returns the run's summary.

    config is a recipe (a YAML path such as "pipelines/capfilt.yaml", a mapping of the same keys, or
    a `RunConfig`); the other arguments are `capfilt run`'s options (see `run_config`), and
    `fresh=True` discards what an earlier run left in the output (`--fresh`). Completed shards of
    an earlier run under the same config are skipped (resume).

    The summary is summary.json's content: input, kept, rejected, failed (with reasons),
    candidates per source, shards / shards_done, shard_errors, output; plus `ok` (every shard
    complete; the command exits 1 otherwise), `seconds` and `stage_seconds`.
    """
    from capfilt.pipeline import run as run_pipeline

    cfg = run_config(
        config, input=input, output=output, overrides=overrides, runner=runner, ray_address=ray_address, device=device
    )
    result = run_pipeline(cfg, fresh=fresh, progress=progress)
    return {**result.summary, "ok": result.ok, "seconds": result.seconds, "stage_seconds": result.stage_seconds}


def loop_config(config, *, output: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> LoopConfig:
    """The validated `LoopConfig` that `capfilt loop CONFIG [options]` would run (every step's
    section is checked too)."""
    from capfilt.loop import LoopConfig, parse_loop_config

    data = _recipe(config, overrides, LoopConfig)
    if output:
        data["output"] = os.fspath(output)
    return parse_loop_config(data)


def bootstrap(
    config, *, output: str | os.PathLike | None = None, overrides: Iterable[str] = (), ablations: bool = False
) -> dict:
    """BLIP's bootstrap loop, as `capfilt loop`; returns the loop's state (OUTPUT/state.json).

    config is a loop recipe (a YAML path such as "pipelines/loop-blip.yaml", a mapping, or a
    `LoopConfig`); `ablations=True` runs one round under each of BLIP's ablations (`--ablations`).
    The state is {"rounds": [...]}, one record per round and ablation with its test recall@1
    (`r1`, `txt_r1`, `img_r1`, `itc_r1`), the captioner's `bleu4` / `cider`, the CapFilt counts
    (`capfilt_input`, `capfilt_kept`) and the round's MED directory (`med`). An interrupted loop
    resumes at its first incomplete step; `capfilt.loop.format_rounds(state)` prints the table.
    """
    from capfilt.loop import run_ablations, run_loop

    cfg = loop_config(config, output=output, overrides=overrides)
    return run_ablations(cfg) if ablations else run_loop(cfg)
