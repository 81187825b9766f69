"""The bootstrap loop end to end on a tiny world: rounds, ground-truth quality, resume."""

import json

import pytest

from capfilt.loop import format_quality, format_rounds, load_loop_config, run_loop
from capfilt.report import build_report

TINY = """
seed: 0
world: {web: 160, clean: 60, test: 40, per_shard: 80, image_size: 48}
pretrain: {steps: 12, batch_size: 16, log_every: 6, save_every: 6, optim: {lr: 0.001}, med: {queue_size: 0, momentum: false}}
finetune_captioner: {steps: 6, batch_size: 16, save_every: 6, optim: {lr: 0.001}}
finetune_filter: {steps: 6, batch_size: 16, save_every: 6, optim: {lr: 0.001}, med: {queue_size: 0, momentum: false}}
capfilt: {decide: {web: {itm: 0.4}, synthetic: {itm: 0.4}}, captioner: {num_captions: 2, max_new_tokens: 8}}
calibration: {samples: 20, score: auto}
min_improvement: 0
"""


@pytest.mark.slow
def test_loop_runs_rounds_and_resumes_without_redoing_work(tmp_path, monkeypatch):
    (tmp_path / "loop.yaml").write_text(TINY)
    monkeypatch.chdir(tmp_path)  # a relative --output, as `make demo` passes
    config = load_loop_config(tmp_path / "loop.yaml", ["output=out"])
    state = run_loop(config)
    rounds = {(r["round"], r["ablation"]): r for r in state["rounds"]}
    assert set(rounds) == {(0, "-"), (1, "captioner_filter")}
    r1 = rounds[(1, "captioner_filter")]
    assert r1["capfilt_input"] == 160
    q = r1["quality"]
    assert q["web"]["texts"] == 160 and q["web"]["noise_before"] == pytest.approx(0.4)
    assert q["synthetic"]["texts"] == 320
    assert "noise before" in format_quality(r1) and "bootstrapped" in format_rounds(state)
    # The round's CapFilt ran under the thresholds calibrated on the labelled split, on the chosen score.
    score, other = r1["calibration_score"], {"itm": "itc", "itc": "itm"}[r1["calibration_score"]]
    run_config = json.loads((tmp_path / "out" / "round-1" / "capfilt-captioner_filter" / "run.json").read_text())["config"]
    decide = run_config["decide"]
    for source in ("web", "synthetic"):
        assert decide[source][score] == pytest.approx(r1["calibration"][source]["threshold"])
        assert decide[source][other] is None
    assert decide["rank_by"] == score
    assert f"{score.upper()} threshold web" in format_quality(r1)
    # The report reads the input shards back, from wherever it is run.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert "data:image/jpeg;base64," in build_report(tmp_path / "out", n_samples=4).read_text()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    stamp = (out / "round-1" / "pretrain-captioner_filter" / "outputs.json").stat().st_mtime_ns
    again = run_loop(config)  # resume: every step is complete, nothing is retrained
    assert again["rounds"] == json.loads((out / "state.json").read_text())["rounds"] == state["rounds"]
    assert (out / "round-1" / "pretrain-captioner_filter" / "outputs.json").stat().st_mtime_ns == stamp
