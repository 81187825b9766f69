"""The prepared GPU benchmark runs end to end: its CPU dry run on the tiny presets (issue 13).

No timing is asserted (numbers on a CPU say nothing about a GPU); the run must complete every
measurement, agree with the stock outputs, account for every sample, and write its section
without touching the rest of the benchmarks file.
"""

import json
import os

import pytest

from benchmarks import gpu, gpu_report


@pytest.mark.slow
def test_gpu_benchmark_dry_run_on_cpu(tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nCPU numbers stay.\n")
    args = [
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--size",
        "tiny",
        "--images",
        "4",
        "--shards",
        "2",
        "--new-tokens",
        "6",
        "--repeats",
        "1",
        "--out",
        str(out),
        "--json",
        str(tmp_path / "gpu.json"),
    ]
    before = os.environ.get("CAPFILT_MODELS_DIR")
    assert gpu.main(args) == 0
    assert os.environ.get("CAPFILT_MODELS_DIR") == before  # later tests still find the presets
    res = json.loads((tmp_path / "gpu.json").read_text())["results"]
    assert [r["what"].split(",")[0] for r in res["rows"]] == ["captioner K=4", "captioner K=40", "filter", "CLIP"]
    assert "same length: True" in res["rows"][0]["check"] and "same length: True" in res["rows"][1]["check"]
    for row in res["rows"][2:4]:  # the filter (itm) and clip rows
        assert float(row["check"].split()[-1]) < 1e-4, row  # fp32: the same scores as stock
    local, ray = res["end_to_end"]["local"], res["end_to_end"]["ray"]
    assert local["input"] == 8
    assert ray["summary"]["input"] == 8 == sum(ray["summary"][k] for k in ("kept", "rejected", "failed"))
    assert set(res["vit"]) == {"captioner ViT", "filter ViT", "CLIP image tower"}
    assert all(v["gflop_per_image"] > 0 for v in res["vit"].values())
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nCPU numbers stay.") and text.count(gpu_report.BEGIN) == 1
    # A second run replaces its section, never appends another.
    gpu_report.write_section(out, f"{gpu_report.BEGIN}\nnew\n{gpu_report.END}")
    assert out.read_text().count(gpu_report.BEGIN) == 1 and "\nnew\n" in out.read_text()
    assert gpu_report.gpu_section_of(out) == f"{gpu_report.BEGIN}\nnew\n{gpu_report.END}"
