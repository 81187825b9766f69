"""`capfilt loop CONFIG`: BLIP's bootstrap rounds, resumable, with the ablations as configuration.

round 0   pretrain a MED on the noisy web data, or start from given checkpoints (`start_med`: a MED
          directory, or BLIP's published captioner and filter)                      -> eval
round r   fine-tune a captioner (LM) and a filter (ITC+ITM) from the last MED on the clean set,
          CapFilt the web shards with them, pretrain a MED on the bootstrapped data plus the clean
          set (a fresh `preset` MED, or the start checkpoints again: `retrain_from`)   -> eval
Stop when a round no longer improves test recall@1 by `min_improvement` points.

Every step writes its own folder under OUTPUT/round-N/ and is skipped on resume when complete;
OUTPUT/state.json records each round's metrics. A step's config is its loop section (`pretrain`,
`finetune_captioner`, `finetune_filter`: `capfilt train` keys; `capfilt`: `capfilt run` keys) plus
what the loop fills in (output, data, models, the loop's seed, calibrated thresholds); no other
value is added, so the defaults are those of `capfilt train` and `capfilt run` (the real
recipe's, pipelines/loop-blip.yaml); the demo's small settings are in pipelines/demo/loop.yaml.
Every step's config is built once at load, so a typo in any section fails before round 0 trains.

Where the steps run: `runner`, as in a run recipe. local: in this process (CapFilt with the local
runner, training in-process on this machine's GPU or CPU). ray: CapFilt steps on the Ray runner
(actor settings under `capfilt.ray`) and training steps on `ray.train_workers` Ray Train workers, on
the cluster at `ray.address` (none: a Ray started on this machine, as in `capfilt run`).

The package, by job: ``config`` (the loop recipe's schema), ``steps`` (each step's `capfilt train` /
`capfilt run` config and the step itself), ``runner`` (the rounds, resumable, and the ablations),
``formatting`` (the rounds and quality tables `capfilt loop` prints).
"""

from capfilt.loop.config import (
    ABLATIONS,
    LOOP_FILLS,
    TRAIN_SECTIONS,
    CalibrationSection,
    DataPaths,
    LoopConfig,
    LoopRaySection,
    StartCheckpoints,
    WorldSection,
    load_loop_config,
    parse_loop_config,
    role_init,
)
from capfilt.loop.formatting import format_quality, format_rounds
from capfilt.loop.runner import State, run_ablations, run_loop
from capfilt.loop.steps import capfilt_step_config, check_steps, make_world, train_step, train_step_config

__all__ = [
    "ABLATIONS",
    "LOOP_FILLS",
    "TRAIN_SECTIONS",
    "CalibrationSection",
    "DataPaths",
    "LoopConfig",
    "LoopRaySection",
    "StartCheckpoints",
    "State",
    "WorldSection",
    "train_step",
    "capfilt_step_config",
    "check_steps",
    "format_quality",
    "format_rounds",
    "load_loop_config",
    "make_world",
    "parse_loop_config",
    "role_init",
    "run_ablations",
    "run_loop",
    "train_step_config",
]
