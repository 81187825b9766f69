"""Configs fail with messages that name the key; every command has --help; recipes validate."""

import subprocess
import sys
from pathlib import Path

import pytest

from capfilt.cli import main
from capfilt.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted((ROOT / "pipelines").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    if recipe.parent.name == "train":
        from capfilt.train.config import TASKS, load_train_config

        task = next(t for t in TASKS if recipe.stem.endswith(t))
        assert load_train_config(recipe, task, output="x").task == task
    elif recipe.stem.startswith("loop"):
        from capfilt.loop import load_loop_config

        assert load_loop_config(recipe).max_rounds >= 1
    else:
        config = load_config(recipe)
        assert config.captioner or config.filter or config.clip


def test_unknown_and_bad_keys_are_named():
    with pytest.raises(ConfigError) as err:
        parse_config({"captioner": {"model": "tiny-blip", "top_pp": 0.9, "top_p": 1.5}, "bogus": 1})
    msg = str(err.value)
    assert "captioner.top_pp: unknown key" in msg
    assert "captioner.top_p:" in msg
    assert "bogus: unknown key" in msg


def test_thresholds_need_their_model():
    with pytest.raises(ConfigError, match="decide.web.clip is set but no `clip` model"):
        parse_config({"filter": {"model": "tiny-blip"}, "decide": {"web": {"clip": 0.2}}})


def test_set_overrides_and_fingerprint(tmp_path):
    base = load_config(ROOT / "pipelines/demo/tiny.yaml")
    same = load_config(ROOT / "pipelines/demo/tiny.yaml", ["batch_size=3", "device=cuda"])
    other = load_config(ROOT / "pipelines/demo/tiny.yaml", ["captioner.top_p=0.5"])
    assert same.batch_size == 3
    assert base.fingerprint() == same.fingerprint()  # batch size and device do not change outputs
    assert base.fingerprint() != other.fingerprint()


def test_cli_config_error_exits_2_and_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("captioner:\n  model: tiny-blip\n  temprature: 0.7\n")
    assert main(["run", str(bad), "--input", "x.tar", "--output", str(tmp_path / "o")]) == 2
    assert "captioner.temprature: unknown key" in capsys.readouterr().err


def test_cli_missing_input_is_a_clear_error(tmp_path, capsys):
    code = main(["run", str(ROOT / "pipelines/demo/tiny.yaml"), "--input", str(tmp_path / "nope-{0..2}.tar"),
                 "--output", str(tmp_path / "o"), "--quiet"])
    assert code == 2
    assert "nope-0.tar" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["run"], ["rethreshold"], ["synth"], ["models"], ["report"], ["calibrate"], ["loop"], ["train"], ["eval"]])
def test_every_command_has_help(command):
    out = subprocess.run([sys.executable, "-m", "capfilt.cli", *command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: capfilt" in out.stdout
