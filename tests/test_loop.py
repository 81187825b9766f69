"""The bootstrap loop end to end on a tiny world: rounds, ground-truth quality, resume."""

import json
import sys
import types
from pathlib import Path

import pytest

from capfilt.config import ConfigError
from capfilt.loop import (
    capfilt_step_config,
    format_quality,
    format_rounds,
    load_loop_config,
    run_loop,
    train_step,
    train_step_config,
)
from capfilt.report import build_report

TINY = """
seed: 0
preset: tiny-blip
world: {web: 160, clean: 60, test: 40, per_shard: 80, image_size: 48}
eval_k: 16
parallel_finetune: true
pretrain: {steps: 12, batch_size: 16, log_every: 6, save_every: 6, optim: {lr: 0.001},
  med: {queue_size: 0, momentum: false}}
finetune_captioner: {steps: 6, batch_size: 16, save_every: 6, optim: {lr: 0.001}}
finetune_filter: {steps: 6, batch_size: 16, save_every: 6, optim: {lr: 0.001}, med: {queue_size: 0, momentum: false}}
capfilt: {decode: {max_side: 256}, decide: {web: {itm: 0.4}, synthetic: {itm: 0.4}},
  captioner: {num_captions: 2, min_new_tokens: 3, max_new_tokens: 8}}
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
    run_config = json.loads((tmp_path / "out" / "round-1" / "capfilt-captioner_filter" / "run.json").read_text())[
        "config"
    ]
    decide = run_config["decide"]
    for source in ("web", "synthetic"):
        assert decide[source][score] == pytest.approx(r1["calibration"][source]["threshold"])
        assert decide[source][other] is None
    assert decide["rank_by"] == score
    assert f"{score.upper()} threshold web" in format_quality(r1)
    # The report reads the input shards back, from wherever it is run.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert "data:image/jpeg;base64," in build_report(tmp_path / "out", n_samples=4, show=["random"]).read_text()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    stamp = (out / "round-1" / "pretrain-captioner_filter" / "outputs.json").stat().st_mtime_ns
    again = run_loop(config)  # resume: every step is complete, nothing is retrained
    assert again["rounds"] == json.loads((out / "state.json").read_text())["rounds"] == state["rounds"]
    assert (out / "round-1" / "pretrain-captioner_filter" / "outputs.json").stat().st_mtime_ns == stamp


# ----------------------------------------------------------------- config resolution (no training)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "pipelines" / "demo" / "loop.yaml"
REAL = ROOT / "pipelines" / "loop-blip.yaml"


def test_demo_recipe_holds_its_own_small_settings():
    """The demo's numbers (docs/demo-results.md) come from these settings; they live in the demo
    recipe, not in capfilt/loop/'s code, whose defaults are the real recipe's."""
    cfg = load_loop_config(DEMO)
    assert (cfg.preset, cfg.eval_k, cfg.parallel_finetune) == ("tiny-blip", 16, True)
    steps = {
        task: train_step_config(cfg, task, Path("o"), {"preset": "tiny-blip"}, [{"kind": "coco", "path": "c"}])
        for task in ("pretrain", "finetune-captioner", "finetune-filter")
    }
    assert [steps[t].steps for t in ("pretrain", "finetune-captioner", "finetune-filter")] == [1000, 600, 800]
    assert all(s.device == "auto" and s.batch_size == 32 and s.workers == 1 for s in steps.values())
    run = capfilt_step_config(cfg, Path("o"), ["w.tar"], "cap", "filt")
    assert (run.batch_size, run.device, run.decode.max_side, run.runner) == (32, "auto", 256, "local")
    c = run.captioner
    assert (c.num_captions, c.min_new_tokens, c.max_new_tokens, c.temperature) == (3, 3, 20, 0.7)


def test_defaults_add_nothing_to_a_step_section():
    """A step runs its section as `capfilt train` / `capfilt run` would: the loop adds only output,
    data and models (and Ray settings when asked)."""
    from capfilt.config import RunConfig

    cfg = load_loop_config(REAL, ["capfilt={}"])
    assert (cfg.eval_k, cfg.parallel_finetune, cfg.ray.address) == (256, False, None)
    run = capfilt_step_config(cfg, Path("o"), ["w.tar"], "cap", "filt")
    expected = RunConfig.model_validate(
        {"input": ["w.tar"], "output": "o", "captioner": {"model": "cap"}, "filter": {"model": "filt"}}
    )
    assert run == expected
    with pytest.raises(ConfigError, match="pretrain.steps: Field required"):
        load_loop_config(REAL, ["pretrain={batch_size: 8}"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("pretrain.stpes=3", "pretrain.stpes: unknown key"),
        ("finetune_filter.optim.lr=-1", "finetune_filter.optim.lr: Input should be greater than 0"),
        (
            "finetune_captioner.batch_size=12",
            "finetune_captioner: Value error, batch_size 12 must be a multiple of workers 8",
        ),
        ("capfilt.captioner.num_captins=3", "capfilt.captioner.num_captins: unknown key"),
        ("capfilt.decide.web.itm=2", "capfilt.decide.web.itm: Input should be less than or equal to 1"),
        ("capfilt.input=x.tar", "capfilt.input: set by the loop"),
        ("capfilt.filter.model=x", "capfilt.filter.model: set by the loop"),
        ("pretrain.data=[]", "pretrain.data: set by the loop"),
        ("capfilt.clip={model: tiny-clip}", "capfilt.clip: the loop's CapFilt"),
        ("calibration={samples: 20}", "calibration scores a labelled split of the synthetic world"),
        ("world={web: 20}", "give `data`"),
        ("start_med={}", "start_med needs a captioner and/or a filter"),
        ("retrain_from=preset", "preset: needed"),
    ],
)
def test_every_section_is_checked_at_load(override, message):
    extra = ["runner=ray", "ray.address=auto"] if "multiple of workers" in message else []
    with pytest.raises(ConfigError) as err:
        load_loop_config(REAL, [override, *extra])
    assert message in str(err.value)


def test_runner_ray_runs_capfilt_on_the_ray_runner_and_training_on_ray_train(tmp_path, monkeypatch):
    local = load_loop_config(REAL)
    cluster = load_loop_config(REAL, ["runner=ray", "ray.address=auto", "pretrain.ray={cpus_per_worker: 4}"])
    init, data = local.retrain_init(), [{"kind": "coco", "path": "c"}]
    assert train_step_config(local, "pretrain", Path("o"), init, data).workers == 1
    assert capfilt_step_config(local, Path("o"), ["w"], "c", "f").runner == "local"
    t = train_step_config(cluster, "pretrain", Path("o"), init, data)
    assert (t.workers, t.ray.address, t.ray.use_gpu, t.ray.cpus_per_worker) == (8, "auto", True, 4.0)
    r = capfilt_step_config(cluster, Path("o"), ["w"], "c", "f")
    assert (r.runner, r.ray.address, r.ray.gpus_per_actor, r.ray.max_actors) == ("ray", "auto", 0.5, 8)

    import capfilt.train.loop as train_loop

    calls = []
    ray_train = types.ModuleType("capfilt.runners.ray.train")  # stands in for Ray Train (no Ray started)
    ray_train.train_ray = lambda c, resume: calls.append(("ray", c, resume)) or {"outputs": {}}
    monkeypatch.setitem(sys.modules, "capfilt.runners.ray.train", ray_train)
    monkeypatch.setattr(train_loop, "train", lambda c, **kw: calls.append(("local", c)) or {"outputs": {}})
    train_step(cluster, "finetune-filter", tmp_path / "a", {"med": "m"}, data)
    train_step(local, "finetune-filter", tmp_path / "b", {"med": "m"}, data)
    assert [c[0] for c in calls] == ["ray", "local"]
    assert calls[0][1].workers == 8 and calls[0][2] is True  # resumes a step an interruption left


def test_ray_address_means_what_it_means_in_a_run_recipe():
    """ray.address names the cluster in a loop recipe as in a run recipe (none: start a local
    Ray); `runner` turns Ray on. A recipe where the address alone turned Ray on is refused with
    what to write, not run in this process."""
    init, data = load_loop_config(REAL).retrain_init(), [{"kind": "coco", "path": "c"}]
    local_ray = load_loop_config(REAL, ["runner=ray"])
    run = capfilt_step_config(local_ray, Path("o"), ["w"], "c", "f")
    assert (run.runner, run.ray.address) == ("ray", None)  # as `capfilt run` with runner ray: a local Ray
    t = train_step_config(local_ray, "pretrain", Path("o"), init, data)
    assert t.workers == 8 and t.ray.address is None
    for address, hint in (("auto", "keep ray.address: auto"), ("local", "leave ray.address out")):
        with pytest.raises(
            ConfigError, match=f"ray: address {address} no longer turns Ray on.*runner: ray. and {hint}"
        ):
            load_loop_config(REAL, [f"ray.address={address}"])
    written = load_loop_config(REAL, ["runner=local", "ray.address=auto"])  # runner written: it decides
    assert capfilt_step_config(written, Path("o"), ["w"], "c", "f").runner == "local"


def test_a_failed_loop_writes_no_loop_yaml(tmp_path, monkeypatch):
    """Issue 22 item 11: loop.yaml records a loop that ran; one that failed leaves none."""
    import capfilt.loop.runner as loop  # run_loop looks make_world up here

    (tmp_path / "loop.yaml").write_text(TINY)
    config = load_loop_config(tmp_path / "loop.yaml", [f"output={tmp_path / 'out'}"])

    def world_fails(cfg, out):  # the first step fails, as a full disk or a bad data path would
        raise OSError("no space left on device")

    monkeypatch.setattr(loop, "make_world", world_fails)
    with pytest.raises(OSError):
        run_loop(config)
    assert (tmp_path / "out").is_dir() and not (tmp_path / "out" / "loop.yaml").exists()


def test_the_quality_block_prints_only_what_exists():
    """Issue 22 item 7: on real data (no ground truth) the loop printed the synthetic world's
    block with nothing in it ("web texts 0 noise before –"); it prints the counts it has."""
    empty = {"texts": 0, "noise_before": None, "noise_after": None, "kept": 0, "precision": None}
    empty.update(recall=None, wrong_removed=None, correct_kept=None)
    record = {"round": 1, "ablation": "captioner_filter", "capfilt_input": 50, "capfilt_kept": 31}
    for real in (record, {**record, "quality": {"web": empty, "synthetic": empty, "bootstrapped_texts": 0}}):
        text = format_quality(real)
        assert "kept 31 of 50 samples" in text and "no ground truth" in text
        assert "noise before" not in text and "web texts" not in text
    assert format_quality({"round": 0, "ablation": "-"}) == ""


def test_a_round_without_caption_metrics_prints_a_dash_not_zero():
    from capfilt.loop.formatting import format_rounds

    state = {"rounds": [{"round": 0, "trained_on": "web", "r1": 7.0, "itc_r1": 5.0}]}
    line = format_rounds(state).splitlines()[1]
    assert "0.000" not in line and line.split()[4:6] == ["–", "–"]
