"""`capfilt rethreshold`: new decisions from an existing ledger, no model run.

The ledger holds every candidate's scores, so a new policy only needs `decide_sample` again; the
image bytes for the new cleaned shards are copied from the original input shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from capfilt.config import ConfigError, load_config, parse_config, set_dotted
from capfilt.io.output import write_shard
from capfilt.io.run_dir import RunDir, check_apart
from capfilt.io.run_lock import RunLock
from capfilt.io.shards import expand_shards, image_member, read_shard, shard_id
from capfilt.records import Reason
from capfilt.stages.decide import Decide

class IncompleteRun(ValueError):
    """The source run has shards without a completion marker (and --partial was not given)."""


_WEB_PRE_REASONS = {Reason.WEB_TEXT_MISSING, Reason.WEB_TEXT_EMPTY, Reason.WEB_TEXT_NOT_UTF8, Reason.WEB_TEXT_TOO_LONG}


def _new_config(run_dir: Path, config_path: str | None, overrides: list[str]):
    record = json.loads((run_dir / "run.json").read_text())
    data = record["config"]
    if config_path:
        decide = load_config(config_path).decide
        data["decide"] = decide.model_dump(mode="json")
    for assignment in overrides:
        if not assignment.startswith("decide."):
            raise ConfigError(f"rethreshold only changes the decide section; cannot --set {assignment}")
        set_dotted(data, assignment)
    return parse_config(data), record["models"]


def _rows_from_ledger(table, images: dict) -> dict:
    cols = {c: [] for c in ("shard", "key", "occurrence", "seed", "url", "image_ext", "image_bytes", "web_text",
                            "web_reason", "source_json", "failure", "detail", "captions", "itm", "itc", "clip")}
    samples: dict = {}
    for r in table.to_pylist():
        samples.setdefault((r["key"], r["occurrence"]), []).append(r)
    for (key, occ), cands in samples.items():
        cands.sort(key=lambda r: r["candidate"])
        first = cands[0]
        ext, data, source_json = images.get((key, occ), (None, None, None))
        failed = first["candidate"] == -1
        web = cands[0] if not failed else None
        cols["shard"].append(first["shard"]), cols["key"].append(key), cols["occurrence"].append(occ)
        cols["seed"].append(first["seed"]), cols["url"].append(first["url"])
        cols["image_ext"].append(ext), cols["image_bytes"].append(data), cols["source_json"].append(source_json)
        cols["web_text"].append(first["text"] if failed else web["text"])
        cols["web_reason"].append(web["reason"] if web and web["reason"] in _WEB_PRE_REASONS else "")
        cols["failure"].append(first["reason"] if failed else "")
        cols["detail"].append("failed in the original run" if failed else "")
        cols["captions"].append([c["text"] for c in cands[1:]] if not failed else [])
        for score in ("itm", "itc", "clip"):
            cols[score].append(None if failed else [c[score] for c in cands])
        if not failed and data is None:
            raise FileNotFoundError(f"image of {key} (shard {first['shard']}) not found in the input shards")
    return cols


def source_shards(source: Path, config, partial: bool = False) -> tuple[dict[str, str], list[str]]:
    """The source run's finished shards {id: input url}, in input order, and its unfinished ones.

    The run's shards are its resolved config's input (as `capfilt run` expanded it); a shard is
    finished when its `_done/` marker is there. Raises IncompleteRun if any is missing and not
    ``partial``.
    """
    urls = {shard_id(u): u for u in expand_shards(config.input)}
    done = {s: u for s, u in urls.items() if RunDir(source).done(s)}
    missing = [s for s in urls if s not in done]
    if missing and not partial:
        names = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
        raise IncompleteRun(
            f"{source}: {len(missing)} of {len(urls)} shards are not finished ({names}); finish the run first "
            f"(run `capfilt run` on it again), or pass --partial to derive from the {len(done)} finished shards only")
    return done, missing


def rethreshold(run_dir: str, output: str, config_path: str | None = None, overrides: list[str] = (),
                fresh: bool = False, partial: bool = False) -> dict:
    """Re-decide the run in ``run_dir`` into ``output``. Refuses a source run with unfinished shards
    unless ``partial``; then the new run covers the finished ones and its summary names the rest."""
    source = Path(run_dir)
    if not (source / "run.json").is_file():
        raise FileNotFoundError(f"{source} is not a capfilt run directory (no run.json)")
    config, models = _new_config(source, config_path, list(overrides))
    config = config.model_copy(update={"output": output})
    urls, missing = source_shards(source, config, partial=partial)
    # The new output may be neither the inputs' folder nor the source run's: it would overwrite them.
    check_apart(output, [*urls.values(), str(source / "run.json")])
    with RunLock(output):
        return _derive(source, config, models, urls, missing, output, fresh)


def _derive(source: Path, config, models: dict, urls: dict, missing: list, output: str, fresh: bool) -> dict:
    target = RunDir(output)
    target.prepare(config, {**models, "rethreshold_of": str(source.resolve())}, fresh=fresh)
    decide = Decide(config.decide, config.filter.cascade if config.filter else None)
    shards = list(urls)
    for shard in shards:
        if target.done(shard):
            continue
        images = {}
        for s in read_shard(urls[shard]):
            member = image_member(s)
            if member:
                js = s.members.get("json")
                images[(s.key, s.occurrence)] = (*member, js.decode("utf-8", "replace") if js else None)
        rows = _rows_from_ledger(pq.read_table(source / "ledger" / f"{shard}.parquet"), images)
        write_shard(target.path, shard, [decide(rows)], laion=config.decide.mode == "laion_coco",
                    source=urls[shard])
    return target.summary(shards, missing_source_shards=missing)
