"""docker/: the image, the `ray up` config and the KubeRay RayJob agree with each other, with
pyproject.toml and with capfilt's own CLI and config. No Docker engine or cluster needed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
APP = "/opt/capfilt"  # where the Dockerfile puts the repository


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def launcher() -> dict:
    return yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())


def rayjob() -> dict:
    return yaml.safe_load((DOCKER / "rayjob.yaml").read_text())


def image_of_dockerfile_build() -> str:
    """The tag the README builds the image under."""
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"docker build -f docker/Dockerfile -t (\S+) \.", readme)
    assert m, "README must show the docker build command"
    return m.group(1)


def parse_run_command(command: str):
    """A `capfilt run ...` command line -> the RunConfig capfilt would run, via capfilt's own CLI."""
    from capfilt.api import run_config
    from capfilt.cli import parser
    from capfilt.cli.run import run_options

    argv = shlex.split(command)
    assert argv[:2] == ["capfilt", "run"], command
    args = parser().parse_args(argv[1:])
    # The recipe path is the image's; the same file is in this repository.
    assert args.config.startswith(f"{APP}/pipelines/"), args.config
    args.config = str(ROOT / args.config.removeprefix(f"{APP}/"))
    return args, run_config(args.config, **run_options(args))


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_on_a_cuda_image():
    froms = [args for word, args in dockerfile() if word == "FROM"]
    assert len(froms) == 1
    assert re.match(r"nvidia/cuda:\d+\.\d+(\.\d+)?-(cudnn-)?runtime-ubuntu\d+\.\d+$", froms[0]), froms[0]


def test_dockerfile_installs_the_package_pyproject_names():
    steps = dockerfile()
    name = pyproject()["project"]["name"]
    assert name == "capfilt"
    copied = {src.rstrip("/") for word, args in steps if word == "COPY" for src in args.split()[:-1]}
    workdir = [args for word, args in steps if word == "WORKDIR"][-1]
    assert workdir == APP
    # Everything pyproject.toml builds from (its readme too), and what capfilt reads at run time.
    for needed in ("pyproject.toml", pyproject()["project"]["readme"], name, "pipelines", "models"):
        assert needed in copied, needed
    for package in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert package.rstrip("*") == name
    runs = " && ".join(args for word, args in steps if word == "RUN")
    # pip installs the copied project (so pyproject.toml's dependency list is what gets installed),
    # not a re-listed set of requirements, at the versions of the one lock `make install` uses too;
    # and the build checks the package imports and runs.
    lock = re.search(r"^LOCK\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert lock in copied and (ROOT / lock).is_file()
    # (with the extras that give fsspec its s3:// and gs:// drivers, which the lock pins too)
    m = re.search(rf"pip install -c {re.escape(lock)} '?{re.escape(APP)}(\[[a-z0-9,]+\])?'?(\s|$)", runs)
    assert m, runs
    extras = set(m.group(1).strip("[]").split(",")) if m.group(1) else set()
    assert extras <= set(pyproject()["project"]["optional-dependencies"]), extras
    assert {"s3", "gcs"} <= extras, extras
    assert "-r " not in runs
    assert f"import {name}" in runs and f"{name} --help" in runs
    env = " ".join(args for word, args in steps if word == "ENV")
    assert f"CAPFILT_MODELS_DIR={APP}/models" in env  # presets are data next to the package


def test_dockerfile_python_meets_requires_python():
    base = [args for word, args in dockerfile() if word == "FROM"][0]
    ubuntu = base.rsplit("ubuntu", 1)[1]
    python = {"22.04": (3, 10), "24.04": (3, 12)}[ubuntu]  # the distribution's python3
    spec = pyproject()["project"]["requires-python"]
    low = tuple(int(x) for x in re.match(r">=\s*(\d+)\.(\d+)", spec).groups())
    assert python >= low


# --------------------------------------------------------------------------- `ray up` config


def test_launcher_config_is_valid_for_ray_up():
    util = pytest.importorskip("ray.autoscaler._private.util")
    # What `ray up` does first: fill in the provider's defaults, then check Ray's schema.
    util.validate_config(util.prepare_config(launcher()))


def test_launcher_runs_the_image_and_starts_ray_on_every_node():
    cfg = launcher()
    assert (
        cfg["docker"]["image"]
        == rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
        == image_of_dockerfile_build()
    )
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])
    assert not cfg["setup_commands"]  # everything is in the image
    assert cfg["head_node_type"] in cfg["available_node_types"]
    gpu_types = [
        t for t in cfg["available_node_types"].values() if re.match(r"(g\d|p\d)", t["node_config"]["InstanceType"])
    ]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)


def test_launcher_command_in_its_header_is_a_valid_capfilt_run():
    header = (DOCKER / "ray-cluster.yaml").read_text()
    m = re.search(r'ray exec docker/ray-cluster.yaml "(capfilt run .*?)"', header.replace("\\\n#", ""), re.S)
    assert m
    args, config = parse_run_command(" ".join(m.group(1).split()))
    assert config.runner == "ray" and config.ray.address == "auto"  # joins the running cluster
    assert args.output.startswith("s3://")  # the workers write the outputs: storage every node reaches


# --------------------------------------------------------------------------- KubeRay RayJob


def test_rayjob_entrypoint_runs_a_recipe_on_this_cluster():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    args, config = parse_run_command(job["spec"]["entrypoint"])
    assert config.runner == "ray"
    assert config.ray.address is None  # under `ray job submit`: joins via RAY_ADDRESS
    assert args.input and args.output
    assert args.output.startswith("s3://"), "the workers write the outputs: storage every pod reaches"
    assert config.captioner is not None and config.filter is not None


def test_rayjob_gpu_workers_fit_the_actor_pools():
    job = rayjob()
    spec = job["spec"]["rayClusterSpec"]
    _, config = parse_run_command(job["spec"]["entrypoint"])
    images = {spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]}
    gpus = 0.0
    for group in spec["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        images.add(container["image"])
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits == requests  # guaranteed QoS: no eviction mid-job
        gpus += float(limits.get("nvidia.com/gpu", 0)) * group["minReplicas"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert images == {image_of_dockerfile_build()}
    rc = config.ray
    actors = rc.max_actors  # shard workers, each holding every model
    cpus = min(
        float(c["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) for c in spec["workerGroupSpecs"]
    )
    per_pod = min(1 / rc.gpus_per_actor, cpus // config.threads)  # workers a one-GPU pod holds, by GPU and by CPU
    assert per_pod * sum(g["minReplicas"] for g in spec["workerGroupSpecs"]) >= actors
    assert actors * rc.gpus_per_actor <= gpus  # every actor pool finds its GPUs without autoscaling


def test_readme_cluster_section_matches_docker_files():
    readme = (ROOT / "README.md").read_text()
    assert "## Running on a cluster" in readme
    section = readme.split("## Running on a cluster", 1)[1]
    for path in ("docker/Dockerfile", "docker/ray-cluster.yaml", "docker/rayjob.yaml"):
        assert path in section and (ROOT / path).is_file()
    assert "ray up docker/ray-cluster.yaml" in section
    assert "kubectl apply -f docker/rayjob.yaml" in section
    assert f"docker push {image_of_dockerfile_build()}" in section
    # The commands the README shows are the ones in the manifests.
    assert " ".join(rayjob()["spec"]["entrypoint"].split()) in " ".join(section.split())
