"""Checks of a model reference that every resolver makes (``references``, the editor, the captioner
families, the LAION heads): each failure a `ModelRefError` naming the reference."""

from __future__ import annotations

import difflib
from pathlib import Path

from capfilt.modeling.presets.registry import WEIGHT_SUFFIXES, ModelRefError, load_preset, weights_sha256


def not_empty(name: str, what: str) -> None:
    if not name.strip():
        raise ModelRefError(f"{what}: empty; name a preset (`capfilt models`), a local directory or a hub id")


def preset_named(name: str, what: str) -> dict | None:
    """The preset ``name``, refusing a name that is also a file or directory here (which one?)."""
    preset = load_preset(name)
    if preset is not None and Path(name).exists():
        kind = "directory" if Path(name).is_dir() else "file"
        raise ModelRefError(
            f"{what}: both a capfilt preset and a {kind} here; write ./{name} (or its absolute "
            f"path) for the {kind}, or rename it"
        )
    return preset


def existing_path(name: str) -> Path | None:
    path = Path(name).expanduser()
    return path.resolve() if path.exists() else None


def absolute_path(name: str) -> Path:
    return Path(name).expanduser().absolute()


def local_weights(directory: Path, what: str) -> str:
    try:
        return weights_sha256(directory)
    except FileNotFoundError:
        raise ModelRefError(f"{what}: no weight files (*.safetensors, *.bin, *.pt) in {directory}") from None


def looks_like_path(name: str) -> bool:
    """A name only a path can be (a hub id is ``name`` or ``org/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith(("/", ".", "~")) or "\\" in name or Path(name).suffix in WEIGHT_SUFFIXES | {".ckpt"}:
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""
