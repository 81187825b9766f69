"""Resolve a model name to something `from_pretrained` / open_clip can load, plus its identity.

A name is a preset in ``models/`` (a JSON architecture, materialised once to a local directory
with seeded random weights), a local directory, or a hub id / open_clip name and tag. Each name
means one thing: a preset name that is also a local path, or a preset with a checkpoint beside it,
is refused rather than guessed. Every reference is checked here, before any model loads, with an
error (`ModelRefError`) that names it and says what to write instead: a local directory must exist
and hold its config; a hub id that is not in the local cache needs a reachable hub (checked once,
quickly); an open_clip architecture and its pretrained tag must be known to open_clip.
Presets go through the very same ``from_pretrained(directory)`` call a hub checkpoint does, so the
tests exercise the loading path a real user takes.

The package, by job: ``registry`` (the presets on disk, weight hashing, materialising a preset, the
BLIP tokenizer / config / processor), ``checks`` (checks of a reference any resolver uses),
``hub`` (hub access: reachability, pinned hub ids, cached weights), ``references`` (a name
resolved by its kind: preset, local directory, ``hf-hub:`` / hub id, open_clip architecture).
"""

from capfilt.modeling.presets.checks import existing_path, local_weights, not_empty, preset_named
from capfilt.modeling.presets.hub import check_hub_model, hub_ref, hub_unreachable, pinned
from capfilt.modeling.presets.references import resolve_blip, resolve_clip
from capfilt.modeling.presets.registry import (
    VOCAB_SLACK,
    WEIGHT_SUFFIXES,
    ModelRef,
    ModelRefError,
    blip_config,
    blip_processor,
    blip_tokenizer,
    cache_dir,
    check_vocabulary,
    list_presets,
    load_preset,
    materialise,
    models_dir,
    openai_image_stats,
    weights_sha256,
)

__all__ = [
    "VOCAB_SLACK",
    "WEIGHT_SUFFIXES",
    "ModelRef",
    "ModelRefError",
    "blip_config",
    "blip_processor",
    "blip_tokenizer",
    "cache_dir",
    "check_hub_model",
    "check_vocabulary",
    "existing_path",
    "hub_ref",
    "hub_unreachable",
    "pinned",
    "list_presets",
    "load_preset",
    "local_weights",
    "materialise",
    "models_dir",
    "not_empty",
    "openai_image_stats",
    "preset_named",
    "resolve_blip",
    "resolve_clip",
    "weights_sha256",
]
