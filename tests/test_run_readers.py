"""Commands that read a run (report, calibrate, rethreshold) read it wherever `capfilt run` wrote
it and from any directory: a rethreshold output reports, relative inputs are recorded absolutely,
an S3 run (the moto server of tests/s3server.py) is read through fsspec, and a derived run keeps
its source's failure details."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from s3server import BUCKET
from thresholds import split_thresholds

from capfilt.api import run_config
from capfilt.cli import main
from capfilt.config import load_config
from capfilt.pipeline import run
from capfilt.synthetic import main_synth

RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "demo" / "tiny.yaml"
S3_RUN = f"s3://{BUCKET}/readers/run"


@pytest.fixture(scope="module")
def relative_run(tmp_path_factory):
    """A run started as a user would: from the data's parent directory, `--input i2d/*.tar`."""
    base = tmp_path_factory.mktemp("rel")
    main_synth(base / "i2d", shards=1, per_shard=3, broken=True, seed=4)
    here = os.getcwd()
    os.chdir(base)
    try:
        args = ["run", str(RECIPE), "--input", "i2d/*.tar", "--output", "out", "--quiet"]
        for s in split_thresholds():
            args += ["--set", s]
        assert main(args) == 0
    finally:
        os.chdir(here)
    return base


def test_run_json_records_local_inputs_absolutely_and_urls_as_given(relative_run, tmp_path):
    record = json.loads((relative_run / "out" / "run.json").read_text())
    assert record["config"]["input"] == [str(relative_run / "i2d" / "*.tar")]
    config = run_config(RECIPE, input=["s3://b/x/{0..3}.tar", "data/a.tar"], overrides=split_thresholds())
    assert config.input == ["s3://b/x/{0..3}.tar", os.path.abspath("data/a.tar")]


def test_rethreshold_calibrate_and_report_work_from_another_directory(relative_run, tmp_path, monkeypatch, capsys):
    """Issue 22 items 1 and 2: from elsewhere the inputs are found, and the report of a
    rethreshold output (whose run.json names its source as a path string) is written."""
    monkeypatch.chdir(tmp_path)
    run_dir = relative_run / "out"
    assert main(["rethreshold", str(run_dir), "--output", "derived", "--set", "decide.web.itm=0.2"]) == 0
    assert main(["calibrate", str(run_dir), "--keep-rate", "web=0.5"]) == 0
    capsys.readouterr()
    assert main(["report", "derived", "--show", "rejected,web-kept", "--no-date"]) == 0
    page = (tmp_path / "derived" / "report.html").read_text()
    assert "derived from" in page and str(run_dir) in page
    assert "capfilt rethreshold: no model ran" in page
    assert "<img " in page  # the inputs were found from here: cards have their images
    assert json.loads((tmp_path / "derived" / "run.json").read_text())["models"]["rethreshold_of"] == str(run_dir)


def test_a_report_that_cannot_find_the_inputs_says_so_once(relative_run, tmp_path, caplog):
    moved = tmp_path / "copy"
    shutil.copytree(relative_run, moved)
    (moved / "out" / "report.html").unlink(missing_ok=True)
    record = json.loads((moved / "out" / "run.json").read_text())
    record["config"]["input"] = [str(tmp_path / "gone" / "*.tar")]
    (moved / "out" / "run.json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="capfilt"):
        assert main(["report", str(moved / "out"), "--show", "rejected,web-kept,random", "--no-date"]) == 0
    warnings = [r for r in caplog.records if "could not be read from the run's input shards" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "gone" in warnings[0].getMessage()


def test_rethreshold_keeps_the_original_failure_details(relative_run, tmp_path):
    """Issue 22 item 17: the derived stats carry each failure's detail, not a placeholder."""
    from capfilt.rethreshold import rethreshold

    source = relative_run / "out"
    rethreshold(str(source), str(tmp_path / "d"), overrides=["decide.web.itm=0.3"])
    before = json.loads(next((source / "stats").glob("*.json")).read_text())["failure_examples"]
    after = json.loads(next((tmp_path / "d" / "stats").glob("*.json")).read_text())["failure_examples"]
    assert before and after == before
    assert not any("failed in the original run" in v for v in after.values())


# --------------------------------------------------------------------------- a run on S3


@pytest.fixture(scope="module")
def s3_run(s3, tmp_path_factory):
    data = tmp_path_factory.mktemp("s3readers")
    main_synth(data, shards=1, per_shard=3, broken=True, seed=6)
    for p in sorted(data.glob("*.tar")):
        s3.put_file(str(p), f"{BUCKET}/readers/data/{p.name}")
    config = load_config(RECIPE, split_thresholds())
    config = config.model_copy(update={"input": [f"s3://{BUCKET}/readers/data/*.tar"], "output": S3_RUN})
    assert run(config, progress=False).ok
    return S3_RUN


def test_report_on_an_s3_run(s3_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["report", s3_run, "--show", "random", "--no-date"]) == 0
    page = (tmp_path / "run-report.html").read_text()
    assert s3_run in page and "<img " in page and "Rejections and failures by reason" in page


def test_calibrate_on_an_s3_run(s3_run, capsys):
    assert main(["calibrate", s3_run, "--keep-rate", "web=0.5", "synthetic=0.5"]) == 0
    out = capsys.readouterr().out
    assert '"web"' in out and "decide:" in out


def test_rethreshold_of_an_s3_run(s3, s3_run, tmp_path):
    assert main(["rethreshold", s3_run, "--output", str(tmp_path / "d"), "--set", "decide.web.itm=0.3"]) == 0
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    source = json.loads(s3.cat_file(f"{S3_RUN[5:]}/summary.json"))
    assert summary["input"] == source["input"] and summary["shards_done"] == 1
    assert json.loads((tmp_path / "d" / "run.json").read_text())["models"]["rethreshold_of"] == s3_run
