"""Captioner families behind the one Caption stage (``captioner.family`` in the recipe).

- ``blip``: `BlipForConditionalGeneration` through capfilt's own fast path (captioner.py), the default;
- ``coca``: open_clip's CoCa models (coca.py);
- ``git``: transformers' `GitForCausalLM` (hf.py);
- ``image-text-to-text``: any checkpoint `AutoModelForImageTextToText` loads -- BLIP-2, SmolVLM /
  Idefics3, LLaVA, Qwen2-VL, ... -- with the prompt, or a chat ``instruction``, in the recipe (hf.py).

Without ``captioner.family`` the family is read from the checkpoint (a preset's kind, a
directory's config.json or open_clip_config.json, a hub model's config, an open_clip name), and a
checkpoint that fits two families is refused rather than guessed. Every family samples with
capfilt's per-key sampler and per-row decoding rules (loop.py) and is checked against its stock
`generate` when it loads (check.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from capfilt.modeling import presets
from capfilt.modeling.presets import ModelRefError

FAMILIES = ("blip", "coca", "git", "image-text-to-text")
STOCK = {
    "coca": "open_clip's CoCa.generate",
    "git": "transformers' GitForCausalLM.generate",
    "image-text-to-text": "transformers' generate",
}


@dataclass(frozen=True)
class Resolved:
    family: str
    location: str  # a directory, hub id or open_clip name
    identity: dict = field(default_factory=dict)  # run.json's captioner identity
    revision: str | None = None
    pretrained: str | None = None  # an open_clip pretrained tag or file (coca)


def _itt_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def _from_model_type(model_type: str, architectures: list | None, what: str) -> set[str]:
    if model_type == "blip":
        return {"blip"}  # BLIP's own fast path (the generic one can run it too, when asked)
    if model_type == "git":
        return {"git"}
    if model_type in _itt_types():
        return {"image-text-to-text"}
    arch = (architectures or [model_type])[0]
    raise ModelRefError(
        f"{what}: a {arch} ({model_type}) is not a captioner capfilt can run; the families are "
        f"{', '.join(FAMILIES)} (image-text-to-text: what AutoModelForImageTextToText loads)"
    )


def _kinds(model: str, pretrained: str | None, revision: str | None, what: str) -> set[str]:
    """The families the checkpoint fits."""
    preset = presets.preset_named(model, what)
    if preset is not None:
        kind = preset.get("kind")
        if kind == "open_clip":
            if "multimodal_cfg" not in preset.get("model_cfg", {}):
                raise ModelRefError(
                    f"{what}: the preset is an open_clip model, not a captioner (a CLIP model: no CoCa decoder)"
                )
            return {"coca"}
        if kind in FAMILIES:
            return {kind}
        raise ModelRefError(f"{what}: the preset is a {kind} model, not a captioner")
    local = presets.existing_path(model)
    if local is not None and local.is_dir():
        found = set()
        if (local / "open_clip_config.json").is_file():
            cfg = json.loads((local / "open_clip_config.json").read_text()).get("model_cfg", {})
            if "multimodal_cfg" not in cfg:
                raise ModelRefError(f"{what}: {local} is an open_clip CLIP model, not a captioner")
            found.add("coca")
        if (local / "config.json").is_file():
            cfg = json.loads((local / "config.json").read_text())
            found |= _from_model_type(cfg.get("model_type", "?"), cfg.get("architectures"), what)
        if not found:
            raise ModelRefError(f"{what}: {local} has neither config.json nor open_clip_config.json")
        return found
    import open_clip

    arch = model.replace("/", "-")
    if arch in open_clip.list_models() or model.startswith("hf-hub:") or pretrained:
        return {"coca"}
    if local is not None:
        raise ModelRefError(f"{what}: {local} is a file; name a directory, preset or hub id")
    ref = presets.hub_ref(model, revision, what, "config.json")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(ref.location, revision=ref.revision)
    return _from_model_type(cfg.model_type, getattr(cfg, "architectures", None), what)


def resolve(model: str, family: str | None = None, revision: str | None = None, pretrained=None) -> Resolved:
    """Which family ``captioner.model`` is, and what to load; a bad reference fails here, in one line."""
    what = f"captioner.model {model}"
    presets.not_empty(model, what)
    kinds = _kinds(model, pretrained, revision, what)
    if family is None:
        if len(kinds) > 1:
            raise ModelRefError(
                f"{what}: fits the captioner families {', '.join(sorted(kinds))}; say which with captioner.family"
            )
        family = next(iter(kinds))
    elif family not in kinds and not (family == "image-text-to-text" and "blip" in kinds):
        raise ModelRefError(
            f"{what}: captioner.family {family}, but the checkpoint is a {'/'.join(sorted(kinds))} model"
        )
    if pretrained and family != "coca":
        raise ModelRefError(f"{what}: captioner.pretrained names open_clip weights, for a coca model only")
    if family == "blip":
        ref = presets.resolve_blip(model, "captioner", revision)
        return Resolved("blip", ref.location, ref.identity, ref.revision)
    if family == "coca":
        name, tag, identity = presets.resolve_clip(model, pretrained)
        return Resolved("coca", name, {**identity, "family": "coca"}, None, tag)
    preset = presets.preset_named(model, what)
    if preset is not None:
        from capfilt.modeling.families.build import builder

        directory = presets.materialise(model, preset, "captioner", builder(preset))
        identity = {"preset": model, "sha256": presets.weights_sha256(directory), "family": family}
        return Resolved(family, str(directory), identity)
    local = presets.existing_path(model)
    if local is not None:
        identity = {"path": str(local), "sha256": presets.local_weights(local, what), "family": family}
        return Resolved(family, str(local), identity)
    ref = presets.hub_ref(model, revision, what, "config.json")  # pinned to the commit it resolved to
    return Resolved(family, ref.location, {**ref.identity, "family": family}, ref.revision)


class FamilyCaptioner:
    """K captions per image with a coca / git / image-text-to-text model (the `Captioner` interface)."""

    def __init__(
        self, resolved: Resolved, *, decoding, instruction=None, device="auto", precision="fp32", self_check=True
    ):
        from capfilt.modeling.loading import pick_device

        self.resolved, self.decoding = resolved, decoding
        device = pick_device(device)
        ident = resolved.identity
        name = str(ident.get("preset") or ident.get("hub_id") or ident.get("path") or ident.get("open_clip") or "?")
        what = f"captioner.model {name}"
        if resolved.family == "coca":
            from capfilt.modeling.families.coca import CocaFamily

            self.family = CocaFamily(
                resolved.location,
                resolved.pretrained,
                prompt=decoding.prompt,
                instruction=instruction,
                steps=decoding.max_steps,
                what=what,
                device=device,
                precision=precision,
            )
        else:
            from capfilt.modeling.families.hf import HFFamily

            self.family = HFFamily(
                resolved.family,
                resolved.location,
                resolved.revision,
                prompt=decoding.prompt,
                instruction=instruction,
                what=what,
                device=device,
                precision=precision,
            )
        self.check = None
        if self_check:
            from capfilt.modeling.families.check import check_family

            self.check = check_family(self.family, name, STOCK[resolved.family])

    @property
    def identity(self) -> dict:
        return self.resolved.identity

    def caption(self, images: list, key_seeds: list[int]) -> list[list[str]]:
        """K captions for each image, as a list per image (the order of ``images``)."""
        import torch

        from capfilt.modeling.families.loop import caption_ids, texts

        if not images:
            return []
        with torch.inference_mode():
            rows = caption_ids(self.family, self.decoding, images, key_seeds)
        return [texts(self.family, r) for r in rows]


def build_captioner(config, *, device="auto", precision="fp32", self_check=True):
    """The captioner a ``captioner`` config section names: BLIP's fast path or a family's."""
    from capfilt.modeling.captioner import Captioner, Decoding

    fields = {k: v for k, v in config.model_dump().items() if k in Decoding.model_fields}
    decoding = Decoding(**fields)
    resolved = resolve(config.model, config.family, config.revision, config.pretrained)
    if resolved.family == "blip" and not config.instruction:
        return Captioner(
            config.model,
            revision=config.revision,
            device=device,
            precision=precision,
            decoding=decoding,
            self_check=self_check,
        )
    if resolved.family == "blip":
        raise ModelRefError(
            f"captioner.model {config.model}: a BLIP captioner has no chat template; drop captioner.instruction"
        )
    return FamilyCaptioner(
        resolved,
        decoding=decoding,
        instruction=config.instruction,
        device=device,
        precision=precision,
        self_check=self_check,
    )


__all__ = ["FAMILIES", "FamilyCaptioner", "Resolved", "build_captioner", "resolve"]
