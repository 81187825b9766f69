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
from capfilt.io.run_dir import RunDir
from capfilt.io.shards import expand_shards, image_member, read_shard, shard_id
from capfilt.records import Reason
from capfilt.stages.decide import Decide

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


def rethreshold(run_dir: str, output: str, config_path: str | None = None, overrides: list[str] = (),
                fresh: bool = False) -> dict:
    source = Path(run_dir)
    if not (source / "run.json").is_file():
        raise FileNotFoundError(f"{source} is not a capfilt run directory (no run.json)")
    config, models = _new_config(source, config_path, list(overrides))
    config = config.model_copy(update={"output": output})
    target = RunDir(output)
    target.prepare(config, {**models, "rethreshold_of": str(source.resolve())}, fresh=fresh)
    decide = Decide(config.decide, config.filter.cascade if config.filter else None)
    urls = {shard_id(u): u for u in expand_shards(config.input)}
    shards = sorted(p.stem for p in (source / "_done").glob("*.done"))
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
        write_shard(target.path, shard, [decide(rows)], laion=config.decide.mode == "laion_coco")
    return target.summary(shards)
