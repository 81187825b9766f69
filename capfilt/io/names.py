"""The names of everything capfilt writes in an output: the one table of them.

Every module that writes, sweeps, clears, lists or recognises capfilt's files imports the names
from here, so "which files are capfilt's" cannot drift between the writer, the sweep, ``--fresh``,
the refusal of a foreign output, the lock and the Ray probe.
"""

from __future__ import annotations

import re
import uuid

# A shard's files, one per folder: "{folder}/{shard}{suffix}".
SUBDIRS = ("shards", "ledger", "stats", "laion", "_done")
MARKERS = "_done"  # the completion markers' folder: a shard is complete once its marker is there
# A clip chain model's embeddings (clip.K.embeddings), in clip-retrieval's layout: row r of
# img_emb/{shard}.npy (and text_emb/{shard}.npy) is row r of metadata/{shard}.parquet.
EMBEDDINGS = ("embeddings/img_emb", "embeddings/text_emb", "embeddings/metadata")
OWN_SUFFIXES = {
    "shards": ".tar",
    "ledger": ".parquet",
    "stats": ".json",
    "laion": ".parquet",
    MARKERS: ".done",
    **{sub: suffix for sub, suffix in zip(EMBEDDINGS, (".npy", ".npy", ".parquet"))},
}
OWN_FOLDERS = (*SUBDIRS, *EMBEDDINGS)
SHARD_FILES = tuple(sub for sub in OWN_SUFFIXES if sub != MARKERS)  # a shard's data files (not its marker)

# capfilt's files at the top of an output.
RUN_FILE = "run.json"  # the run record
SUMMARY_FILE = "summary.json"
DUPLICATES_FILE = "duplicates.parquet"  # `capfilt dedup`'s table
ROOT_FILES = (RUN_FILE, SUMMARY_FILE, DUPLICATES_FILE)
LOCK_FILE = "run.lock"  # io/run_lock.py: who holds the output; never swept or cleared, its owner deletes it
SIZES_FILE = "sizes.json"  # in shards/: {tar name: samples}, as webdataset and open_clip read it

# Transient names: a file written locally under "{name}.tmp-XXXXXXXX" and renamed into place; the
# Ray runner's probe that every node sees the output (runners/ray/cluster.py).
TMP_MARK = ".tmp-"
PROBE_MARK = ".capfilt-probe-"
_TOKEN = "[0-9a-f]{8}"
_TMP = rf"{re.escape(TMP_MARK)}{_TOKEN}"
_TMP_TAIL = re.compile(rf"{_TMP}$")
# What the top of an output may hold besides a run and still count as empty: the lock, the root
# files' and the lock's temporaries, and a probe.
BOOKKEEPING = re.compile(
    rf"{re.escape(LOCK_FILE)}|(?:{'|'.join(map(re.escape, (*ROOT_FILES, LOCK_FILE)))}){_TMP}"
    rf"|{re.escape(PROBE_MARK)}{_TOKEN}"
)


def token() -> str:
    """A fresh 8-hex-digit token for a temporary or probe name."""
    return uuid.uuid4().hex[:8]


def tmp_name(name: str, tok: str | None = None) -> str:
    """The temporary name ``{name}.tmp-XXXXXXXX`` a file is written under before its rename."""
    return f"{name}{TMP_MARK}{tok or token()}"


def probe_name() -> str:
    return f"{PROBE_MARK}{token()}"


def shard_file(sub: str, shard: str) -> str:
    """``sub/{shard}{suffix}``: the name capfilt gives shard ``shard``'s file in its folder ``sub``."""
    return f"{sub}/{shard}{OWN_SUFFIXES[sub]}"


def marker(shard: str) -> str:
    return shard_file(MARKERS, shard)


def untemp(name: str) -> tuple[str, bool]:
    """(the final name, whether ``name`` is a temporary of it)."""
    tail = _TMP_TAIL.search(name)
    return (name[: tail.start()], True) if tail else (name, False)


def own_shard(sub: str, name: str) -> tuple[str | None, bool]:
    """(shard id, temporary?) of a file named ``name`` in capfilt's folder ``sub`` when it has the
    name capfilt gives that shard's file there (``{id}.tar`` in shards/, ``{id}.parquet``
    in ledger/, ..., or such a name plus ``.tmp-XXXXXXXX`` while being written); (None, False) else."""
    base, tmp = untemp(name)
    suffix = OWN_SUFFIXES.get(sub)
    if suffix and base.endswith(suffix) and len(base) > len(suffix):
        return base[: -len(suffix)], tmp
    return None, False


def is_own(sub: str, name: str, shards) -> bool:
    """Whether the file ``name`` in ``sub`` ("" for the output's top) is one this output's run
    wrote: a file of one of ``shards`` (the shard ids its run.json records), final or temporary,
    or at the top run.json / summary.json. ``shards`` None (a run.json of a capfilt that did not
    record its shards): every name capfilt gives counts."""
    if not sub:
        return name in ROOT_FILES
    if sub == "shards" and untemp(name)[0] == SIZES_FILE:  # the run's, rewritten at its summary
        return True
    shard, _ = own_shard(sub, name)
    return shard is not None and (shards is None or shard in shards)
