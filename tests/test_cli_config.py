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
    code = main(
        [
            "run",
            str(ROOT / "pipelines/demo/tiny.yaml"),
            "--input",
            str(tmp_path / "nope-{0..2}.tar"),
            "--output",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert code == 2
    assert "nope-0.tar" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["run"],
        ["rethreshold"],
        ["synth"],
        ["models"],
        ["recipes"],
        ["report"],
        ["calibrate"],
        ["loop"],
        ["train"],
        ["eval"],
    ],
)
def test_every_command_has_help(command):
    out = subprocess.run([sys.executable, "-m", "capfilt.cli", *command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: capfilt" in out.stdout


def test_fingerprint_is_unchanged_by_the_output_settings_refactor():
    """Runs written before `output_settings` existed must still resume: same hash as the old formula."""
    import hashlib
    import json

    config = load_config(ROOT / "pipelines/demo/tiny.yaml", ["filter.batch_size=4"])
    # `threads` and `decode_threads` came later (issue 21); a run written before them has neither key.
    old_keys = {"input", "output", "runner", "device", "batch_size", "ray", "self_check", "threads", "decode_threads"}
    data = config.model_dump(exclude=old_keys)
    for stage in ("captioner", "filter", "clip"):
        if data.get(stage):
            data[stage].pop("batch_size", None)
    assert config.fingerprint() == hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def test_a_config_path_that_is_not_here_names_a_shipped_recipe(tmp_path, monkeypatch):
    from capfilt.shipped import find_recipe, list_recipes

    monkeypatch.chdir(tmp_path)
    shipped = ROOT / "pipelines" / "demo" / "tiny.yaml"
    for name in ("demo/tiny.yaml", "pipelines/demo/tiny.yaml", "demo/tiny"):
        assert find_recipe(name).resolve() == shipped
    assert load_config("demo/tiny.yaml").captioner.model == "tiny-blip"
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "tiny.yaml").write_text("seed: 7\n")  # a file here wins
    assert find_recipe("demo/tiny.yaml") == Path("demo/tiny.yaml")
    with pytest.raises(ConfigError, match=r"config file not found: nope.yaml \(.*`capfilt recipes` lists those\)"):
        find_recipe("nope.yaml")
    names = dict(list_recipes())
    assert {"capfilt.yaml", "laion_coco.yaml", "demo/tiny.yaml", "train/tiny-pretrain.yaml"} <= set(names)


def test_models_and_recipes_commands_list_what_is_shipped(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"# presets in {ROOT / 'models'}" in out and "tiny-blip " in out and "tiny-clip " in out
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "demo/tiny.yaml" in out and "capfilt.yaml" in out


@pytest.mark.parametrize(
    "section, key, value, says",
    [
        ("decide.web", "itm", "0.3", "decide.web.itm: expected a number, got '0.3' (a string)"),
        ("captioner", "num_captions", True, "captioner.num_captions: expected an integer, got true (a boolean)"),
        ("captioner", "sample", 1, "captioner.sample: expected true or false, got 1 (an integer)"),
        ("decide.web", "itm", float("nan"), "decide.web.itm: Input should be a finite number, got .nan (NaN"),
    ],
)
def test_recipe_scalars_are_taken_only_as_what_they_are(section, key, value, says):
    """pydantic's lax mode would run `itm: "0.3"` as 0.3 and `num_captions: true` as 1; a recipe
    mistake is refused with the key and what the user wrote."""
    data = {"captioner": {"model": "tiny-blip"}, "filter": {"model": "tiny-blip"}}
    node = data
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[key] = value
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert says in str(err.value)


def test_an_int_is_still_a_fine_float():
    config = parse_config({"captioner": {"model": "tiny-blip", "temperature": 1}, "filter": {"model": "tiny-blip"}})
    assert config.captioner.temperature == 1.0


def test_a_duplicate_yaml_key_is_refused_naming_its_lines(tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("filter: {model: tiny-blip}\nseed: 0\ndecide:\n  web: {itm: 0.3}\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 5: duplicate key 'seed' \(first set on line 2\)"):
        load_config(recipe)
    nested = tmp_path / "nested.yaml"
    nested.write_text("filter: {model: tiny-blip}\ndecide:\n  web:\n    itm: 0.3\n    itm: 0.4\n")
    with pytest.raises(ConfigError, match="line 5: duplicate key 'itm'"):
        load_config(nested)


def test_an_empty_recipe_says_it_is_empty(tmp_path, capsys):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("# nothing yet\n")
    assert main(["run", str(recipe), "--input", "x.tar", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "the file is empty" in err and "decide.web.itm" not in err


def test_a_default_threshold_without_its_model_says_it_is_a_default():
    with pytest.raises(ConfigError, match=r"decide.web.itm defaults to 0.5, which needs a `filter` model"):
        parse_config({"captioner": {"model": "tiny-blip"}})


def test_synth_help_shows_its_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 2)", "(default: 50)", "(default: 0.3)", "(default: 0)"):
        assert shown in out, shown


def test_exponent_numbers_without_a_dot_are_numbers_as_users_mean(tmp_path):
    """PyYAML reads `1e-4` as a string (YAML 1.1); a recipe and `--set` read it as YAML 1.2 does,
    while a quoted number stays a string and is refused."""
    recipe = ROOT / "pipelines/demo/tiny.yaml"
    assert load_config(recipe, ["decide.web.itm=385e-3"]).decide.web.itm == pytest.approx(0.385)
    written = tmp_path / "r.yaml"
    written.write_text(recipe.read_text().replace("itm: 0.385", "itm: 385e-3"))
    assert "385e-3" in written.read_text() and load_config(written).decide.web.itm == pytest.approx(0.385)
    with pytest.raises(ConfigError, match=r"expected a number, got '5e-1' \(a string\)"):
        load_config(recipe, ['decide.web.itm="5e-1"'])
