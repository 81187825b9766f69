"""The model presets (``models/``: JSON architectures) and what is built from them: each preset
materialised once into the cache with seeded random weights, weights identified by sha256, and
BLIP's tokenizer, config and processor for a preset."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from capfilt.shipped import shipped_dir

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth"}
# Ids a model may have beyond its tokenizer's (embedding rows padded to a round number, special ids
# the tokenizer does not spell: BLIP's 30524 ids over BERT's 30522-token vocabulary). More is a
# tokenizer from another model: the decoder would mostly write ids the tokenizer cannot spell.
VOCAB_SLACK = 128


class ModelRefError(ValueError):
    """A model reference that names nothing loadable here; the message says what to write instead."""


@dataclass(frozen=True)
class ModelRef:
    """What to load (``location``: a directory or hub id; ``revision``: a hub id's commit) and how
    to name it in run.json."""

    location: str
    identity: dict = field(default_factory=dict)
    revision: str | None = None


def models_dir() -> Path:
    """The presets: ``CAPFILT_MODELS_DIR`` when set, else the ones shipped with capfilt."""
    env = os.environ.get("CAPFILT_MODELS_DIR")
    return Path(env) if env else shipped_dir("models")


def cache_dir() -> Path:
    env = os.environ.get("CAPFILT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "capfilt"


def load_preset(name: str) -> dict | None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    path = models_dir() / f"{name}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def list_presets() -> list[str]:
    return sorted(p.stem for p in models_dir().glob("*.json"))


def weights_sha256(directory: str | Path) -> str:
    """Identity of local weights: sha256 over every weight file, in name order. Computed once per
    process for the same files (name, size, mtime): a run resolves each model for run.json and
    again where it loads it, and weights are gigabytes."""
    files = sorted(p for p in Path(directory).iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin, *.pt) in {directory}")
    return _digest(tuple((str(p.resolve()), p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def file_sha256(path: Path) -> str:
    st = Path(path).stat()
    return _digest(((str(Path(path).resolve()), None, st.st_size, st.st_mtime_ns),))


@functools.lru_cache(maxsize=256)
def _digest(files: tuple) -> str:
    """sha256 over (name, if given, then content) of each file, in order."""
    digest = hashlib.sha256()
    for path, name, _, _ in files:
        if name is not None:
            digest.update(name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _preset_digest(name: str, preset: dict) -> str:
    digest = hashlib.sha256(json.dumps(preset, sort_keys=True).encode())
    if "tokenizer" in preset:
        digest.update((models_dir() / preset["tokenizer"] / "vocab.txt").read_bytes())
    return digest.hexdigest()[:12]


def materialise(name: str, preset: dict, role: str, build) -> Path:
    """Build a preset once into the cache; concurrent builders race on an atomic rename."""
    target = cache_dir() / "presets" / f"{name}-{_preset_digest(name, preset)}" / role
    if (target / ".complete").is_file():
        return target
    tmp = target.with_name(f"{role}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise ModelRefError(
            f"preset {name}: cannot build it into {cache_dir()} ({err.strerror}); set "
            "CAPFILT_CACHE_DIR to a folder this user can write"
        ) from None
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


def check_vocabulary(tokenizer_size: int, model_size: int, what: str) -> None:
    """Refuse a tokenizer that does not belong to the model (see VOCAB_SLACK)."""
    if tokenizer_size > model_size:
        raise ModelRefError(
            f"{what}: its tokenizer has {tokenizer_size} tokens but the model's vocabulary has only "
            f"{model_size} ids; use the tokenizer the model was trained with"
        )
    if model_size - tokenizer_size > VOCAB_SLACK:
        raise ModelRefError(
            f"{what}: its tokenizer has {tokenizer_size} tokens but the model's vocabulary has "
            f"{model_size} ids, so it would mostly write ids the tokenizer cannot spell (empty "
            "captions); use the tokenizer the model was trained with"
        )


def blip_config(preset: dict, what: str = "preset"):
    from transformers import BlipConfig

    tok = blip_tokenizer(preset)
    cfg = json.loads(json.dumps(preset["config"]))
    text = cfg.setdefault("text_config", {})
    text.setdefault("vocab_size", len(tok))
    check_vocabulary(len(tok), text["vocab_size"], f"{what} (tokenizer {preset['tokenizer']})")
    text.update(
        bos_token_id=tok.convert_tokens_to_ids("[DEC]"),
        pad_token_id=tok.pad_token_id,
        sep_token_id=tok.sep_token_id,
        eos_token_id=tok.sep_token_id,
    )
    return BlipConfig(**cfg)


def openai_image_stats() -> dict:
    """The image normalisation BLIP and CLIP were trained with: open_clip's constants (imported
    here, not at module load: resolving a reference stays quick)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return {"image_mean": list(OPENAI_DATASET_MEAN), "image_std": list(OPENAI_DATASET_STD)}


def blip_processor(preset: dict):
    from transformers import BlipImageProcessor, BlipProcessor

    size = preset["image_size"]
    images = BlipImageProcessor(size={"height": size, "width": size}, **openai_image_stats())
    return BlipProcessor(image_processor=images, tokenizer=blip_tokenizer(preset))


def build_blip(preset: dict, model_cls):
    import torch

    def build(directory: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(preset.get("init_seed", 0))
            model = model_cls(blip_config(preset))
        model.save_pretrained(directory)
        blip_processor(preset).save_pretrained(directory)

    return build


def build_clip(preset: dict):
    def build(directory: Path) -> None:
        import open_clip
        import torch
        from safetensors.torch import save_file

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(preset.get("init_seed", 0))
            # open_clip's factory reads custom_text; a multimodal_cfg makes the model a CoCa captioner
            cfg = {k: v for k, v in preset["model_cfg"].items() if k != "custom_text"}
            model = open_clip.CoCa(**cfg) if "multimodal_cfg" in cfg else open_clip.CLIP(**cfg)
            if "multimodal_cfg" in cfg:  # open_clip leaves the decoder's output projection torch.empty
                # (its init line is commented out): uninitialised memory, all-equal logits; seed it
                proj = model.text_decoder.text_projection
                torch.nn.init.normal_(proj, std=proj.shape[0] ** -0.5)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(directory / "open_clip_model.safetensors"))
        config = {"model_cfg": preset["model_cfg"], "preprocess_cfg": preset.get("preprocess_cfg", {})}
        (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2))

    return build
