"""The Python API (`capfilt.run`, `capfilt.bootstrap`): the commands' config resolution and code
path, as functions, on the tiny presets."""

import json
from pathlib import Path

import pytest
import torch

import capfilt
from capfilt.api import loop_config, run_config
from capfilt.cli import parser
from capfilt.cli.run import run_options
from capfilt.config import ConfigError, RunConfig, load_config
from capfilt.io.run_dir import ResumeRefused
from capfilt.loop import load_loop_config
from capfilt.synthetic import main_synth

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "pipelines" / "demo" / "tiny.yaml"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    main_synth(out, shards=2, per_shard=6, broken=True, seed=4)
    return sorted(str(p) for p in out.glob("*.tar"))


def test_run_config_resolves_the_command_lines_options(corpus, tmp_path):
    """`capfilt run`'s options reach `run_config` (the one resolution) and win over the recipe:
    --ray-address joins that cluster and implies the Ray runner; --set applies before them."""
    argv = ["run", str(RECIPE), "--input", *corpus, "--output", str(tmp_path / "out"), "--set", "decide.web.itm=0.3"]
    argv += ["--set", "batch_size=4", "--set", "device=cuda", "--ray-address", "auto", "--device", "cpu"]
    args = parser().parse_args(argv)
    config = run_config(args.config, **run_options(args))
    assert config.input == corpus and config.output == str(tmp_path / "out")
    assert config.decide.web.itm == 0.3 and config.batch_size == 4 and config.device == "cpu"
    assert config.runner == "ray" and config.ray.address == "auto"
    plain = run_config(RECIPE, input=corpus[0])
    assert plain.input == [corpus[0]] and plain.runner == "local" and plain.ray.address is None
    assert plain.decide.web.itm == load_config(RECIPE).decide.web.itm
    # A mapping or a config object is a recipe too; the options still win over it.
    as_dict = run_config(plain.model_dump(), output="elsewhere")
    assert as_dict == run_config(plain, output="elsewhere") and as_dict.output == "elsewhere"
    with pytest.raises(ConfigError, match="decide.web.itn: unknown key"):
        run_config(RECIPE, overrides=["decide.web.itn=0.3"])


def test_run_returns_the_summary_and_resumes(corpus, tmp_path):
    out = tmp_path / "out"
    summary = capfilt.run(RECIPE, input=corpus, output=out, progress=False)
    assert summary["ok"] and summary["shards_done"] == summary["shards"] == 2
    assert summary["input"] == summary["kept"] + summary["rejected"] + summary["failed"] > 0
    assert summary["failed"] > 0  # the broken samples are counted, not fatal
    on_disk = json.loads((out / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k not in ("ok", "seconds", "stage_seconds")} == on_disk
    stamp = (out / "_done" / f"{Path(corpus[0]).stem}.done").stat().st_mtime_ns
    again = capfilt.run(RECIPE, input=corpus, output=out, progress=False)  # resume: nothing to redo
    assert again["kept"] == summary["kept"]
    assert (out / "_done" / f"{Path(corpus[0]).stem}.done").stat().st_mtime_ns == stamp
    with pytest.raises(ResumeRefused):
        capfilt.run(RECIPE, input=corpus, output=out, overrides=["decide.web.itm=0.2"], progress=False)
    fresh = capfilt.run(RECIPE, input=corpus, output=out, overrides=["decide.web.itm=0.2"], fresh=True, progress=False)
    assert fresh["ok"] and fresh["input"] == summary["input"]


def test_bootstrap_resolves_as_capfilt_loop_and_runs(tmp_path):
    recipe = ROOT / "pipelines" / "demo" / "loop.yaml"
    sets = ["max_rounds=2", "pretrain.steps=5"]
    assert loop_config(recipe, output=tmp_path / "x", overrides=sets) == load_loop_config(
        recipe, [*sets, f"output={tmp_path / 'x'}"]
    )
    with pytest.raises(ConfigError, match="pretrain.stepz: unknown key"):
        loop_config(recipe, overrides=["pretrain.stepz=5"])
    # `capfilt loop --output 2024` resolves here too: the path as given, not YAML's int 2024
    assert str(loop_config(recipe, output="2024").output) == "2024"

    train = {"steps": 2, "batch_size": 8, "save_every": 2, "log_every": 1, "med": {"momentum": False, "queue_size": 0}}
    tiny = {
        "preset": "tiny-blip",
        "world": {"web": 16, "clean": 16, "test": 10, "per_shard": 16, "image_size": 32},
        "eval_k": 4,
        "min_improvement": 0,
        "pretrain": train,
        "finetune_captioner": train,
        "finetune_filter": train,
        "capfilt": {"captioner": {"num_captions": 1, "min_new_tokens": 1, "max_new_tokens": 4}},
    }
    state = capfilt.bootstrap(tiny, output=tmp_path / "loop")
    assert [(r["round"], r["ablation"]) for r in state["rounds"]] == [(0, "-"), (1, "captioner_filter")]
    assert state == json.loads((tmp_path / "loop" / "state.json").read_text())
    assert RunConfig.model_validate(
        json.loads((tmp_path / "loop" / "round-1" / "capfilt-captioner_filter" / "run.json").read_text())["config"]
    )
