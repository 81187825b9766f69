"""Hub access: whether the hub is reachable (asked once per process), hub ids pinned to the commit
they resolve to, and weights that must be cached or reachable before a load is tried."""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from capfilt.modeling.presets.checks import absolute_path, did_you_mean, looks_like_path
from capfilt.modeling.presets.registry import ModelRef, ModelRefError, list_presets

_HUB: dict = {}  # the probe's answer, once per process (tests reset it)
# (hub id, revision) -> the commit a run recorded for it, while that run's worker loads its models.
_PINS: ContextVar[dict | None] = ContextVar("capfilt_hub_pins", default=None)


@contextmanager
def pinned(identities: dict):
    """Within it, each hub model of ``identities`` (a run.json's ``models``: the driver resolved
    them once) resolves to the commit recorded there, whatever its revision names now. A shard
    worker loads its models inside it, so every worker, on any node and at any time, loads what
    the run recorded, not a ``main`` that moved after the run started."""
    pins = dict(_PINS.get() or {})
    for identity in _hub_identities(identities):
        pins[(identity["hub_id"], identity["revision"])] = identity["commit"]
    token = _PINS.set(pins)
    try:
        yield
    finally:
        _PINS.reset(token)


def _hub_identities(identities):
    """The hub identities (``hub_id``, ``revision``, ``commit``) in a run.json ``models`` value."""
    if isinstance(identities, dict):
        if {"hub_id", "revision", "commit"} <= identities.keys():
            yield identities
        else:
            for value in identities.values():
                yield from _hub_identities(value)
    elif isinstance(identities, list):  # a clip chain
        for value in identities:
            yield from _hub_identities(value)


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

    if looks_like_path(repo):
        raise ModelRefError(f"{what}: no such directory ({absolute_path(repo)})")
    revision = (_PINS.get() or {}).get((repo, revision or "main"), revision)  # a run's recorded commit (`pinned`)
    try:
        cached = try_to_load_from_cache(repo, filename, revision=revision)
    except HFValidationError:
        raise ModelRefError(f"{what}: no such directory ({absolute_path(repo)})") from None
    if isinstance(cached, str):
        _cached_but_unreachable(what)
        if _offline():
            return _snapshot_commit(cached)
    unreachable = hub_unreachable()
    here = f"not a preset{did_you_mean(repo, list_presets())}, not a local directory"
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


def check_clip_weights(arch: str, tag: str, cfg: dict) -> None:
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
