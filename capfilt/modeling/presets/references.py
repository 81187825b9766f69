"""A model name resolved by its kind, in this order: a capfilt preset, a local directory, then a hub
id (``org/name[@revision]``; for open_clip ``hf-hub:org/name[@revision]``, an architecture and its
pretrained tag, or a checkpoint file). Each returns what to load and the identity run.json records."""

from __future__ import annotations

import logging
from pathlib import Path

from capfilt.modeling.presets.checks import (
    absolute_path,
    did_you_mean,
    existing_path,
    local_weights,
    looks_like_path,
    not_empty,
    preset_named,
)
from capfilt.modeling.presets.hub import check_clip_weights, check_hub_model, hub_ref
from capfilt.modeling.presets.registry import (
    ModelRef,
    ModelRefError,
    blip_config,
    build_blip,
    build_clip,
    file_sha256,
    list_presets,
    materialise,
    weights_sha256,
)

log = logging.getLogger(__name__)


def resolve_blip(name: str, role: str, revision: str | None = None) -> ModelRef:
    """``role`` is "captioner" (BlipForConditionalGeneration) or "filter" (BlipForImageTextRetrieval)."""
    class_name = {"captioner": "BlipForConditionalGeneration", "filter": "BlipForImageTextRetrieval"}[role]
    what = f"{role}.model {name}"
    not_empty(name, what)
    preset = preset_named(name, what)
    if preset is not None:
        if preset.get("kind") != "blip":
            raise ModelRefError(f"{what}: the preset is an {preset.get('kind')} model, not a BLIP one")
        import transformers

        blip_config(preset, f"{what}: preset")  # a tokenizer that does not fit refuses before anything is built
        directory = materialise(name, preset, role, build_blip(preset, getattr(transformers, class_name)))
        return ModelRef(str(directory), {"preset": name, "sha256": weights_sha256(directory)})
    local = existing_path(name)
    if local is not None:
        if not local.is_dir():
            raise ModelRefError(
                f"{what}: {local} is a file; a {class_name} is a directory written by "
                "save_pretrained (config.json and weights)"
            )
        if not (local / "config.json").is_file():
            raise ModelRefError(
                f"{what}: {local} has no config.json; give a directory written by {class_name}.save_pretrained"
            )
        return ModelRef(str(local), {"path": str(local), "sha256": local_weights(local, what)})
    return hub_ref(name, revision, what, "config.json")


def resolve_clip(name: str, pretrained: str | None = None) -> tuple[str, str | None, dict]:
    """Returns (open_clip model name, pretrained tag or file, identity)."""
    what = f"clip.model {name}"
    not_empty(name, what)
    preset = preset_named(name, what)
    if preset is not None:
        if preset.get("kind") != "open_clip":
            raise ModelRefError(f"{what}: the preset is a {preset.get('kind')} model, not an open_clip one")
        if pretrained:
            raise ModelRefError(
                f"{what} is a capfilt preset (seeded random weights), so clip.pretrained {pretrained} would be "
                f"ignored; for a checkpoint name its open_clip architecture: clip: {{model: ViT-B-32, pretrained: "
                f"{pretrained}}}; for the preset drop clip.pretrained"
            )
        directory = materialise(name, preset, "clip", build_clip(preset))
        return f"local-dir:{directory}", None, {"preset": name, "sha256": weights_sha256(directory)}
    local = existing_path(name)
    if local is not None:
        if local.is_file():
            raise ModelRefError(
                f"{what} is a checkpoint file; name its open_clip architecture as clip.model and the "
                f"file as clip.pretrained, e.g. clip: {{model: ViT-B-32, pretrained: {name}}}"
            )
        if not (local / "open_clip_config.json").is_file():
            raise ModelRefError(
                f"{what}: {local} has no open_clip_config.json; a local open_clip model is a directory "
                "with open_clip_config.json and its weights"
            )
        if pretrained:
            raise ModelRefError(
                f"{what} is a local open_clip directory with its own weights, so clip.pretrained "
                f"{pretrained} would be ignored; drop one of them"
            )
        identity = {"path": str(local), "sha256": local_weights(local, what)}
        return f"local-dir:{local}", None, identity
    import open_clip

    if name.startswith("hf-hub:"):
        if pretrained:
            raise ModelRefError(
                f"{what}: a hf-hub: model brings its own weights, so clip.pretrained {pretrained} "
                "would be ignored; drop it"
            )
        repo, _, at = name.removeprefix("hf-hub:").partition("@")
        commit = check_hub_model(repo, at or None, what, "open_clip_config.json")
        identity = {"open_clip": name, "hub_id": repo, "revision": at or "main", "commit": commit}
        # open_clip takes no revision (an hf-hub: id loads whatever main is when it loads): the
        # snapshot of the commit recorded, loaded as the local directory it is
        from huggingface_hub import snapshot_download

        return f"local-dir:{snapshot_download(repo, revision=commit)}", None, identity
    arch = name.replace("/", "-")  # open_clip's own spelling: ViT-B/32 is ViT-B-32
    if arch not in open_clip.list_models():
        if looks_like_path(name):
            raise ModelRefError(f"{what}: no such file or directory ({absolute_path(name)})")
        raise ModelRefError(
            f"{what}: not a capfilt preset, a local open_clip directory or an open_clip architecture"
            f"{did_you_mean(arch, open_clip.list_models() + list_presets())}; `capfilt models` "
            "lists the presets, open_clip.list_models() the architectures"
        )
    if not pretrained:
        log.warning("%s has no clip.pretrained: open_clip gives it random weights", what)
        return name, None, {"open_clip": name, "pretrained": None}
    checkpoint = Path(pretrained).expanduser()
    if checkpoint.is_file():
        digest = file_sha256(checkpoint)
        return name, str(checkpoint), {"open_clip": name, "checkpoint": str(checkpoint.resolve()), "sha256": digest}
    if checkpoint.is_dir():
        raise ModelRefError(
            f"clip.pretrained {pretrained} is a directory; give a checkpoint file (.pt, .bin, "
            "or .safetensors), or the directory itself as clip.model when it holds open_clip_config.json"
        )
    tags = open_clip.list_pretrained_tags_by_model(arch)
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg:
        if looks_like_path(pretrained):
            raise ModelRefError(f"clip.pretrained {pretrained}: no such checkpoint file ({absolute_path(pretrained)})")
        shown = ", ".join(tags[:8]) + (f", ... ({len(tags)} in all)" if len(tags) > 8 else "")
        raise ModelRefError(
            f"clip.pretrained {pretrained}: neither a checkpoint file nor a pretrained tag of {arch} "
            f"(its tags: {shown or 'none'})"
        )
    check_clip_weights(arch, pretrained, cfg)
    return name, pretrained, {"open_clip": name, "pretrained": pretrained}
