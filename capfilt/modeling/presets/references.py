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
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from capfilt.config import shipped_dir

log = logging.getLogger(__name__)

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


def _file_sha256(path: Path) -> str:
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


def _materialise(name: str, preset: dict, role: str, build) -> Path:
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
    class_name = {"captioner": "BlipForConditionalGeneration", "filter": "BlipForImageTextRetrieval"}[role]
    what = f"{role}.model {name}"
    _not_empty(name, what)
    preset = _preset(name, what)
    if preset is not None:
        if preset.get("kind") != "blip":
            raise ModelRefError(f"{what}: the preset is an {preset.get('kind')} model, not a BLIP one")
        import transformers

        blip_config(preset, f"{what}: preset")  # a tokenizer that does not fit refuses before anything is built
        directory = _materialise(name, preset, role, _build_blip(preset, getattr(transformers, class_name)))
        return ModelRef(str(directory), {"preset": name, "sha256": weights_sha256(directory)})
    local = _existing(name)
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
        return ModelRef(str(local), {"path": str(local), "sha256": _local_weights(local, what)})
    return hub_ref(name, revision, what, "config.json")


def resolve_clip(name: str, pretrained: str | None = None) -> tuple[str, str | None, dict]:
    """Returns (open_clip model name, pretrained tag or file, identity)."""
    what = f"clip.model {name}"
    _not_empty(name, what)
    preset = _preset(name, what)
    if preset is not None:
        if preset.get("kind") != "open_clip":
            raise ModelRefError(f"{what}: the preset is a {preset.get('kind')} model, not an open_clip one")
        if pretrained:
            raise ModelRefError(
                f"{what} is a capfilt preset (seeded random weights), so clip.pretrained {pretrained} would be "
                f"ignored; for a checkpoint name its open_clip architecture: clip: {{model: ViT-B-32, pretrained: "
                f"{pretrained}}}; for the preset drop clip.pretrained"
            )
        directory = _materialise(name, preset, "clip", _build_clip(preset))
        return f"local-dir:{directory}", None, {"preset": name, "sha256": weights_sha256(directory)}
    local = _existing(name)
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
        identity = {"path": str(local), "sha256": _local_weights(local, what)}
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
        if not at:
            return name, None, identity  # open_clip loads an hf-hub: id at main: the commit above
        # open_clip takes no revision: the snapshot of that commit, loaded as the local directory it is
        from huggingface_hub import snapshot_download

        return f"local-dir:{snapshot_download(repo, revision=commit)}", None, identity
    arch = name.replace("/", "-")  # open_clip's own spelling: ViT-B/32 is ViT-B-32
    if arch not in open_clip.list_models():
        if _looks_like_path(name):
            raise ModelRefError(f"{what}: no such file or directory ({_absolute(name)})")
        raise ModelRefError(
            f"{what}: not a capfilt preset, a local open_clip directory or an open_clip architecture"
            f"{_did_you_mean(arch, open_clip.list_models() + list_presets())}; `capfilt models` "
            "lists the presets, open_clip.list_models() the architectures"
        )
    if not pretrained:
        log.warning("%s has no clip.pretrained: open_clip gives it random weights", what)
        return name, None, {"open_clip": name, "pretrained": None}
    checkpoint = Path(pretrained).expanduser()
    if checkpoint.is_file():
        digest = _file_sha256(checkpoint)
        return name, str(checkpoint), {"open_clip": name, "checkpoint": str(checkpoint.resolve()), "sha256": digest}
    if checkpoint.is_dir():
        raise ModelRefError(
            f"clip.pretrained {pretrained} is a directory; give a checkpoint file (.pt, .bin, "
            "or .safetensors), or the directory itself as clip.model when it holds open_clip_config.json"
        )
    tags = open_clip.list_pretrained_tags_by_model(arch)
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg:
        if _looks_like_path(pretrained):
            raise ModelRefError(f"clip.pretrained {pretrained}: no such checkpoint file ({_absolute(pretrained)})")
        shown = ", ".join(tags[:8]) + (f", ... ({len(tags)} in all)" if len(tags) > 8 else "")
        raise ModelRefError(
            f"clip.pretrained {pretrained}: neither a checkpoint file nor a pretrained tag of {arch} "
            f"(its tags: {shown or 'none'})"
        )
    _check_clip_weights(arch, pretrained, cfg)
    return name, pretrained, {"open_clip": name, "pretrained": pretrained}


# --------------------------------------------------------------------------- checks of a reference


def _not_empty(name: str, what: str) -> None:
    if not name.strip():
        raise ModelRefError(f"{what}: empty; name a preset (`capfilt models`), a local directory or a hub id")


def _preset(name: str, what: str) -> dict | None:
    """The preset ``name``, refusing a name that is also a file or directory here (which one?)."""
    preset = load_preset(name)
    if preset is not None and Path(name).exists():
        kind = "directory" if Path(name).is_dir() else "file"
        raise ModelRefError(
            f"{what}: both a capfilt preset and a {kind} here; write ./{name} (or its absolute "
            f"path) for the {kind}, or rename it"
        )
    return preset


def _existing(name: str) -> Path | None:
    path = Path(name).expanduser()
    return path.resolve() if path.exists() else None


def _absolute(name: str) -> Path:
    return Path(name).expanduser().absolute()


def _local_weights(directory: Path, what: str) -> str:
    try:
        return weights_sha256(directory)
    except FileNotFoundError:
        raise ModelRefError(f"{what}: no weight files (*.safetensors, *.bin, *.pt) in {directory}") from None


def _looks_like_path(name: str) -> bool:
    """A name only a path can be (a hub id is ``name`` or ``org/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith(("/", ".", "~")) or "\\" in name or Path(name).suffix in WEIGHT_SUFFIXES | {".ckpt"}:
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


_HUB: dict = {}


def hub_unreachable() -> str | None:
    """Why the model hub cannot be reached (None when it can): offline mode, or no answer from it
    within a few seconds. Asked once per process."""
    if _offline():
        return "HF_HUB_OFFLINE is set"
    if "reason" not in _HUB:
        _HUB["reason"] = _probe_hub()
    return _HUB["reason"]


def _offline() -> bool:
    """huggingface_hub's own offline flag, which transformers obeys too (HF_HUB_OFFLINE or
    TRANSFORMERS_OFFLINE, read by huggingface_hub when it is imported): the hub is never asked."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def _cached_but_unreachable(what: str) -> None:
    """A model in the local cache loads without the hub only in offline mode: without it, every file
    is retried against the unreachable hub for minutes before the cache is used."""
    unreachable = None if _offline() else hub_unreachable()
    if unreachable:
        raise ModelRefError(
            f"{what}: the hub is unreachable ({unreachable}) but the model is in the local cache; "
            "set HF_HUB_OFFLINE=1 to load it from there"
        )


def _probe_hub(timeout: float = 3.0) -> str | None:
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    outcome: dict = {}

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # it answered
        except Exception as err:  # noqa: BLE001 - any failure to connect means unreachable
            outcome["error"] = f"{endpoint}: {getattr(err, 'reason', err)}"

    thread = threading.Thread(target=probe, daemon=True)  # a name lookup can outlast the socket timeout
    thread.start()
    thread.join(timeout + 1)
    if thread.is_alive():
        return f"no answer from {endpoint} within {timeout + 1:.0f} s"
    return outcome.get("error")


def hub_ref(name: str, revision: str | None, what: str, filename: str) -> ModelRef:
    """A hub id, pinned: ``name`` may carry its revision as ``org/name@revision`` (as timm's
    ``hf-hub:`` ids do), which is how a config that has no ``revision`` key names one (``start_med``).
    The identity records the commit the revision resolved to, and the ref loads that commit: a
    ``main`` that moved is another model, so a resume refuses it like any changed weight."""
    repo, _, at = name.partition("@")
    if at and revision and at != revision:
        raise ModelRefError(f"{what}: names revision {at!r} but the config's revision is {revision!r}; give one")
    revision = revision or at or None
    commit = check_hub_model(repo, revision, what, filename)
    return ModelRef(repo, {"hub_id": repo, "revision": revision or "main", "commit": commit}, commit)


def check_hub_model(repo: str, revision: str | None, what: str, filename: str) -> str:
    """A hub id must be in the local cache, or on a reachable hub: refuse fast otherwise (rather than
    let from_pretrained retry for half a minute). Returns the commit ``revision`` resolves to: the
    cached snapshot's offline, the hub's own answer online (what from_pretrained would load)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if _looks_like_path(repo):
        raise ModelRefError(f"{what}: no such directory ({_absolute(repo)})")
    try:
        cached = try_to_load_from_cache(repo, filename, revision=revision)
    except HFValidationError:
        raise ModelRefError(f"{what}: no such directory ({_absolute(repo)})") from None
    if isinstance(cached, str):
        _cached_but_unreachable(what)
        if _offline():
            return _snapshot_commit(cached)
    unreachable = hub_unreachable()
    here = f"not a preset{_did_you_mean(repo, list_presets())}, not a local directory"
    if unreachable:
        raise ModelRefError(
            f"{what}: {here}, and the hub is unreachable ({unreachable}) with no copy in the local "
            "cache; give a local directory, or download it once while online"
        )
    try:
        path = hf_hub_download(repo, filename, revision=revision)
    except GatedRepoError:
        raise ModelRefError(
            f"{what}: a gated model on the hub; accept its terms on the hub and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelRefError(f"{what}: {here}, nor a model on the hub (a private one needs `hf auth login`)") from None
    except RevisionNotFoundError:
        raise ModelRefError(f"{what}: the hub has no revision {revision!r} of it") from None
    except EntryNotFoundError:
        raise ModelRefError(f"{what}: the hub repository has no {filename}, so it is not that kind of model") from None
    except Exception as err:  # noqa: BLE001 - any other failure to reach it: say what happened, in one line
        raise ModelRefError(
            f"{what}: could not fetch its {filename} from the hub ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]})"
        ) from None
    return _snapshot_commit(path)


def _snapshot_commit(path: str) -> str:
    """The commit of a file huggingface_hub returned: it lies at ``snapshots/<commit>/<filename>``."""
    return Path(path).parent.name


def _check_clip_weights(arch: str, tag: str, cfg: dict) -> None:
    """An open_clip pretrained tag downloads its weights at load: they must be cached or reachable."""
    from huggingface_hub import try_to_load_from_cache

    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)  # as open_clip splits it: "org/name/" = its default file
        filename = filename or "open_clip_pytorch_model.bin"
        names = [
            filename,
            "open_clip_model.safetensors"
            if filename == "open_clip_pytorch_model.bin"
            else filename.removesuffix(".bin") + ".safetensors",
        ]
        if any(isinstance(try_to_load_from_cache(repo, n), str) for n in names):
            _cached_but_unreachable(f"clip {arch} / {tag}")
            return
    elif cfg.get("url") and (Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])).is_file():
        return  # downloaded from a URL (not the hub): open_clip uses the file without asking
    unreachable = hub_unreachable()
    if unreachable:
        raise ModelRefError(
            f"clip {arch} / {tag}: its weights are not in the local cache and the hub is unreachable "
            f"({unreachable}); download them once while online, or give a checkpoint file as "
            "clip.pretrained"
        )


def _build_clip(preset: dict):
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
