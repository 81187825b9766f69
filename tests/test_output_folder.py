"""The output folder (io/folder.py): one rule for what is local, one commit strategy chosen by it,
completion markers behind one API, and one table of capfilt's own names (io/names.py)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from capfilt.io.folder import OutputFolder, is_local
from capfilt.io.names import BOOKKEEPING, LOCK_FILE, OWN_SUFFIXES, marker, probe_name, shard_file, tmp_name
from capfilt.io.shard_writer import ShardWriter
from capfilt.io.shards import expand_shards

CAPFILT = Path(__file__).resolve().parents[1] / "capfilt"


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("out", True),
        ("/data/out", True),
        ("file:///data/out", True),
        ("local:///data/out", True),
        ("s3://bucket/out", False),
        ("memory://out", False),
        ("gs://bucket/out", False),  # (no gcsfs installed here: the rule needs no backend)
    ],
)
def test_one_rule_says_what_is_local(url, local):
    assert is_local(url) is local
    if not url.startswith("gs://"):
        assert OutputFolder(url).renames is local  # the commit strategy follows the same rule


def test_a_relative_output_is_rooted_in_the_working_directory_of_the_moment(tmp_path, monkeypatch):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        assert OutputFolder("out").url_of("run.json") == str(tmp_path / name / "out" / "run.json")


def test_a_local_url_pattern_is_globbed_like_the_path_it_names(tmp_path):
    for name in ("00000.tar", "00001.tar"):
        (tmp_path / name).write_bytes(b"")
    as_path = expand_shards([f"{tmp_path}/*.tar"])
    assert expand_shards([f"file://{tmp_path}/*.tar"]) == as_path
    assert expand_shards([f"local://{tmp_path}/*.tar"]) == as_path


@pytest.mark.parametrize("where", ["local", "memory"])
def test_markers_behind_one_api(where, tmp_path):
    url = str(tmp_path / "out") if where == "local" else f"memory://capfilt-test-{tmp_path.name}"
    folder = OutputFolder(url)
    folder.make_root()
    assert folder.completed() == set() and folder.incomplete(["a", "b"]) == ["a", "b"]
    folder.mark_complete("b")
    assert folder.is_complete("b") and not folder.is_complete("a")
    assert folder.completed() == {"b"} and folder.incomplete(["a", "b", "c"]) == ["a", "c"]
    assert folder.read(marker("b")) == b""


def _rows() -> dict:
    """A batch of no rows: a shard whose files are all empty (enough to see how they are committed)."""
    from capfilt.stages.rows import ROW_COLUMNS

    return {c: [] for c in (*ROW_COLUMNS, "status", "failure", "detail", "reasons", "kept", "selected")}


def test_local_files_are_staged_under_temporary_names_until_the_commit(tmp_path):
    out = tmp_path / "out"
    writer = ShardWriter(str(out), "00000")
    writer.add(_rows())
    staged = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert staged and all(re.search(r"\.tmp-[0-9a-f]{8}$", p) for p in staged), staged
    writer.commit()
    final = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert final == sorted(shard_file(sub, "00000") for sub in ("shards", "ledger", "stats", "_done"))


def test_on_an_object_store_the_old_marker_goes_first_and_comes_back_last(tmp_path):
    url = f"memory://capfilt-test-{tmp_path.name}"
    folder = OutputFolder(url)
    folder.mark_complete("00000")
    writer = ShardWriter(url, "00000")
    assert not folder.is_complete("00000")  # never vouching for files being rewritten in place
    writer.add(_rows())
    writer.commit()
    assert folder.is_complete("00000") and folder.files("shards") == ["00000.tar"]  # final names, no temporaries


def test_the_names_table_covers_the_lock_and_the_probe():
    assert BOOKKEEPING.fullmatch(LOCK_FILE) and BOOKKEEPING.fullmatch(tmp_name(LOCK_FILE))
    assert BOOKKEEPING.fullmatch(probe_name()) and BOOKKEEPING.fullmatch(tmp_name("run.json"))
    assert not BOOKKEEPING.fullmatch("notes.txt") and not BOOKKEEPING.fullmatch(tmp_name("notes.txt"))


# The modules that write, read or judge an output: none restates a name io/names.py declares.
OUTPUT_MODULES = [
    *sorted((CAPFILT / "io").glob("*.py")),
    CAPFILT / "dedup.py",
    CAPFILT / "pipeline.py",
    CAPFILT / "rethreshold.py",
    CAPFILT / "runners" / "worker.py",
    CAPFILT / "runners" / "ray" / "cluster.py",
]
OWN_NAMES = {".done", "run.lock", ".capfilt-probe-", "sizes.json", "duplicates.parquet", ".tmp-", "_done", "run.json"}


@pytest.mark.parametrize("path", OUTPUT_MODULES, ids=lambda p: p.relative_to(CAPFILT).as_posix())
def test_no_output_module_restates_capfilts_names(path):
    if path.name == "names.py":
        return
    literals = {
        node.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    code = {s for s in literals if "\n" not in s}  # (docstrings may name them)
    restated = code & (OWN_NAMES | {OWN_SUFFIXES["_done"]})
    restated |= {s for s in code if re.fullmatch(r"[^ ]*\.(done|lock)|\.capfilt-probe-.*|.*\.tmp-", s)}
    assert not restated, f"{path.name} restates {restated}: import them from capfilt.io.names"


def test_layout_render_and_writer_import_each_other_at_module_level_only():
    """No lazy import between the output modules: each one's dependencies are its module imports."""
    for name in ("names", "folder", "output", "shard_writer", "embeddings", "run_dir", "run_read", "run_lock"):
        tree = ast.parse((CAPFILT / "io" / f"{name}.py").read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            lazy = [
                n.module
                for n in ast.walk(fn)
                if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("capfilt.io.")
            ]
            assert not lazy, f"io/{name}.py {fn.name} imports {lazy} lazily"
