"""Honest derived runs and upstream counts (issue 14, item 6), on real files.

* `rethreshold` refuses a source run with unfinished shards unless --partial, and a partial derived
  run says so in its summary;
* samples img2dataset attempted but did not write (its parquet sidecar / `_stats.json`) are reported
  as `upstream_failed` per shard and per run, beside capfilt's own `input = kept + rejected + failed`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from thresholds import split_thresholds

import capfilt.synthetic as syn
from capfilt.cli import main as cli_main
from capfilt.io.upstream import MAX_REASON_CHARS, MISSING_FROM_TAR, MISSING_REASON, read_upstream, reason_of
from capfilt.pipeline import run
from capfilt.rethreshold import IncompleteRun, rethreshold
from capfilt.summary import format_summary

PER_SHARD, UPSTREAM = 10, 5


def stats(out: Path, shard: str) -> dict:
    return json.loads((out / "stats" / f"{shard}.json").read_text())


def expected_by_reason(n: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in range(n):
        status, message = syn.UPSTREAM_FAILURES[i % len(syn.UPSTREAM_FAILURES)]
        out[reason_of(message, status)] = out.get(reason_of(message, status), 0) + 1
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three img2dataset-style shards with UPSTREAM failed downloads each:
    00000 keeps its sidecar (and _stats.json), 00001 only its _stats.json, 00002 neither."""
    data = tmp_path_factory.mktemp("i2d")
    examples = syn.make_split("web", 3 * PER_SHARD, seed=4, noise_share=0.3, image_size=48)
    syn.write_shards(data, examples, per_shard=PER_SHARD, upstream_failed=UPSTREAM)
    (data / "00001.parquet").unlink()
    (data / "00002.parquet").unlink()
    (data / "00002_stats.json").unlink()
    return data


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("run")
    result = run(tiny(sorted(corpus.glob("*.tar")), out), progress=False)
    assert result.ok
    return out, result


# --------------------------------------------------------------------------- upstream counts


def test_sidecar_failures_are_upstream_not_input(corpus, finished):
    out, _ = finished
    s = stats(out, "00000")
    assert s["input"] == s["kept"] + s["rejected"] + s["failed"] == PER_SHARD  # capfilt's own, unchanged
    assert s["upstream_failed"] == UPSTREAM
    assert s["upstream_failed_by_reason"] == expected_by_reason(UPSTREAM)
    assert s["upstream_failed_by_status"] == {"failed_to_download": 4, "failed_to_resize": 1}
    assert all(len(r) <= MAX_REASON_CHARS for r in s["upstream_failed_by_reason"])
    assert any(r.endswith("...") for r in s["upstream_failed_by_reason"])  # the long SSL message, cut
    # input + upstream_failed = what img2dataset attempted = the sidecar's rows
    assert s["input"] + s["upstream_failed"] == pq.read_metadata(corpus / "00000.parquet").num_rows
    assert s["input"] + s["upstream_failed"] == json.loads((corpus / "00000_stats.json").read_text())["count"]


def test_stats_json_alone_gives_the_same_counts_and_no_files_give_zero(finished):
    out, _ = finished
    with_sidecar, stats_only, bare = (stats(out, s) for s in ("00000", "00001", "00002"))
    for key in ("upstream_failed", "upstream_failed_by_reason", "upstream_failed_by_status"):
        assert stats_only[key] == with_sidecar[key]
    assert bare["upstream_failed"] == 0 and bare["upstream_failed_by_reason"] == {}
    assert bare["input"] == bare["kept"] + bare["rejected"] + bare["failed"] == PER_SHARD


def test_summary_totals_upstream_beside_the_accounting(finished):
    out, result = finished
    summary = json.loads((out / "summary.json").read_text())
    assert summary == result.summary
    assert summary["input"] == summary["kept"] + summary["rejected"] + summary["failed"] == 3 * PER_SHARD
    assert summary["upstream_failed"] == 2 * UPSTREAM
    assert summary["upstream_failed_by_reason"] == {r: 2 * n for r, n in expected_by_reason(UPSTREAM).items()}
    assert summary["upstream_failed_by_status"] == {"failed_to_download": 8, "failed_to_resize": 2}
    assert "partial" not in summary  # a run, not a derived run
    text = format_summary(summary)
    assert f"input + upstream = {3 * PER_SHARD + 2 * UPSTREAM}" in text and "HTTP Error 404" in text


def test_reader_is_tolerant(tmp_path, caplog):
    tar = tmp_path / "00007.tar"
    tar.write_bytes(b"")
    # No files at all.
    assert read_upstream(str(tar))["upstream_failed"] == 0
    # A sidecar without a status column (not img2dataset's) and no stats: nothing.
    pq.write_table(pa.table({"key": ["a"], "caption": ["x"]}), tmp_path / "00007.parquet")
    assert read_upstream(str(tar))["upstream_failed"] == 0
    # An unreadable sidecar: a warning, then the _stats.json.
    (tmp_path / "00007.parquet").write_bytes(b"not parquet")
    (tmp_path / "00007_stats.json").write_text(
        json.dumps(
            {
                "count": 9,
                "successes": 6,
                "failed_to_download": 3,
                "failed_to_resize": 0,
                "status_dict": {"success": 6, "HTTP Error 403: Forbidden": 3},
            }
        )
    )
    counts = read_upstream(str(tar))
    assert counts["upstream_failed"] == 3 and counts["upstream_failed_by_reason"] == {"HTTP Error 403: Forbidden": 3}
    assert "unreadable img2dataset file" in caplog.text
    # status_dict that does not add up (img2dataset caps it): counted by status only.
    (tmp_path / "00007_stats.json").write_text(
        json.dumps({"count": 9, "successes": 6, "failed_to_download": 2, "failed_to_resize": 1, "status_dict": {}})
    )
    counts = read_upstream(str(tar))
    assert counts["upstream_failed"] == 3
    assert counts["upstream_failed_by_reason"] == {"failed_to_download": 2, "failed_to_resize": 1}
    # Garbage stats JSON: nothing, no exception.
    (tmp_path / "00007_stats.json").write_text("[1, 2")
    assert read_upstream(str(tar))["upstream_failed"] == 0


def test_reader_reads_fsspec_urls_and_skips_keys_the_tar_holds():
    fs = fsspec.filesystem("memory")
    table = pa.table(
        {
            "key": ["k0", "k1", "k2", "k3", "k4"],
            "status": ["success", "failed_to_download", "failed_to_resize", None, "failed_to_download"],
            "error_message": [None, "x" * 300, "", None, "timed out"],
        }
    )
    with fs.open("memory://i2d-up/00003.parquet", "wb") as f:
        pq.write_table(table, f)
    counts = read_upstream("memory://i2d-up/00003.tar")
    assert counts["upstream_failed"] == 3  # a null status says nothing
    assert counts["upstream_failed_by_reason"] == {
        "x" * (MAX_REASON_CHARS - 3) + "...": 1,
        "failed_to_resize": 1,
        "timed out": 1,
    }
    # A failed row whose key is in the tar was capfilt input after all: not upstream.
    assert read_upstream("memory://i2d-up/00003.tar", {"k0", "k4"})["upstream_failed"] == 2
    fs.rm("memory://i2d-up", recursive=True)


def test_success_rows_the_tar_does_not_hold_are_counted_upstream():
    """issue 22 item 13: a sidecar row saying ``success`` whose key the tar lacks is in no count
    unless it is upstream's (``missing_from_tar``); only when the tar's keys are known."""
    fs = fsspec.filesystem("memory")
    table = pa.table(
        {"key": ["k0", "k1", "k2", "k3"], "status": ["success", "success", "failed_to_download", "success"]}
    )
    with fs.open("memory://i2d-miss/00004.parquet", "wb") as f:
        pq.write_table(table, f)
    counts = read_upstream("memory://i2d-miss/00004.tar", {"k0"})
    assert counts["upstream_failed"] == 3
    assert counts["upstream_failed_by_status"] == {"failed_to_download": 1, MISSING_FROM_TAR: 2}
    assert counts["upstream_failed_by_reason"][MISSING_REASON] == 2
    assert read_upstream("memory://i2d-miss/00004.tar")["upstream_failed"] == 1  # the tar's keys not given
    fs.rm("memory://i2d-miss", recursive=True)
    # _stats.json alone: successes beyond the keys the tar held.
    fs.pipe_file("memory://i2d-miss2/00005_stats.json", json.dumps({"count": 10, "successes": 9}).encode())
    counts = read_upstream("memory://i2d-miss2/00005.tar", {f"k{i}" for i in range(6)})
    assert counts["upstream_failed_by_status"] == {"failed": 1, MISSING_FROM_TAR: 3}
    fs.rm("memory://i2d-miss2", recursive=True)


def test_every_sidecar_row_lands_in_one_count(corpus, tmp_path, tiny):
    """3 of a shard's written samples are missing from its tar: input + upstream_failed is still the
    sidecar's row count, the 3 under missing_from_tar."""
    import tarfile

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(corpus / "00000.parquet", data / "00000.parquet")
    side = pq.read_table(data / "00000.parquet").to_pylist()
    dropped = [r["key"] for r in side if r["status"] == "success"][:3]
    with tarfile.open(corpus / "00000.tar") as src, tarfile.open(data / "00000.tar", "w") as dst:
        for m in src:
            if m.name.split(".", 1)[0] not in dropped:
                dst.addfile(m, src.extractfile(m))
    assert run(tiny([data / "00000.tar"], tmp_path / "out"), progress=False).ok
    st = stats(tmp_path / "out", "00000")
    assert st["input"] == PER_SHARD - 3
    assert st["upstream_failed_by_status"][MISSING_FROM_TAR] == 3
    assert st["input"] + st["upstream_failed"] == len(side)


# --------------------------------------------------------------------------- rethreshold of unfinished runs


@pytest.fixture
def unfinished(finished, tmp_path):
    """A copy of the finished run whose shard 00001 lost its completion marker."""
    out, _ = finished
    copy = tmp_path / "unfinished"
    shutil.copytree(out, copy)
    (copy / "_done" / "00001.done").unlink()
    return copy


def test_rethreshold_refuses_an_unfinished_run(unfinished, tmp_path, capsys):
    target = tmp_path / "re"
    with pytest.raises(IncompleteRun, match=r"1 of 3 shards are not finished \(00001\).*--partial"):
        rethreshold(str(unfinished), str(target))
    assert not target.exists()  # refused before anything was written
    assert cli_main(["rethreshold", str(unfinished), "--output", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 of 3" in err and "00001" in err and "--partial" in err


def test_rethreshold_partial_covers_the_finished_shards_and_says_so(finished, unfinished, tmp_path, capsys):
    source, _ = finished
    target = tmp_path / "re"
    assert cli_main(["rethreshold", str(unfinished), "--output", str(target), "--partial"]) == 0
    assert "PARTIAL: 1 shards of the source run were not finished" in capsys.readouterr().out
    summary = json.loads((target / "summary.json").read_text())
    assert summary["partial"] is True and summary["missing_source_shards"] == ["00001"]
    assert summary["shards"] == summary["shards_done"] == 2
    assert sorted(p.stem for p in (target / "_done").glob("*.done")) == ["00000", "00002"]
    assert summary["input"] == stats(source, "00000")["input"] + stats(source, "00002")["input"]
    assert summary["upstream_failed"] == UPSTREAM  # 00000's; 00001 is not covered, 00002 has no files
    assert stats(target, "00000")["upstream_failed_by_reason"] == stats(source, "00000")["upstream_failed_by_reason"]


def test_rethreshold_of_a_finished_run_is_not_partial(finished, tmp_path):
    source, result = finished
    summary = rethreshold(str(source), str(tmp_path / "re"), overrides=split_thresholds(web=0.8))
    assert summary["partial"] is False and summary["missing_source_shards"] == []
    assert summary["shards"] == summary["shards_done"] == 3
    assert summary["input"] == result.summary["input"]
    assert summary["upstream_failed"] == result.summary["upstream_failed"] == 2 * UPSTREAM
    # --partial on a finished run changes nothing.
    again = rethreshold(str(source), str(tmp_path / "re2"), overrides=split_thresholds(web=0.8), partial=True)
    assert again["partial"] is False and again["kept"] == summary["kept"]
