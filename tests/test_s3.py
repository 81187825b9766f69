"""Input and output on a real S3 server (moto in server mode, on 127.0.0.1): the object-store
commit protocol (files under their final names, marker last), byte-equality with the same run on
local disk, resume, crash recovery and the run lock as an object.

s3fs reaches the server through ``AWS_ENDPOINT_URL``, the standard variable botocore reads (as it
would reach MinIO or any S3-compatible store); credentials are dummies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from s3server import BUCKET  # s3fs and moto are test dependencies: never skipped
from thresholds import split_thresholds

from capfilt.config import load_config
from capfilt.io.run_lock import OutputLocked, RunLock
from capfilt.pipeline import run
from capfilt.synthetic import main_synth

RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "demo" / "tiny.yaml"
OUT = f"s3://{BUCKET}/runs/out"
KINDS = {"shards": ".tar", "ledger": ".parquet", "stats": ".json", "_done": ".done"}


def tiny(inputs, output):
    return load_config(RECIPE, split_thresholds()).model_copy(update={"input": inputs, "output": output})


@pytest.fixture()
def puts(s3, monkeypatch):
    """Every object write that completes, in order: (kind, key)."""
    import s3fs

    log: list[str] = []
    original = s3fs.S3FileSystem._call_s3

    async def recording(self, method, *args, **kwargs):
        out = await original(self, method, *args, **kwargs)
        if method in ("put_object", "complete_multipart_upload"):
            log.append(kwargs["Key"])
        return out

    from fsspec.asyn import sync_wrapper

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", recording)
    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", sync_wrapper(recording))  # what S3File uploads with
    return log


@pytest.fixture(scope="module")
def inputs(s3, tmp_path_factory):
    """Two broken-corpus shards made locally, then uploaded with their sidecars."""
    local = tmp_path_factory.mktemp("s3data")
    main_synth(local, shards=2, per_shard=10, broken=True, seed=5)
    for p in sorted(local.iterdir()):
        if p.is_file() and p.suffix in (".tar", ".parquet", ".json"):
            s3.put_file(str(p), f"{BUCKET}/data/{p.name}")
    return local


@pytest.fixture(scope="module")
def local_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("localrun")
    result = run(tiny(sorted(str(p) for p in inputs.glob("*.tar")), str(out)), progress=False)
    assert result.ok
    return out


@pytest.fixture(scope="module")
def s3_run(s3, inputs, local_run):
    result = run(tiny([f"s3://{BUCKET}/data/*.tar"], OUT), progress=False)
    return result


def _outputs(local: Path) -> list[str]:
    return sorted(p.relative_to(local).as_posix() for sub in KINDS for p in (local / sub).glob("*"))


def _assert_equal_to_local(s3, local: Path) -> None:
    names = _outputs(local)
    assert names and len(names) == 4 * 2 + 1  # and shards/sizes.json
    for rel in names:
        assert s3.cat_file(f"{OUT[5:]}/{rel}") == (local / rel).read_bytes(), rel


def test_s3_outputs_equal_the_local_run(s3, s3_run, local_run):
    assert s3_run.ok, s3_run.shard_errors
    s3.invalidate_cache()
    present = sorted(p.removeprefix(OUT[5:] + "/") for p in s3.find(OUT[5:]))
    assert present == sorted([*_outputs(local_run), "run.json", "summary.json"])  # and no run.lock left
    _assert_equal_to_local(s3, local_run)
    summary = json.loads(s3.cat_file(f"{OUT[5:]}/summary.json"))
    local_summary = json.loads((local_run / "summary.json").read_text())
    assert summary["output"] == OUT
    for k in ("input", "kept", "rejected", "failed", "shards", "shards_done", "failed_by_reason"):
        assert summary[k] == local_summary[k], k
    # accounting: per shard and over the run, input = kept + rejected + failed, each key once
    total = 0
    for shard in ("00000", "00001"):
        stats = json.loads(s3.cat_file(f"{OUT[5:]}/stats/{shard}.json"))
        assert stats["input"] == stats["kept"] + stats["rejected"] + stats["failed"]
        with s3.open(f"{OUT[5:]}/ledger/{shard}.parquet", "rb") as f:
            rows = pq.read_table(f).to_pylist()
        assert len({(r["key"], r["occurrence"]) for r in rows}) == stats["input"]
        total += stats["input"]
    assert summary["input"] == total == summary["kept"] + summary["rejected"] + summary["failed"]


def test_markers_are_written_last(s3, inputs, local_run, puts):
    out = f"s3://{BUCKET}/runs/order"
    assert run(tiny([f"s3://{BUCKET}/data/*.tar"], out), progress=False).ok
    prefix = out[5:].split("/", 1)[1] + "/"
    keys = [k.removeprefix(prefix) for k in puts if k.startswith(prefix)]
    for shard in ("00000", "00001"):
        files = [f"{sub}/{shard}{suffix}" for sub, suffix in KINDS.items()]
        assert all(keys.count(f) == 1 for f in files), keys
        assert max(keys.index(f) for f in files[:-1]) < keys.index(files[-1]), keys
    assert keys.index("run.json") < keys.index("shards/00000.tar")
    assert keys[-1] == "summary.json"


def test_rerun_skips_done_shards(s3, s3_run, local_run, puts):
    assert run(tiny([f"s3://{BUCKET}/data/*.tar"], OUT), progress=False).ok
    prefix = OUT[5:].split("/", 1)[1] + "/"
    written = sorted(k.removeprefix(prefix) for k in puts if k.startswith(prefix))
    assert written == ["run.json", "run.lock", "shards/sizes.json", "summary.json"]  # sizes: at the summary
    _assert_equal_to_local(s3, local_run)


def test_a_crashed_shard_is_swept_and_redone(s3, s3_run, local_run, puts):
    root = OUT[5:]
    s3.rm_file(f"{root}/_done/00001.done")  # the crash: no marker, a partial tar, its stats gone
    s3.pipe_file(f"{root}/shards/00001.tar", b"partial")
    s3.rm_file(f"{root}/stats/00001.json")
    assert run(tiny([f"s3://{BUCKET}/data/*.tar"], OUT), progress=False).ok
    prefix = root.split("/", 1)[1] + "/"
    written = [k.removeprefix(prefix) for k in puts if k.startswith(prefix)]
    assert not any("00000" in k for k in written)  # the complete shard is left alone
    assert written.index("_done/00001.done") > written.index("shards/00001.tar")
    _assert_equal_to_local(s3, local_run)


def test_a_second_run_refuses_while_the_lock_object_is_held(s3, s3_run):
    lock = RunLock(OUT)
    lock.acquire()
    try:
        record = json.loads(s3.cat_file(f"{OUT[5:]}/run.lock"))
        assert record["token"] == lock.token
        with pytest.raises(OutputLocked, match="in use by another capfilt run"):
            RunLock(OUT).acquire()
        with pytest.raises(OutputLocked):
            run(tiny([f"s3://{BUCKET}/data/*.tar"], OUT), progress=False)
    finally:
        lock.release()
    assert not s3.exists(f"{OUT[5:]}/run.lock")


def test_a_stale_lock_object_is_taken_over_and_the_heartbeat_refreshes_it(s3, caplog):
    import time

    out = f"s3://{BUCKET}/runs/stale"
    stale = {"host": "elsewhere", "pid": 1, "token": "x", "heartbeat": time.time() - 3600, "started": "then"}
    s3.pipe_file(f"{out[5:]}/run.lock", json.dumps(stale).encode())
    lock = RunLock(out, heartbeat_s=0.05, stale_s=60)
    with caplog.at_level("WARNING", logger="capfilt"):
        lock.acquire()
    try:
        assert "taking over the stale lock" in caplog.text
        first = json.loads(s3.cat_file(f"{out[5:]}/run.lock"))
        assert first["token"] == lock.token
        while lock.holder()["heartbeat"] == first["heartbeat"]:  # until it beats (pytest-timeout ends a hang)
            time.sleep(0.05)
        assert lock.holder()["heartbeat"] > first["heartbeat"]
    finally:
        lock.release()
    assert lock.holder() is None


def test_the_lock_refuses_a_conditional_create_over_an_existing_object(s3):
    """The create is a put with If-None-Match: * (no check-then-put window on this server)."""
    path = f"{BUCKET}/runs/cond/run.lock"
    s3.pipe_file(path, b"{}", mode="create")
    with pytest.raises(FileExistsError):
        s3.pipe_file(path, b"{}", mode="create")


def test_fresh_deletes_only_capfilts_objects(s3, inputs):
    out = f"s3://{BUCKET}/runs/fresh"
    assert run(tiny([f"s3://{BUCKET}/data/00000.tar"], out), progress=False).ok
    s3.pipe_file(f"{out[5:]}/shards/notes.txt", b"mine")
    s3.pipe_file(f"{out[5:]}/README", b"mine")
    assert run(tiny([f"s3://{BUCKET}/data/00001.tar"], out), fresh=True, progress=False).ok
    s3.invalidate_cache()
    left = sorted(p.removeprefix(out[5:] + "/") for p in s3.find(out[5:]))
    assert left == [
        "README",
        "_done/00001.done",
        "ledger/00001.parquet",
        "run.json",
        "shards/00001.tar",
        "shards/notes.txt",
        "shards/sizes.json",
        "stats/00001.json",
        "summary.json",
    ]


def test_memory_filesystem_lock_and_outputs(inputs, local_run):
    """Any fsspec URL works the same way; memory:// has no conditional put issues to emulate."""
    import fsspec

    out = "memory://capfilt-test/out"
    with RunLock(out):
        with pytest.raises(OutputLocked):
            RunLock(out).acquire()
    assert run(tiny(sorted(str(p) for p in inputs.glob("*.tar")), out), progress=False).ok
    fs = fsspec.filesystem("memory")
    for rel in _outputs(local_run):
        assert fs.cat_file(f"/capfilt-test/out/{rel}") == (local_run / rel).read_bytes(), rel
    fs.rm("/capfilt-test", recursive=True)


def test_a_marker_another_process_writes_is_seen_after_a_listing(s3):
    """A driver lists the markers (resume), then shard workers elsewhere commit: s3fs caches that
    listing, and is_complete, completed and the summary must not answer from it."""
    import s3fs

    from capfilt.io.folder import OutputFolder
    from capfilt.io.run_dir import RunDir

    url = f"s3://{BUCKET}/runs/marker-cache"
    folder = OutputFolder(url)
    folder.mark_complete("a")
    assert folder.completed() == {"a"}  # the _done/ listing, now in s3fs's cache
    worker = s3fs.S3FileSystem(skip_instance_cache=True)  # another process's file system
    worker.pipe_file(f"{BUCKET}/runs/marker-cache/stats/b.json", json.dumps({"input": 3}).encode())
    worker.pipe_file(f"{BUCKET}/runs/marker-cache/_done/b.done", b"")
    assert folder.is_complete("b")
    assert folder.completed() == {"a", "b"}
    assert RunDir(url).samples_in(["a", "b"]) == 3  # a has no stats file: not counted
