"""What capfilt declares is what it imports, and what users install beside it installs: every
third-party module capfilt imports is a declared dependency (webdataset, which only the tests
import, is a test dependency, so open_clip's training extra and its webdataset<=0.2.86 resolve
beside capfilt), and the cleaned shards carry the sizes.json open_clip's training reads."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib
from thresholds import split_thresholds

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def _imported_modules(*folders: str) -> set[str]:
    """Top-level modules imported anywhere under ``folders`` (every import, lazy ones included),
    less the standard library and the checkout's own modules."""
    found = set()
    for path in (p for folder in folders or ("capfilt",) for p in (ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    own = {p.stem for folder in ("tests", "benchmarks") for p in (ROOT / folder).glob("*.py")}
    return found - set(sys.stdlib_module_names) - {"capfilt", "benchmarks"} - own


def test_every_imported_package_is_declared_and_test_only_ones_are_not_runtime():
    project = _pyproject()["project"]
    runtime = _names(project["dependencies"])
    extras = {name: _names(reqs) for name, reqs in project["optional-dependencies"].items()}
    user_extras = set().union(*(v for k, v in extras.items() if k != "test"))
    dists = packages_distributions()
    undeclared = {}
    for module in sorted(_imported_modules()):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & (runtime | user_extras):
            undeclared[module] = sorted(names)
    assert not undeclared, f"capfilt imports these, pyproject does not declare them: {undeclared}"
    assert {"braceexpand", "huggingface-hub"} <= runtime
    assert "webdataset" not in runtime and "webdataset" in extras["test"]
    assert "aiohttp" in extras["http"]  # https:// inputs (README: pip install 'capfilt[http]')


def test_what_the_tests_and_benchmarks_import_is_declared_for_them():
    """`pip install -c requirements.lock '.[test]'` is enough to run tests/ and benchmarks/: each
    package they import is a runtime dependency or in the [test] extra (faiss, webdataset, moto...)."""
    project = _pyproject()["project"]
    declared = _names(project["dependencies"]) | _names(project["optional-dependencies"]["test"])
    dists = packages_distributions()
    modules = _imported_modules("tests", "benchmarks")
    assert {"pytest", "moto", "webdataset", "faiss"} <= modules  # the walk sees them at all
    undeclared = {}
    for module in sorted(modules):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & declared:
            undeclared[module] = sorted(names)
    assert not undeclared, f"tests/ or benchmarks/ import these, pyproject's [test] does not declare them: {undeclared}"


@pytest.mark.slow
def test_open_clip_training_extra_resolves_beside_capfilt(tmp_path):
    """pip's resolver, run for real (from the package index, nothing installed): capfilt from this
    checkout, open_clip_torch[training] 3.3.0, every other package pinned by requirements.lock.
    webdataset is left to the resolver, as it is a test dependency (the lock's 1.0.2 is what the
    tests run); open_clip's training extra needs <=0.2.86."""
    lock = [
        line for line in (ROOT / "requirements.lock").read_text().splitlines() if not line.startswith("webdataset==")
    ]
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("\n".join(lock) + "\n")
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-build-isolation"]
    cmd += ["--quiet", "--report", str(report), "-c", str(constraints), str(ROOT), "open_clip_torch[training]==3.3.0"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    chosen = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in installs}
    assert chosen["capfilt"] == "0.1.0" and chosen["open-clip-torch"] == "3.3.0"
    assert tuple(int(x) for x in chosen["webdataset"].split(".")) <= (0, 2, 86)
    pinned = dict(line.split("==", 1) for line in lock if "==" in line and not line.startswith("#"))
    assert chosen["torch"] == pinned["torch"]  # the lock held for the rest


def test_sizes_json_is_what_open_clip_reads(tiny_recipe, tmp_path):
    """open_clip's own reader (open_clip_train.data.get_dataset_size) finds the number of kept
    samples beside the cleaned shards, so training on them needs no --train-num-samples."""
    from open_clip_train.data import get_dataset_size

    from capfilt.config import load_config
    from capfilt.pipeline import run
    from capfilt.synthetic import main_synth

    main_synth(tmp_path / "data", shards=2, per_shard=3, broken=True, seed=8)
    config = load_config(tiny_recipe, split_thresholds())
    config = config.model_copy(update={"input": [str(tmp_path / "data" / "*.tar")], "output": str(tmp_path / "out")})
    result = run(config, progress=False)
    assert result.ok
    shards = sorted(str(p) for p in (tmp_path / "out" / "shards").glob("*.tar"))
    total, n = get_dataset_size("::".join(shards))
    assert (total, n) == (result.summary["kept"], 2)
    sizes = json.loads((tmp_path / "out" / "shards" / "sizes.json").read_text())
    for shard in shards:  # each count is the tar's own: its samples, as webdataset groups them
        import webdataset as wds

        assert sizes[Path(shard).name] == sum(1 for _ in wds.WebDataset(shard, shardshuffle=False))
    assert result.summary["outputs"]["shard sizes"] == "shards/sizes.json"


def test_https_style_inputs_work_with_the_http_extra(tiny_recipe, tmp_path):
    """README: http(s):// inputs need aiohttp (the [http] extra, installed here with the lock):
    shards served over HTTP by a local server give the same summary as the same files on disk."""
    import functools
    import http.server
    import threading

    from capfilt.api import run_config
    from capfilt.pipeline import run
    from capfilt.synthetic import main_synth

    main_synth(tmp_path / "data", shards=1, per_shard=3, seed=9)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "data"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/00000.tar"
        over_http = run(
            run_config(tiny_recipe, input=url, output=tmp_path / "h", overrides=split_thresholds()), progress=False
        )
    finally:
        server.shutdown()
    local = run(
        run_config(
            tiny_recipe, input=str(tmp_path / "data" / "00000.tar"), output=tmp_path / "l", overrides=split_thresholds()
        ),
        progress=False,
    )
    assert over_http.ok and local.ok
    assert (tmp_path / "h" / "shards" / "00000.tar").read_bytes() == (
        tmp_path / "l" / "shards" / "00000.tar"
    ).read_bytes()
