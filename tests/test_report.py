"""The HTML report: images with kept (green) and rejected (red) texts, histograms, reasons."""

import json
import shutil
import subprocess

import pytest

from capfilt.config import load_config
from capfilt.groundtruth import labelled_ledger, quality
from capfilt.pipeline import run
from capfilt.report import build_report, histogram_svg
from capfilt.synthetic import main_synth
from thresholds import split_thresholds


@pytest.fixture(scope="module")
def small_run(root, tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    main_synth(base / "data", shards=1, per_shard=16, broken=True, seed=2)
    config = load_config(root / "pipelines/demo/tiny.yaml", split_thresholds())
    config = config.model_copy(update={"input": [str(base / "data" / "*.tar")], "output": str(base / "run")})
    assert run(config, progress=False).ok
    return base / "run"


def test_report_shows_images_and_kept_and_rejected_texts(small_run):
    page = build_report(small_run, n_samples=12).read_text()
    assert page.count("data:image/jpeg;base64,") >= 8
    assert 'class="t kept' in page and 'class="t rejected' in page
    assert "itm_below_threshold" in page and "<svg" in page
    assert "Rejections by reason" in page


def test_histogram_counts_every_value_and_marks_thresholds():
    svg = histogram_svg("x", {"web": [0.1, 0.2, 0.2], "synthetic": [0.9]}, bins=4)
    assert svg.count("<rect") == 8 and "<line" not in svg
    # Each source scaled to its own tallest bin: one synthetic value is as tall as two web ones.
    assert svg.count('height="130.0"') == 2
    marked = histogram_svg("x", {"web": [0.1, 0.2], "synthetic": [0.9]}, bins=4,
                           thresholds={"web": 0.15, "synthetic": None})
    assert marked.count("<line") == 1 and "web \u2265 0.150" in marked


def test_report_draws_the_run_thresholds(small_run):
    page = build_report(small_run, n_samples=2).read_text()
    threshold = json.loads((small_run / "run.json").read_text())["config"]["decide"]["web"]["itm"]
    assert f"web \u2265 {threshold:.3f}" in page


def test_ground_truth_quality_of_a_run(small_run):
    rows = labelled_ledger(small_run)
    q = quality(rows)
    assert q["web"]["texts"] > 0 and 0 <= q["web"]["noise_before"] <= 1
    # Random-weight captioners do not write true captions.
    assert q["synthetic"]["precision"] in (0.0, None)


def test_calibrate_cli_chooses_the_score_from_labels(small_run, capsys):
    from capfilt.cli import main

    assert main(["calibrate", str(small_run), "--score", "auto"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.split("# paste")[0])
    assert result["score"] in ("itm", "itc", "clip") and 0 <= result["web"]["precision"] <= 1
    assert f"web: {{{result['score']}: {result['web']['threshold']:.4f}}}" in printed


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed")
def test_report_renders_in_headless_chromium(small_run, tmp_path):
    page = build_report(small_run, tmp_path / "report.html")
    shot = tmp_path / "report.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20)
    green = sum(n for n, (r, g, b) in colours if (r, g, b) == (0xDF, 0xF5, 0xE1))
    red = sum(n for n, (r, g, b) in colours if (r, g, b) == (0xFD, 0xE2, 0xE2))
    assert green > 0 and red > 0  # kept and rejected texts are visibly marked
