"""The built wheel is complete: installed outside the checkout it lists its presets and recipes and
runs the shipped tiny recipe by name, with no CAPFILT_MODELS_DIR (about 30 s: a build, an install
and one tiny run in a fresh virtual environment that borrows this one's dependencies)."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the build reads (pyproject.toml, setup.py, MANIFEST.in and what they name), copied so that
# the build leaves nothing in the checkout.
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "capfilt", "models", "pipelines")


def sh(*cmd, cwd=None, env=None) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, the `capfilt` console script of a fresh venv that has only that wheel installed)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(
            ROOT / name,
            src / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}),
        )
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src)
    wheel = next((tmp / "dist").glob("capfilt-*.whl"))
    venv = tmp / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    sh(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)
    # The dependencies come from this environment (after capfilt is installed, so that pip never
    # sees the checkout's editable capfilt there); a path in a .pth file is appended to sys.path.
    site = sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    Path(site, "capfilt-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return wheel, venv / "bin" / "capfilt"


def clean_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CAPFILT_MODELS_DIR", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HOME=str(tmp))  # HOME: presets are built into ~/.cache/capfilt here
    env.pop("CAPFILT_CACHE_DIR", None)
    return env


def test_wheel_holds_the_package_presets_and_recipes(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "capfilt").rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    assert "capfilt/report/report.css" in names  # package data beside the modules
    for p in (ROOT / "models").rglob("*"):
        if p.is_file():
            assert f"capfilt/presets/{p.relative_to(ROOT / 'models').as_posix()}" in names
    for p in (ROOT / "pipelines").rglob("*.yaml"):
        assert f"capfilt/recipes/{p.relative_to(ROOT / 'pipelines').as_posix()}" in names
    assert not any(n.startswith(("models/", "pipelines/")) for n in names)  # no top-level data folders


@pytest.mark.slow
def test_installed_wheel_runs_the_shipped_tiny_recipe(installed, tmp_path):
    _, capfilt = installed
    env = clean_env(tmp_path)
    where = sh(
        capfilt.parent / "python",
        "-c",
        "import capfilt.shipped as c; print(c.__file__); "
        "print(c.shipped_dir('models')); print(c.shipped_dir('pipelines'))",
        cwd=tmp_path,
        env=env,
    )
    module, models, recipes = where.stdout.split()
    package = capfilt.parents[1]
    assert Path(module).is_relative_to(package), module  # the wheel's capfilt, not the checkout's
    assert Path(models).is_relative_to(package) and Path(models).name == "presets"
    assert Path(recipes).is_relative_to(package) and Path(recipes).name == "recipes"

    listed = sh(capfilt, "models", cwd=tmp_path, env=env).stdout
    assert "tiny-blip " in listed and "tiny-clip " in listed and "blip-large " in listed
    assert "demo/tiny.yaml" in sh(capfilt, "recipes", cwd=tmp_path, env=env).stdout
    sh(capfilt, "synth", "corpus", "--shards", "1", "--per-shard", "6", cwd=tmp_path, env=env)
    # A recipe named as in the README, from a folder that has no pipelines/: the shipped one.
    sh(
        capfilt,
        "run",
        "pipelines/demo/tiny.yaml",
        "--input",
        "corpus/00000.tar",
        "--output",
        "out",
        "--quiet",
        cwd=tmp_path,
        env=env,
    )
    assert (tmp_path / "out" / "_done" / "00000.done").is_file()
    assert (tmp_path / ".cache" / "capfilt" / "presets").is_dir()  # built from the wheel's own presets
