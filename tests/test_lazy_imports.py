"""`capfilt --help`, a config error, `capfilt recipes` and `capfilt models` answer without
importing the heavy libraries (torch, transformers, Ray, open_clip): they cost seconds of CPU
before the first line of output (issue 22 item 6). Each check runs in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "ray", "open_clip", "pyarrow", "matplotlib")

PROBE = """
import contextlib, io, json, sys
import capfilt.cli
argv = json.loads(sys.argv[1])
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    try:
        code = capfilt.cli.main(argv) if argv else (capfilt.cli.parser(), 0)[1]
    except SystemExit as e:  # --help
        code = e.code
print(json.dumps({"code": code, "heavy": sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)}))
"""


@pytest.mark.parametrize(
    "argv, code",
    [
        ([], 0),
        (["--help"], 0),
        (["run", "--help"], 0),
        (["recipes"], 0),
        (["models"], 0),
        (["run", "demo/no-such-recipe.yaml", "--input", "x.tar", "--output", "o"], 2),
    ],
    ids=["import", "help", "run-help", "recipes", "models", "recipe-typo"],
)
def test_light_commands_import_no_heavy_library(argv, code):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"code": code, "heavy": []}


def test_a_config_error_imports_no_heavy_library(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("captioner: {model: tiny-blip, num_captions: true}\n")
    argv = ["run", str(recipe), "--input", "x.tar", "--output", str(tmp_path / "o")]
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"code": 2, "heavy": []}
