"""Resolve a model name to something `from_pretrained` / open_clip can load, plus its identity.

A name is, in this order: a preset in ``models/`` (a JSON architecture, materialised once to a
local directory with seeded random weights), a local directory, or a hub id / open_clip tag.
Presets go through the very same ``from_pretrained(directory)`` call a hub checkpoint does, so the
tests exercise the loading path a real user takes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import capfilt

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class ModelRef:
    """What to load (``location``: a directory or hub id) and how to name it in run.json."""

    location: str
    identity: dict = field(default_factory=dict)
    revision: str | None = None


def models_dir() -> Path:
    env = os.environ.get("CAPFILT_MODELS_DIR")
    return Path(env) if env else Path(capfilt.__file__).resolve().parents[1] / "models"


def cache_dir() -> Path:
    env = os.environ.get("CAPFILT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "capfilt"


def load_preset(name: str) -> dict | None:
    path = models_dir() / f"{name}.json"
    if "/" in name or not path.is_file():
        return None
    return json.loads(path.read_text())


def list_presets() -> list[str]:
    return sorted(p.stem for p in models_dir().glob("*.json"))


def weights_sha256(directory: str | Path) -> str:
    """Identity of local weights: sha256 over every weight file, in name order."""
    digest = hashlib.sha256()
    files = sorted(
        p for p in Path(directory).iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".pth"}
    )
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin, *.pt) in {directory}")
    for p in files:
        digest.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _preset_digest(name: str, preset: dict) -> str:
    digest = hashlib.sha256(json.dumps(preset, sort_keys=True).encode())
    if "tokenizer" in preset:
        digest.update((models_dir() / preset["tokenizer"] / "vocab.txt").read_bytes())
    return digest.hexdigest()[:12]


def _materialise(name: str, preset: dict, role: str, build) -> Path:
    """Build a preset once into the cache; concurrent builders race on an atomic rename."""
    target = cache_dir() / "presets" / f"{name}-{_preset_digest(name, preset)}" / role
    if (target / ".complete").is_file():
        return target
    tmp = target.with_name(f"{role}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        (tmp / ".complete").write_text("")
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def blip_tokenizer(preset: dict):
    from transformers import BertTokenizer

    vocab = models_dir() / preset["tokenizer"] / "vocab.txt"
    # BLIP's text decoder starts from [DEC] (its bos token); the filter marks ITM input with [ENC].
    return BertTokenizer(vocab=str(vocab), bos_token="[DEC]", extra_special_tokens={"enc_token": "[ENC]"})


def blip_config(preset: dict):
    from transformers import BlipConfig

    tok = blip_tokenizer(preset)
    cfg = json.loads(json.dumps(preset["config"]))
    text = cfg.setdefault("text_config", {})
    text.setdefault("vocab_size", len(tok))
    text.update(
        bos_token_id=tok.convert_tokens_to_ids("[DEC]"),
        pad_token_id=tok.pad_token_id,
        sep_token_id=tok.sep_token_id,
        eos_token_id=tok.sep_token_id,
    )
    return BlipConfig(**cfg)


def blip_processor(preset: dict):
    from transformers import BlipImageProcessor, BlipProcessor

    size = preset["image_size"]
    images = BlipImageProcessor(
        size={"height": size, "width": size}, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD
    )
    return BlipProcessor(image_processor=images, tokenizer=blip_tokenizer(preset))


def _build_blip(preset: dict, model_cls):
    import torch

    def build(directory: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(preset.get("init_seed", 0))
            model = model_cls(blip_config(preset))
        model.save_pretrained(directory)
        blip_processor(preset).save_pretrained(directory)

    return build


def resolve_blip(name: str, role: str, revision: str | None = None) -> ModelRef:
    """``role`` is "captioner" (BlipForConditionalGeneration) or "filter" (BlipForImageTextRetrieval)."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    model_cls = {"captioner": BlipForConditionalGeneration, "filter": BlipForImageTextRetrieval}[role]
    preset = load_preset(name)
    if preset is not None:
        if preset.get("kind") != "blip":
            raise ValueError(f"preset {name!r} is a {preset.get('kind')} model, not a BLIP model")
        directory = _materialise(name, preset, role, _build_blip(preset, model_cls))
        return ModelRef(str(directory), {"preset": name, "sha256": weights_sha256(directory)})
    if Path(name).is_dir():
        return ModelRef(str(Path(name).resolve()), {"path": str(Path(name).resolve()), "sha256": weights_sha256(name)})
    return ModelRef(name, {"hub_id": name, "revision": revision or "main"}, revision)


def resolve_clip(name: str, pretrained: str | None = None) -> tuple[str, str | None, dict]:
    """Returns (open_clip model name, pretrained tag or file, identity)."""
    preset = load_preset(name)
    if preset is not None:
        if preset.get("kind") != "open_clip":
            raise ValueError(f"preset {name!r} is a {preset.get('kind')} model, not an open_clip model")
        directory = _materialise(name, preset, "clip", _build_clip(preset))
        return f"local-dir:{directory}", None, {"preset": name, "sha256": weights_sha256(directory)}
    if Path(name).is_dir():
        return f"local-dir:{Path(name).resolve()}", None, {"path": str(Path(name).resolve()), "sha256": weights_sha256(name)}
    if pretrained and Path(pretrained).is_file():
        digest = hashlib.sha256(Path(pretrained).read_bytes()).hexdigest()
        return name, pretrained, {"open_clip": name, "checkpoint": str(pretrained), "sha256": digest}
    return name, pretrained, {"open_clip": name, "pretrained": pretrained}


def _build_clip(preset: dict):
    def build(directory: Path) -> None:
        import open_clip
        import torch
        from safetensors.torch import save_file

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(preset.get("init_seed", 0))
            model = open_clip.CLIP(**preset["model_cfg"])
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(directory / "open_clip_model.safetensors"))
        config = {"model_cfg": preset["model_cfg"], "preprocess_cfg": preset.get("preprocess_cfg", {})}
        (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2))

    return build
