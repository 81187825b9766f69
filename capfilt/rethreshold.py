"""`capfilt rethreshold`: new decisions from an existing ledger, no model run.

The ledger holds every candidate's scores, so a new policy only needs `decide_sample` again; the
image bytes for the new cleaned shards are copied from the original input shards. Besides the
``decide`` section, a clip chain's cutoffs (``keep_top``, ``min_score`` of its models) can change:
the cut is replayed from the ledger's ``clip_scores`` (`stages.clip.chain_cut`). Cutoffs that
would pass a text on to a model which never scored it (loosening a cutoff before the chain's last
model) are refused before anything is written.

A run with an ``edit`` section keeps its edits where the new policy selects the very caption the
run selected (and edited) for a kept sample; a policy under which some kept sample selects another
caption is refused before anything is written (`EditNotRedoable`): an edit needs the edit model.
"""

from __future__ import annotations

import os
import re

from capfilt.config import SCORES, ConfigError, absolute_path, laion_mode, load_config, parse_config, set_dotted
from capfilt.io.apart import check_apart
from capfilt.io.embeddings import attach_embeddings
from capfilt.io.folder import OutputFolder
from capfilt.io.names import RUN_FILE, shard_file
from capfilt.io.rows import laion_meta
from capfilt.io.run_dir import RunDir
from capfilt.io.run_lock import RunLock
from capfilt.io.run_read import is_run, read_ledger_table, read_run_json, read_run_record, run_url
from capfilt.io.shard_writer import write_shard
from capfilt.io.shards import expand_shards, image_member, read_shard, shard_id
from capfilt.records import CLAIM_COLUMNS, IMAGE_SCORES, KEPT, Reason, row_candidates
from capfilt.stages.clip import ChainReplayError, chain_cut
from capfilt.stages.decide import Decide
from capfilt.stages.rows import ROW_COLUMNS


class IncompleteRun(ValueError):
    """The source run has shards without a completion marker (and --partial was not given)."""


class EditNotRedoable(ValueError):
    """The source run edited its selected captions (``edit``) and the new policy selects, for some
    kept sample, a caption that run did not edit: only the edit model could."""


_WEB_PRE_REASONS = {Reason.WEB_TEXT_MISSING, Reason.WEB_TEXT_EMPTY, Reason.WEB_TEXT_NOT_UTF8, Reason.WEB_TEXT_TOO_LONG}
CUTOFFS = ("keep_top", "min_score")  # what rethreshold may change in a clip chain's models
_CLIP_SET = re.compile(r"^clip\.(?:(?P<k>\d+)\.)?(?P<key>keep_top|min_score)$")


def _set_cutoff(data: dict, assignment: str) -> None:
    """``--set clip.keep_top=3`` (a one-model chain) or ``--set clip.K.keep_top=3`` (model K of the
    chain, from 0); likewise min_score."""
    key, _, raw = assignment.partition("=")
    match = _CLIP_SET.match(key.strip())
    chain = data["clip"]["chain"]
    k = int(match["k"]) if match["k"] is not None else None
    if k is None and len(chain) > 1:
        raise ConfigError(
            f"--set {key}: this run's clip chain has {len(chain)} models; name one as "
            f"clip.K.{match['key']} (K from 0 to {len(chain) - 1})"
        )
    k = 0 if k is None else k
    if k >= len(chain):
        raise ConfigError(f"--set {key}: this run's clip chain has {len(chain)} model(s), 0 to {len(chain) - 1}")
    set_dotted(chain[k], f"{match['key']}={raw}")


def _models(chain) -> list[tuple]:
    return [(m.model, m.pretrained) for m in chain] if chain else []


def _new_config(run_dir: str, config_path: str | None, overrides: list[str]):
    record = read_run_record(run_dir)
    data = record["config"]
    before = parse_config(data)
    if before.clip is not None:  # the chain in its explicit form, so that its models can be addressed
        data["clip"] = {
            "chain": [m.model_dump(mode="json") for m in before.clip.chain],
            "batch_size": before.clip.batch_size,
        }
    if config_path:
        recipe = load_config(config_path)
        data["decide"] = recipe.decide.model_dump(mode="json")
        if recipe.claims is not None or before.claims is not None:
            data["claims"] = _replayable_claims(before.claims, recipe.claims, config_path)
        if recipe.clip is not None and before.clip is not None:
            if _models(recipe.clip.chain) != _models(before.clip.chain):
                raise ConfigError(
                    f"{config_path}: its clip models {_models(recipe.clip.chain)} are not this run's "
                    f"{_models(before.clip.chain)}; rethreshold re-decides from the run's scores and "
                    "can change only the chain's cutoffs (keep_top, min_score)"
                )
            for link, new in zip(data["clip"]["chain"], recipe.clip.chain):
                link.update({k: getattr(new, k) for k in CUTOFFS})
    for assignment in overrides:
        key = assignment.partition("=")[0].strip()
        if _CLIP_SET.match(key):
            if before.clip is None:
                raise ConfigError(f"--set {key}: this run has no clip section")
            _set_cutoff(data, assignment)
        elif assignment.startswith("decide."):
            set_dotted(data, assignment)
        elif key in CLAIM_REPLAYABLE:
            if before.claims is None:
                raise ConfigError(f"--set {key}: this run has no claims section (its claims were never scored)")
            set_dotted(data, assignment)
        else:
            raise ConfigError(
                f"rethreshold only changes the decide section and a clip chain's cutoffs "
                f"(clip.keep_top, clip.K.keep_top, ... min_score) and the claims' verdicts "
                f"({', '.join(CLAIM_REPLAYABLE)}); cannot --set {assignment}"
            )
    return parse_config(data), record["models"], before


# What a claims section may change in a rethreshold: the verdicts, not which claims were scored.
CLAIM_REPLAYABLE = ("claims.threshold", "claims.policy", "claims.whole_text")


def _replayable_claims(before, recipe, config_path) -> dict | None:
    """The recipe's claims section when it differs from the run's in replayable keys only."""
    fixed = ("unit", "score", "min_claims", "sources")
    if recipe is None:
        return None  # verification off: every text judged whole again, from its recorded scores
    if before is None or any(getattr(before, k) != getattr(recipe, k) for k in fixed):
        raise ConfigError(
            f"{config_path}: its claims section {recipe.model_dump()} differs from this run's "
            f"{before and before.model_dump()} in what was scored ({', '.join(fixed)}); rethreshold can change "
            f"only {', '.join(CLAIM_REPLAYABLE)}; rerun `capfilt run` for the rest"
        )
    return recipe.model_dump(mode="json")


def _rows_from_ledger(table, images: dict | None, links=None, details: dict | None = None) -> dict:
    """The run's decided rows, rebuilt from a shard's ledger (and, with ``images``, the input
    shard's image bytes and metadata) as the stages would hand them to Decide; ``links`` (the clip
    chain's models) re-cuts the chain from the recorded scores. ``details``: the source shard's
    stats' ``failure_examples`` (reason -> "key: detail"), so a failure keeps its original detail."""
    # The rows the read gives (stages/rows.ROW_COLUMNS), then the model stages' columns.
    columns = (*ROW_COLUMNS, "captions", *SCORES, "clip_scores", "clip_cut", *IMAGE_SCORES)
    cols = {c: [] for c in (*columns, *CLAIM_COLUMNS)}
    samples: dict = {}
    for r in table.to_pylist():
        samples.setdefault((r["key"], r["occurrence"]), []).append(r)
    for (key, occ), cands in samples.items():
        cands.sort(key=lambda r: r["candidate"])
        first = cands[0]
        ext, data, source_json, meta = (images or {}).get((key, occ), (None, None, None, None))
        failed = first["candidate"] == -1
        web = cands[0] if not failed else None
        cols["shard"].append(first["shard"]), cols["key"].append(key), cols["occurrence"].append(occ)
        cols["seed"].append(first["seed"]), cols["url"].append(first["url"])
        cols["image_ext"].append(ext), cols["image_bytes"].append(data), cols["source_json"].append(source_json)
        cols["laion_meta"].append(meta)
        for score in IMAGE_SCORES:  # per image: the same on each of its ledger rows
            cols[score].append(first.get(score))
        cols["web_text"].append(first["text"] if failed else web["text"])
        cols["web_reason"].append(web["reason"] if web and web["reason"] in _WEB_PRE_REASONS else "")
        cols["failure"].append(first["reason"] if failed else "")
        cols["detail"].append(_original_detail(details, first["reason"], key) if failed else "")
        cols["captions"].append([c["text"] for c in cands[1:]] if not failed else [])
        for score in (*SCORES, *CLAIM_COLUMNS):  # a ledger from before claims has no claims
            cols[score].append(None if failed else [c.get(score) for c in cands])
        # A ledger of a one-model chain (or from before chains) has no clip_scores: `clip` is it.
        cols["clip_scores"].append(
            None
            if failed
            else [
                c.get("clip_scores")
                if c.get("clip_scores") is not None
                else (None if c["clip"] is None else [c["clip"]])
                for c in cands
            ]
        )
        cols["clip_cut"].append(None)
        if not failed and data is None and images is not None:
            raise FileNotFoundError(f"image of {key} (shard {first['shard']}) not found in the input shards")
    if links:
        for i in range(len(cols["key"])):
            if cols["failure"][i]:
                continue
            try:
                cols["clip_cut"][i] = chain_cut(row_candidates(cols, i), links)
            except ChainReplayError as err:
                raise ConfigError(
                    f"shard {cols['shard'][i]}, key {cols['key'][i]}: {err}. rethreshold can tighten a clip chain's "
                    "cutoffs before its last model (a smaller keep_top, a higher min_score), not loosen them; "
                    "rerun `capfilt run` for that"
                ) from None
    return cols


def _original_detail(details: dict | None, reason: str, key: str) -> str:
    """The detail the source run recorded for this failure (its stats keep one example per
    reason, "key: detail"), or where it kept another sample's, that it failed there."""
    example = (details or {}).get(reason)
    if isinstance(example, str) and example.startswith(f"{key}: "):
        return example[len(key) + 2 :]
    return "failed in the original run"


def source_shards(source: str, config, partial: bool = False) -> tuple[dict[str, str], list[str]]:
    """The source run's finished shards {id: input url}, in input order, and its unfinished ones.

    The run's shards are its resolved config's input (as `capfilt run` expanded it); a shard is
    finished when its `_done/` marker is there. Raises IncompleteRun if any is missing and not
    ``partial``.
    """
    urls = {shard_id(u): u for u in expand_shards(config.input)}
    complete = OutputFolder(source).completed()
    done = {s: u for s, u in urls.items() if s in complete}
    missing = [s for s in urls if s not in done]
    if missing and not partial:
        names = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
        raise IncompleteRun(
            f"{source}: {len(missing)} of {len(urls)} shards are not finished ({names}); finish the run first "
            f"(run `capfilt run` on it again), or pass --partial to derive from the {len(done)} finished shards only"
        )
    return done, missing


def rethreshold(
    run_dir: str,
    output: str,
    config_path: str | None = None,
    overrides: list[str] = (),
    fresh: bool = False,
    partial: bool = False,
    drop: dict[str, set[str]] | None = None,
) -> dict:
    """Re-decide the run in ``run_dir`` into ``output``. Refuses a source run with unfinished shards
    unless ``partial``; then the new run covers the finished ones and its summary names the rest.
    ``drop`` ({shard: keys}, from `capfilt dedup`) rejects those samples as near_duplicate."""
    # A local path or the URL `capfilt run` wrote to (s3://…): never through pathlib, which would
    # turn s3://bkt into s3:/bkt.
    source = os.fspath(run_dir)
    if not is_run(source):
        raise FileNotFoundError(f"{source} is not a capfilt run directory (no run.json)")
    config, models, before = _new_config(source, config_path, list(overrides))
    config = config.model_copy(update={"output": output})
    urls, missing = source_shards(source, config, partial=partial)
    if config.clip is not None and config.clip.chain != before.clip.chain:
        # Changed chain cutoffs must be replayable from the scores: checked before anything is written.
        for shard in urls:
            _rows_from_ledger(read_ledger_table(source, shard), None, config.clip.chain)
    if config.edit is not None:
        _check_edits(source, config, urls)
    # The new output may be neither the inputs' folder nor the source run's: it would overwrite them.
    check_apart(output, [*urls.values(), run_url(source, RUN_FILE)])
    RunDir(output).check_own(list(urls))  # an output of no capfilt run: refused before the lock is written
    with RunLock(output):
        return _derive(source, config, models, urls, missing, output, fresh, drop)


def _derive(source: str, config, models: dict, urls: dict, missing: list, output: str, fresh: bool, drop=None) -> dict:
    target = RunDir(output)
    target.prepare(config, {**models, "rethreshold_of": _origin(source)}, fresh=fresh, shards=list(urls))
    decide = Decide(config.decide, config.filter.cascade if config.filter else None, config.claims)
    shards = list(urls)
    for shard in shards:
        if target.done(shard):
            continue
        images = {}
        for s in read_shard(urls[shard]):
            member = image_member(s)
            if member:
                js = s.members.get("json")
                js = js.decode("utf-8", "replace") if js else None
                images[(s.key, s.occurrence)] = (*member, js, laion_meta(s.sidecar, js))
        table = read_ledger_table(source, shard)
        details = read_run_json(source, shard_file("stats", shard)).get("failure_examples")
        decided = decide(_rows_from_ledger(table, images, config.clip.chain if config.clip else None, details))
        attach_embeddings(os.fspath(source), shard, decided)  # the source's, carried over
        if drop is not None:
            from capfilt.dedup import reject_duplicates

            reject_duplicates(decided, drop.get(shard, set()))
        if config.edit is not None and _carry_edits(decided, table):
            raise EditNotRedoable(f"shard {shard}: a kept sample selects a caption the source run did not edit")
        write_shard(target.path, shard, [decided], laion=laion_mode(config.decide), source=urls[shard])
    return target.summary(shards, missing_source_shards=missing)


def _origin(source: str) -> str:
    """The source run as the derived run's run.json records it: a URL as given, a path absolute
    (so `capfilt report` on the derived run finds it from any directory)."""
    return absolute_path(source)


def _carry_edits(decided: dict, table) -> list[str]:
    """Sets ``decided["edited"]`` from the source ledger's ``edited_text``: a kept sample keeps its
    edit when the new policy selects the candidate the source run selected and edited. Returns the
    keys of the kept samples whose selected caption has no edit there (the selection changed)."""
    edits = {
        (r["key"], r["occurrence"]): (r["candidate"], r["edited_text"])
        for r in table.to_pylist()
        if r["selected"] and r.get("edited_text") is not None
    }
    edited, lacking = [], []
    for i, key in enumerate(decided["key"]):
        was = edits.get((key, decided["occurrence"][i]))
        same = was is not None and was[0] == decided["selected"][i]
        kept = not decided["failure"][i] and decided["status"][i] == KEPT
        if kept and not same:
            lacking.append(key)
        edited.append(was[1] if kept and same else None)
    decided["edited"] = edited
    return lacking


def _check_edits(source: str, config, urls: dict) -> None:
    """Before anything is written: refuse a new policy that needs an edit the source run lacks."""
    decide = Decide(config.decide, config.filter.cascade if config.filter else None, config.claims)
    lacking = []
    for shard in urls:
        table = read_ledger_table(source, shard)
        decided = decide(_rows_from_ledger(table, None, config.clip.chain if config.clip else None))
        lacking += [f"{shard}/{key}" for key in _carry_edits(decided, table)]
    if lacking:
        shown = ", ".join(lacking[:3]) + (f", ... ({len(lacking) - 3} more)" if len(lacking) > 3 else "")
        raise EditNotRedoable(
            f"{source} edited its selected captions (edit.model {config.edit.model}), and under the new policy "
            f"{len(lacking)} kept sample(s) select a caption that run did not edit ({shown}); rethreshold runs no "
            "model, so it cannot edit them. Rerun `capfilt run` with the new settings (it runs the edit model), "
            "or choose settings under which every kept sample keeps its selected caption"
        )
