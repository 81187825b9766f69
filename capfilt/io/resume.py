"""The resume verdict: may a run continue in an output that already holds a run? One rule and one
message for `capfilt run` and `capfilt rethreshold` alike (`RunDir.prepare` asks it)."""

from __future__ import annotations

import json
import logging

from capfilt.config import flatten, output_settings

log = logging.getLogger(__name__)


class ResumeRefused(RuntimeError):
    """The output holds a run under another config or models, with shards already complete."""


def check_resume(output: str, record: dict, fingerprint: str, config, models: dict, done: int) -> None:
    """Refuse resuming the run ``record`` (its run.json) under another config or models, naming each
    changed key, unless none of its ``done`` shards completed: then nothing can mix and the caller
    replaces its run.json (a start that failed, e.g. on a model that did not load, blocks nothing)."""
    if record.get("fingerprint") == fingerprint:
        return
    changes = changed_settings(record, config, models)
    if not done:
        log.warning(
            "%s: replacing run.json of a start that completed no shard (%s)",
            output,
            "; ".join(changes) or "capfilt version",
        )
        return
    raise ResumeRefused(refusal(output, done, changes, config))


def _show(value) -> str:
    text = "null" if value is None else value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:12] + "…"


def changed_settings(previous: dict, config, models: dict) -> list[str]:
    """``key: old -> new`` for each output-deciding setting (dotted config key, or models.ROLE.FIELD)
    that differs between a run.json and this run."""
    old = flatten(output_settings(previous.get("config") or {}))
    old.update(flatten({"models": previous.get("models") or {}}))
    new = flatten(output_settings(config.model_dump(mode="json")))
    new.update(flatten({"models": models}))
    missing = object()
    return [
        f"{key}: {_show(old.get(key))} -> {_show(new.get(key))}"
        for key in sorted(set(old) | set(new))
        if old.get(key, missing) != new.get(key, missing)
    ]


def refusal(output: str, done: int, changes: list[str], config) -> str:
    shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
    what = f"changed: {shown}" if changes else "no setting differs: another capfilt version fingerprinted it"
    head = f"{output} holds a run with a different config or models ({done} shard(s) done; {what})."
    keys = [c.split(":", 1)[0] for c in changes]
    if keys and all(k.startswith("decide.") for k in keys):
        values = flatten({"decide": config.decide.model_dump(mode="json")})
        sets = " ".join(f"--set {k}={_show(values[k])}" for k in keys if k in values)
        return (
            f"{head}\nOnly `decide` changed: `capfilt rethreshold {output} --output NEW_DIR {sets}` applies it "
            "from the ledger without running the models; or use a new --output, or --fresh to start over."
        )
    return f"{head}\nResuming would mix two configurations: use a new --output, or --fresh to discard the old outputs."
