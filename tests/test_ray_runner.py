"""The Ray runner on real Ray processes: same outputs as the local runner, exactly-once shards
under a killed model actor, a removed node and a killed driver, with the input shards and every
output on a real S3 server (moto, tests/s3server.py): the workers write the outputs there.

Each fault test holds its job open with a *gate* (see Gate): one shard's read task blocks until
the test releases it. The fault is injected while the gate is shut and at least one shard is
already committed, so it always lands mid-job, with no sleeps or timing thresholds; the job can
only finish after the test opens the gate.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from conftest import FifoGate
from s3server import BUCKET
from thresholds import split_thresholds

from capfilt.config import load_config
from capfilt.pipeline import run
from capfilt.synthetic import main_synth

RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "demo" / "tiny.yaml"
SHARDS = 4
GATED = f"{SHARDS - 1:05d}"  # the shard held back by the gate (its sidecar is a FIFO)
HANG_GUARD = 300  # seconds; only ever reached if something hangs, never part of an assertion
MODELS = "capfilt_models"  # custom resource of the node that hosts the model actors
MODEL_NODE = {"num_cpus": 1, "resources": {MODELS: 3}}


def tiny(inputs, output, extra=()):
    return load_config(RECIPE, [*split_thresholds(), *extra]).model_copy(
        update={"input": [str(p) for p in inputs], "output": str(output)}
    )


def _fs(out):
    fs, root = fsspec.core.url_to_fs(str(out))
    fs.invalidate_cache()  # another process (a Ray worker) may have written since the last listing
    return fs, root.rstrip("/")


def outputs(out):
    """Ledger rows (sorted) and cleaned tars (name -> bytes) of a run: a local path or an s3:// URL."""
    fs, root = _fs(out)
    rows = []
    for path in sorted(fs.glob(f"{root}/ledger/*.parquet")):
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    rows.sort(key=lambda r: (r["shard"], r["key"], r["occurrence"], r["candidate"]))
    tars = {path.rsplit("/", 1)[1]: fs.cat_file(path) for path in sorted(fs.glob(f"{root}/shards/*.tar"))}
    return rows, tars


def committed(out) -> int:
    fs, root = _fs(out)
    return len(fs.glob(f"{root}/_done/*.done"))


def assert_markers_vouch(out, reference: Path):
    """No partial object visible as complete: every shard with a marker has all its files, each
    byte-equal to the uninterrupted run's (read after the marker list: files never change after)."""
    fs, root = _fs(out)
    for marker in fs.glob(f"{root}/_done/*.done"):
        shard = marker.rsplit("/", 1)[1][: -len(".done")]
        for sub, suffix in (("shards", ".tar"), ("ledger", ".parquet"), ("stats", ".json")):
            assert fs.cat_file(f"{root}/{sub}/{shard}{suffix}") == (reference / sub / f"{shard}{suffix}").read_bytes()


def wait_for(predicate, what: str):
    deadline = time.monotonic() + HANG_GUARD
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def ray_processes(fragment: str) -> dict[int, int]:
    """pid -> parent pid of the live processes whose title contains `fragment` (Ray sets
    `ray::MapWorker(MapBatches(CaptionActor))` and the like as the title of its workers)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if fragment in title and ") Z " not in stat:
            found[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return found


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


class Gate(FifoGate):
    """Holds one shard's read task until the test opens it: a FifoGate (tests/conftest.py) as the
    sidecar of a copy of that shard. Once open, the reader finds the sidecar unreadable, logs and
    ignores it, and reads the tar as usual; the reference corpus has no sidecar for this shard, so
    the outputs are the same."""

    def __init__(self, corpus_dir: Path, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.tar = directory / f"{GATED}.tar"
        shutil.copyfile(corpus_dir / f"{GATED}.tar", self.tar)
        super().__init__(directory / f"{GATED}.parquet")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    data = tmp_path_factory.mktemp("corpus")
    info = main_synth(data, shards=SHARDS, per_shard=6, broken=True, seed=11)
    (data / f"{GATED}.parquet").unlink()  # see Gate
    return data, info


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The local runner's outputs, with torch on one thread like the Ray actors (CPU float results
    depend on the thread count; same threads, same batches -> same bits)."""
    import torch

    data, _ = corpus
    out = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run(tiny(sorted(data.glob("*.tar")), out), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert result.ok
    return out, result


@pytest.fixture
def gate(corpus, tmp_path):
    g = Gate(corpus[0], tmp_path / "gated")
    yield g
    g.close()


@pytest.fixture(scope="module")
def s3_corpus(s3, corpus):
    """The corpus's shards and their sidecars on the S3 server; returns the shards' URLs."""
    for p in sorted(corpus[0].iterdir()):
        if p.is_file():
            s3.put_file(str(p), f"{BUCKET}/ray/data/{p.name}")
    return [f"s3://{BUCKET}/ray/data/{p.name}" for p in sorted(corpus[0].glob("*.tar"))]


def gated_inputs(s3_corpus, gate: Gate) -> list:
    """Every shard from S3 but the gated one, which is read from its local folder (its sidecar is
    the gate's FIFO: an object store has nothing that can hold a read open)."""
    return [*(u for u in s3_corpus if not u.endswith(f"/{GATED}.tar")), gate.tar]


def s3_output(tmp_path) -> str:
    return f"s3://{BUCKET}/ray/{tmp_path.name}/out"


def check_accounting(out, info: dict):
    rows, _ = outputs(out)
    samples = {(r["shard"], r["key"], r["occurrence"]) for r in rows}
    fs, root = _fs(out)
    stats = [json.loads(fs.cat_file(p)) for p in fs.glob(f"{root}/stats/*.json")]
    assert len(stats) == SHARDS
    assert sum(s["input"] for s in stats) == len(samples) == info["samples"]  # nothing lost
    for s in stats:
        assert s["input"] == s["kept"] + s["rejected"] + s["failed"]
    kept_keys = [r["key"] for r in rows if r["selected"]]
    assert len(kept_keys) == len(set(kept_keys))  # nothing twice
    assert not fs.glob(f"{root}/_parts/*")  # every part committed and deleted


class Job:
    """pipeline.run in a thread, so the test can inject a fault while it runs."""

    def __init__(self, config):
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(config,), daemon=True)
        self.thread.start()

    def _run(self, config):
        try:
            self.result = run(config, progress=False)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
            self.error = err

    def join(self):
        self.thread.join(HANG_GUARD)
        assert not self.thread.is_alive(), "the job did not finish"
        if self.error:
            raise self.error
        return self.result


# --------------------------------------------------------------------------- the driver's side, no Ray


def test_envelope_and_assembly_import_without_ray():
    """The driver's bookkeeping and the envelope format are plain Python: importing them (and the
    package, which exposes run_ray) loads no Ray."""
    code = (
        "import sys, capfilt.runners.ray, capfilt.runners.ray.assembly, capfilt.runners.ray.envelope, "
        "capfilt.pipeline; assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_assembler_commits_each_shard_once_whatever_order_and_repeats(corpus, tmp_path):
    """Envelopes out of order, delivered twice (as task retries and lineage reconstruction do),
    and a failed shard: each good shard is committed exactly once from the part files the last
    operator stored, identical to the local runner's commit of the same batches; the failed one
    is reported, not written; no batch reaches the driver. No Ray runs here."""
    import random

    from capfilt.io.output import write_shard
    from capfilt.runners.local import row_batches
    from capfilt.runners.ray import assembly
    from capfilt.runners.ray.envelope import PartSink, apply_stages, envelope, to_table
    from capfilt.stages import build_stages, run_stages

    data, _ = corpus
    config = tiny([], tmp_path).model_copy(update={"captioner": None, "filter": None, "clip": None, "batch_size": 4})
    stages = build_stages(config)  # no model configured: Decode and Decide do the work
    out = tmp_path / "ray"
    sink = PartSink(str(out), laion=False)
    envelopes, expected = [], {}
    for url in [str(data / "00000.tar"), str(data / "00001.tar")]:
        batches = list(row_batches(url, config, config.batch_size))
        shard = Path(url).stem
        for part, batch in enumerate(batches):
            env = apply_stages(stages, to_table([envelope(shard, part, part == len(batches) - 1, batch)]), sink)
            env = env.to_pylist()[0]
            assert env["payload"] == b"" and env["stored"] > 0  # the batch stayed with the worker
            envelopes.append(env)
        expected[shard] = [run_stages(stages, b, {}) for b in row_batches(url, config, config.batch_size)]
    assert sorted(p.name for p in (out / "_parts").iterdir())[:2] == ["00000.000000.part", "00000.000001.part"]
    envelopes.append(envelope("broken", 0, False, None))  # a first part that never completes...
    envelopes.append(envelope("broken", 1, True, None, error="ShardReadError: boom"))  # ...and fails
    repeated = envelopes + random.Random(0).sample(envelopes, len(envelopes) // 2)
    random.Random(1).shuffle(repeated)

    commits = []

    def commit(shard, parts):  # what the driver's commit task does, here synchronously
        commits.append(shard)
        assembler.committed(shard, assembly.commit_shard(str(out), shard, parts, laion=False, source=None))

    assembler = assembly.ShardAssembler(total=3, commit=commit)
    for env in repeated:
        assembler.add(env)
    assembler.finish(["00000", "00001", "broken"])
    assert assembler.errors == {"broken": "ShardReadError: boom"}
    assert assembler.duplicates > 0
    assert sorted(commits) == ["00000", "00001"]  # once each
    assert not assembler.parts  # nothing left buffered
    assert sorted(p.stem for p in (out / "_done").glob("*.done")) == ["00000", "00001"]
    assert not list((out / "_parts").iterdir())  # parts deleted once their shard is committed
    assert all(len(e["payload"]) == 0 for e in repeated)  # metadata only: no image byte, no text
    local = tmp_path / "local"
    for shard, batches in expected.items():
        write_shard(local, shard, batches)
    assert outputs(out) == outputs(local)


def test_a_commit_retried_after_its_marker_only_cleans_up(corpus, tmp_path):
    """A commit task Ray re-runs after it wrote the marker (its result was lost with its worker)
    neither rewrites the shard nor fails for the parts it already deleted."""
    from capfilt.runners.local import row_batches
    from capfilt.runners.ray.assembly import commit_shard
    from capfilt.runners.ray.envelope import PartSink, apply_stages, envelope, to_table
    from capfilt.stages import build_stages

    config = tiny([], tmp_path).model_copy(update={"captioner": None, "filter": None, "clip": None})
    stages, out = build_stages(config), tmp_path / "out"
    batch = next(row_batches(str(corpus[0] / "00000.tar"), config, 64))
    apply_stages(stages, to_table([envelope("00000", 0, True, batch)]), PartSink(str(out), laion=False))
    first = commit_shard(str(out), "00000", [0], laion=False, source=None)
    tar = (out / "shards" / "00000.tar").stat()
    again = commit_shard(str(out), "00000", [0], laion=False, source=None)
    assert {k: first[k] for k in ("input", "kept")} == {k: again[k] for k in ("input", "kept")}
    assert (out / "shards" / "00000.tar").stat().st_mtime_ns == tar.st_mtime_ns  # not rewritten


def test_a_stage_that_raises_fails_its_envelope_as_the_local_runner_fails_the_shard(corpus, tmp_path, caplog):
    """The same StageError from run_stages: the envelope carries the local runner's shard error."""
    from capfilt.runners.local import row_batches
    from capfilt.runners.ray.envelope import apply_stages, envelope, to_table

    class Broken:
        def __call__(self, batch):
            raise OSError("disk on fire")

    url = str(corpus[0] / "00000.tar")
    config = tiny([], tmp_path)
    batch = next(row_batches(url, config, 4))
    env = apply_stages([Broken()], to_table([envelope("00000", 0, False, batch, seconds={"Read": 1.0})]))
    env = env.to_pylist()[0]
    assert env["error"] == "OSError: disk on fire" and env["payload"] == b""
    assert json.loads(env["seconds"]) == {"Read": 1.0}
    assert "shard 00000 failed in Broken: OSError: disk on fire" in caplog.text


def test_a_commit_whose_run_lost_the_lock_writes_no_marker_and_deletes_nothing(corpus, tmp_path):
    """A worker can outlive its killed driver. Once a rerun holds the output's lock (and has swept
    this shard's files), the orphaned commit must not write a marker that vouches for them, nor
    delete what are now the rerun's files."""
    from capfilt.io.parts import LockLost
    from capfilt.io.run_lock import RunLock
    from capfilt.runners.local import row_batches
    from capfilt.runners.ray.assembly import commit_shard
    from capfilt.runners.ray.envelope import PartSink, apply_stages, envelope, to_table
    from capfilt.stages import build_stages

    config = tiny([], tmp_path).model_copy(update={"captioner": None, "filter": None, "clip": None})
    stages, out = build_stages(config), tmp_path / "out"
    batch = next(row_batches(str(corpus[0] / "00000.tar"), config, 64))
    apply_stages(stages, to_table([envelope("00000", 0, True, batch)]), PartSink(str(out), laion=False))
    first_run = RunLock(out)  # the killed driver's token; a rerun now holds the lock
    with RunLock(out):
        with pytest.raises(LockLost, match="no longer holds the output's lock"):
            commit_shard(str(out), "00000", [0], laion=False, source=None, owner=first_run.token)
        assert not (out / "_done" / "00000.done").exists()
        assert (out / "_parts" / "00000.000000.part").exists()  # nothing deleted: the rerun sweeps it
    with RunLock(out) as lock:  # the owner commits as usual
        commit_shard(str(out), "00000", [0], laion=False, source=None, owner=lock.token)
    assert (out / "_done" / "00000.done").exists()


# --------------------------------------------------------------------------- a real 2-node cluster


@pytest.fixture(scope="class")
def cluster(s3):
    """Head node (the driver's tasks: read, decode, decide) + a node with the models' resource.

    Ray's own head and worker processes on loopback; torn down however the tests end. Started
    after the S3 server, so its workers inherit the endpoint and credentials.
    """
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
    try:
        c.add_node(**MODEL_NODE)
        c.wait_for_nodes()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def cluster_config(cluster, inputs, out):
    # The model actors may only run where MODELS is, i.e. on the model node, never on the head; they
    # fill its one CPU, so the CPU tasks all run on the head (3 CPUs: one may sit behind the gate).
    config = tiny(
        inputs,
        out,
        ["runner=ray", f"ray.actor_resources={{{MODELS}: 1}}", "ray.cpus_per_actor=0.33", "ray.max_shards_in_flight=2"],
    )
    return config.model_copy(update={"ray": config.ray.model_copy(update={"address": cluster.address})})


def model_node(cluster):
    return next(n for n in cluster.worker_nodes if n.all_processes)


def raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def assert_complete_and_equal(result, out, info, reference):
    """Nothing lost, nothing counted twice, and the outputs of an uninterrupted run, byte for byte."""
    assert result.ok, result.shard_errors
    check_accounting(out, info)
    assert outputs(out) == outputs(reference[0])
    assert_markers_vouch(out, reference[0])


@pytest.mark.slow
class TestOnACluster:
    def test_ray_equals_local_on_a_broken_corpus(self, cluster, corpus, s3_corpus, reference, tmp_path):
        from capfilt.io.shards import read_shard

        _, info = corpus
        bad = tmp_path / "bad" / "zbad.tar"  # not a tar at all: the shard fails as in the local runner
        bad.parent.mkdir()  # apart from the output folder (an output inside an input's folder is refused)
        bad.write_bytes(b"<html>403 Forbidden</html>")
        with pytest.raises(Exception) as local_error:
            next(read_shard(str(bad)))
        out = s3_output(tmp_path)
        result = run(cluster_config(cluster, [*s3_corpus, bad], out), progress=False)
        assert result.shard_errors == {"zbad": f"{type(local_error.value).__name__}: {local_error.value}"}
        assert result.summary["shards_done"] == SHARDS and committed(out) == SHARDS
        check_accounting(out, info)
        assert outputs(out) == outputs(reference[0])
        assert_markers_vouch(out, reference[0])
        ref = reference[1].summary
        assert (result.summary["kept"], result.summary["rejected"], result.summary["failed"]) == (
            ref["kept"],
            ref["rejected"],
            ref["failed"],
        )
        assert ref["failed"] > 0 and ref["rejected"] > 0 and ref["kept"] > 0
        assert {"Decode", "Caption", "Filter", "Clip", "Decide"} <= set(result.stage_seconds)

    def test_a_killed_model_actor_loses_and_duplicates_nothing(
        self, cluster, corpus, s3_corpus, reference, gate, tmp_path
    ):
        _, info = corpus
        inputs = gated_inputs(s3_corpus, gate)
        out = s3_output(tmp_path)
        job = Job(cluster_config(cluster, inputs, out))
        try:
            wait_for(lambda: committed(out) >= 1, "a first committed shard")
            raylet = raylet_pid(model_node(cluster))

            def captioners():
                return [p for p in ray_processes("(MapBatches(CaptionActor))") if descends_from(p, raylet)]

            wait_for(lambda: len(captioners()) == 1, "one captioner actor (the last job's may be exiting)")
            pid = captioners()[0]
            os.kill(pid, signal.SIGKILL)
            # Ray restarts the actor (a new process) and re-runs the calls it lost.
            wait_for(lambda: set(ray_processes("(MapBatches(CaptionActor))")) - {pid}, "the restarted actor")
            assert committed(out) < SHARDS  # the gate holds the job open: the kill was mid-job
        finally:
            gate.open()
        assert_complete_and_equal(job.join(), out, info, reference)

    def test_a_removed_node_loses_and_duplicates_nothing(self, cluster, corpus, s3_corpus, reference, gate, tmp_path):
        _, info = corpus
        inputs = gated_inputs(s3_corpus, gate)
        out = s3_output(tmp_path)
        node = model_node(cluster)
        job = Job(cluster_config(cluster, inputs, out))
        try:
            wait_for(lambda: committed(out) >= 1, "a first committed shard")
            raylet = raylet_pid(node)
            actors = {
                p: title
                for title in ("CaptionActor", "FilterActor", "ClipActor")
                for p in ray_processes(f"(MapBatches({title}))")
                if descends_from(p, raylet)
            }
            assert set(actors.values()) == {"CaptionActor", "FilterActor", "ClipActor"}  # all on that node
            # A spare node joins (as an autoscaler would provide one), then the model node dies with
            # every actor, task and object on it; the pools restart on the spare.
            cluster.add_node(**MODEL_NODE)
            cluster.wait_for_nodes()
            cluster.remove_node(node, allow_graceful=False)  # SIGKILL: a crash, not a drain
            # Its workers notice their raylet is gone and exit.
            wait_for(lambda: not set(ray_processes("MapWorker(MapBatches(")) & set(actors), "the node's actors to die")
            assert committed(out) < SHARDS
        finally:
            gate.open()
        assert_complete_and_equal(job.join(), out, info, reference)


# --------------------------------------------------------------------------- a killed driver


@pytest.mark.slow
def test_a_killed_driver_resumes_to_the_same_outputs(corpus, s3_corpus, reference, gate, tmp_path):
    """`capfilt run --runner ray` (a local Ray of its own), SIGKILLed mid-job, then run again."""
    _, info = corpus
    inputs = gated_inputs(s3_corpus, gate)
    out = s3_output(tmp_path)
    # 4 logical CPUs: the actors take 1.5, the gated read holds 1 while the other tasks go on.
    settings = [*split_thresholds(), "ray.num_cpus=4", "ray.cpus_per_actor=0.5"]
    cmd = [
        sys.executable,
        "-m",
        "capfilt.cli",
        "run",
        str(RECIPE),
        "--runner",
        "ray",
        "--quiet",
        "--input",
        *map(str, inputs),
        "--output",
        out,
        *[a for t in settings for a in ("--set", t)],
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = (tmp_path / "first.log").open("wb")
    # Its own session, so the local Ray it starts can be found (and ended) as one process group.
    first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: committed(out) >= 1 or first.poll() is not None, "a first committed shard")
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # whatever of its Ray outlived it
        except ProcessLookupError:
            pass
    done_at_kill = committed(out)
    assert 1 <= done_at_kill < SHARDS
    assert_markers_vouch(out, reference[0])  # what the killed run left: complete shards or no marker

    gate.open()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD)
    assert second.returncode == 0, second.stderr[-3000:]
    # The committed shards were skipped. A commit task that outlived the killed driver may have
    # completed one more before the rerun took the lock over (with a marker vouching for it).
    found = re.search(r"(\d+) already complete, (\d+) to do", second.stderr)
    assert found and done_at_kill <= int(found[1]) < SHARDS and int(found[2]) == SHARDS - int(found[1])
    assert "starting a local Ray with 4 CPUs" in second.stderr
    assert "accounting: input" in second.stdout and "OK" in second.stdout
    assert "time per stage" in second.stdout and "Caption" in second.stdout
    check_accounting(out, info)
    assert outputs(out) == outputs(reference[0])
