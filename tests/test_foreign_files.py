"""capfilt never writes over or deletes a file it did not write (issue 22, item 12), on disk and on
a real S3 server (moto, tests/s3server.py).

- an output that is not empty and holds no capfilt run is refused before anything is written (not
  even the run lock), naming what is there; with --fresh too;
- run.json records the shard ids each run of the output was started for; the start's sweep and
  --fresh delete only those shards' files (and run.json / summary.json), so a file of another shard
  id in capfilt's own folders survives both, and a run that would write over such a file refuses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from s3server import BUCKET

from capfilt.cli import main
from capfilt.io.folder import OutputFolder
from capfilt.io.run_dir import ForeignOutput, RunDir
from capfilt.pipeline import run
from capfilt.synthetic import main_synth

KEEP_ALL = ["decide.web.itm=0", "decide.synthetic.itm=0"]


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("foreign-corpus")
    main_synth(root, shards=2, per_shard=3, seed=4)
    return root


def shards(corpus: Path) -> list[Path]:
    return sorted(corpus.glob("*.tar"))


# --------------------------------------------------------------------------- local


@pytest.mark.parametrize("fresh", [False, True], ids=["plain", "fresh"])
def test_a_folder_of_someone_elses_shards_is_refused_and_left_as_it_was(corpus, tmp_path, capsys, tiny_recipe, fresh):
    out = tmp_path / "E" / "c8"
    (out / "shards").mkdir(parents=True)
    (out / "stats").mkdir()
    (out / "shards" / "00000.tar").write_bytes(b"someone else's shard")
    (out / "shards" / "00001.tar").write_bytes(b"someone else's shard too")
    (out / "stats" / "notes.json").write_bytes(b"{}")
    before = snapshot(tmp_path)
    argv = ["run", str(tiny_recipe), "--input", str(corpus / "*.tar"), "--output", str(out), "--quiet"]
    assert main([*argv, "--fresh"] if fresh else argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"capfilt: error: output {out} is not empty and holds no capfilt run"), err
    assert "shards/00000.tar" in err and "stats/notes.json" in err
    assert snapshot(tmp_path) == before  # nothing written (no run.lock, no run.json), nothing deleted


def test_a_run_json_that_is_not_capfilts_is_refused(corpus, tmp_path, tiny):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text('{"experiment": 7}')
    (out / "shards").mkdir()
    (out / "shards" / "00000.tar").write_bytes(b"theirs")
    before = snapshot(tmp_path)
    for fresh in (False, True):
        with pytest.raises(ForeignOutput, match="not a capfilt run record"):
            run(tiny(shards(corpus), out, thresholds=KEEP_ALL), fresh=fresh, progress=False)
    assert snapshot(tmp_path) == before


def test_an_empty_folder_or_one_holding_only_a_stale_lock_is_used(corpus, tmp_path, tiny):
    empty = tmp_path / "empty"
    (empty / "shards").mkdir(parents=True)  # empty folders hold nothing to lose
    assert run(tiny(shards(corpus)[:1], empty, thresholds=KEEP_ALL), progress=False).ok
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "run.lock").write_text(json.dumps({"host": "gone", "pid": 1, "heartbeat": 0, "token": "x"}))
    (stale / "run.json.tmp-0123abcd").write_text("half")
    assert RunDir(stale).check_own(["00000"]) is None


def test_files_of_shards_the_run_did_not_record_survive_the_sweep_and_fresh(corpus, tmp_path, tiny, caplog):
    out = tmp_path / "out"
    first = shards(corpus)[:1]
    assert run(tiny(first, out, thresholds=KEEP_ALL), progress=False).ok
    assert json.loads((out / "run.json").read_text())["shards"] == ["00000"]
    # A user's files under names capfilt gives, of a shard id no run of this output was started for.
    theirs = {
        "shards/99999.tar": b"mine",
        "stats/99999.json": b"{}",
        "ledger/99999.parquet.tmp-0123abcd": b"mine, with a temporary-looking name",
        "_parts/99999.000001.part": b"mine",
    }
    for rel, data in theirs.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    (out / "ledger" / "00000.parquet.tmp-89abcdef").write_bytes(b"this run's leftover")
    assert run(tiny(first, out, thresholds=KEEP_ALL), progress=False).ok  # resume: sweep
    assert not (out / "ledger" / "00000.parquet.tmp-89abcdef").exists()
    assert run(tiny(first, out, ["captioner.top_p=0.5"], thresholds=KEEP_ALL), fresh=True, progress=False).ok
    for rel, data in theirs.items():
        assert (out / rel).read_bytes() == data, rel
    assert "shards/99999.tar" in caplog.text  # --fresh names what it left


def test_a_run_that_would_write_over_an_unrecorded_file_refuses(corpus, tmp_path, tiny):
    out = tmp_path / "out"
    a, b = shards(corpus)
    assert run(tiny([a], out, thresholds=KEEP_ALL), progress=False).ok
    (out / "shards" / "00001.tar").write_bytes(b"not capfilt's")
    before = snapshot(tmp_path)
    for fresh in (False, True):
        with pytest.raises(ForeignOutput, match=r"shards/00001.tar under names this run would write"):
            run(tiny([a, b], out, thresholds=KEEP_ALL), fresh=fresh, progress=False)
    assert snapshot(tmp_path) == before
    (out / "shards" / "00001.tar").unlink()
    assert run(tiny([a, b], out, thresholds=KEEP_ALL), progress=False).ok
    assert json.loads((out / "run.json").read_text())["shards"] == ["00000", "00001"]


def test_sweep_deletes_only_the_recorded_shards_temporaries(tmp_path):
    (tmp_path / "shards").mkdir()
    ours = tmp_path / "shards" / "00000.tar.tmp-0a1b2c3d"
    theirs = tmp_path / "shards" / "12345.tar.tmp-0a1b2c3d"
    for p in (ours, theirs):
        p.write_text("x")
    assert OutputFolder(tmp_path).sweep({"00000"}) == [str(ours)]
    assert theirs.exists()


# --------------------------------------------------------------------------- S3


def test_s3_prefix_of_someone_elses_objects_is_refused_and_untouched(s3, corpus, tiny, puts_s3):
    root = f"{BUCKET}/e8"
    s3.pipe_file(f"{root}/shards/my-precious-data.tar", b"precious")
    s3.pipe_file(f"{root}/stats/notes.json", b"{}")
    s3.pipe_file(f"{root}/shards/00000.tar", b"theirs")
    puts_s3.clear()  # from here on: capfilt's writes and deletes
    for fresh in (False, True):
        with pytest.raises(ForeignOutput, match="is not empty and holds no capfilt run") as err:
            run(
                tiny([str(p) for p in shards(corpus)], f"s3://{root}", thresholds=KEEP_ALL), fresh=fresh, progress=False
            )
        assert "shards/my-precious-data.tar" in str(err.value)
    s3.invalidate_cache()
    assert sorted(s3.find(root)) == [
        f"{root}/shards/00000.tar",
        f"{root}/shards/my-precious-data.tar",
        f"{root}/stats/notes.json",
    ]
    assert not [k for k in puts_s3 if k.startswith("e8/")]  # not even the lock object


def test_s3_sweep_and_fresh_leave_unrecorded_objects(s3, corpus, tiny):
    out = f"s3://{BUCKET}/mine"
    root = out[5:]
    first = [str(shards(corpus)[0])]
    assert run(tiny(first, out, thresholds=KEEP_ALL), progress=False).ok
    # Under capfilt's names, but of a shard id no run of this output recorded: no marker, so the
    # old sweep took them for a crashed shard's partial files.
    s3.pipe_file(f"{root}/shards/99999.tar", b"mine")
    s3.pipe_file(f"{root}/ledger/99999.parquet", b"mine")
    # This run's own crashed shard: its marker gone, its tar partial: swept and redone.
    s3.rm_file(f"{root}/_done/00000.done")
    s3.pipe_file(f"{root}/shards/00000.tar", b"partial")
    assert run(tiny(first, out, thresholds=KEEP_ALL), progress=False).ok
    assert s3.cat_file(f"{root}/shards/00000.tar") != b"partial"
    assert run(tiny(first, out, ["captioner.top_p=0.5"], thresholds=KEEP_ALL), fresh=True, progress=False).ok
    s3.invalidate_cache()
    assert s3.cat_file(f"{root}/shards/99999.tar") == b"mine"
    assert s3.cat_file(f"{root}/ledger/99999.parquet") == b"mine"


@pytest.fixture()
def puts_s3(s3, monkeypatch):
    """Keys of every object write that completes, in order."""
    import s3fs
    from fsspec.asyn import sync_wrapper

    log: list[str] = []
    original = s3fs.S3FileSystem._call_s3

    async def recording(self, method, *args, **kwargs):
        out = await original(self, method, *args, **kwargs)
        if method in ("put_object", "complete_multipart_upload", "delete_object", "delete_objects"):
            log.append(kwargs.get("Key", method))
        return out

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", recording)
    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", sync_wrapper(recording))
    return log


def test_the_refusal_names_a_few_files_without_walking_everything(tmp_path):
    out = tmp_path / "home"
    for i in range(30):
        (out / f"d{i % 3}" / f"e{i}").mkdir(parents=True)
        (out / f"d{i % 3}" / f"e{i}" / "f.txt").write_text("x")
    (out / "link").symlink_to(tmp_path)  # a link is something there, never followed
    with pytest.raises(ForeignOutput) as err:
        RunDir(out).check_own(["00000"])
    assert "link" in str(err.value) and str(err.value).count("f.txt") == 4 and ", ..." in str(err.value)


def test_empty_folders_on_a_file_system_with_folders_hold_nothing():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.makedirs("/capfilt-foreign/out/shards", exist_ok=True)
    assert RunDir("memory://capfilt-foreign/out").check_own(["00000"]) is None
    fs.pipe_file("/capfilt-foreign/out/shards/x.tar", b"theirs")
    with pytest.raises(ForeignOutput, match="shards/x.tar"):
        RunDir("memory://capfilt-foreign/out").check_own(["00000"])
    fs.rm("/capfilt-foreign", recursive=True)
