"""The Ray runner on real Ray processes: same outputs as the local runner, exactly-once shards
under a killed shard worker, a removed node and a killed driver, with the input shards and every
output on a real S3 server (moto, tests/s3server.py): the workers write the outputs there.

Each fault test holds its job open with a *gate* (see Gate): one shard's read blocks until the
test releases it. The fault is injected while the gate is shut and at least one shard is already
committed, so it always lands mid-job, with no sleeps or timing thresholds; the job can only
finish after the test opens the gate.
"""

from __future__ import annotations

import json
import logging
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
MODELS = "capfilt_models"  # custom resource of the node that hosts the shard workers
MODEL_NODE = {"num_cpus": 1, "resources": {MODELS: 2}}
WORKER = "ray::ShardActor"  # the title Ray gives a shard worker's process


def tiny(inputs, output, extra=()):
    """The tiny recipe with one torch thread per worker, the Ray workers' and the local runner's alike."""
    return load_config(RECIPE, [*split_thresholds(), "threads=1", *extra]).model_copy(
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
    """Until ``predicate`` holds: the events decide, never a time; a hang is pytest-timeout's to end
    (its traceback names the wait, and ``what`` it waited for)."""
    while not predicate():
        time.sleep(0.05)


def ray_processes(fragment: str) -> dict[int, int]:
    """pid -> parent pid of the live processes whose title contains `fragment` (Ray sets
    `ray::ShardActor` as the title of a shard worker)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fragment in title and fields[0] != "Z":
            found[int(entry.name)] = int(fields[1])
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
    """The local runner's outputs (`threads` fixes torch's thread count in every worker: CPU float
    results depend on it; same code, same threads, same batches -> same bits)."""
    data, _ = corpus
    out = tmp_path_factory.mktemp("local")
    result = run(tiny(sorted(data.glob("*.tar")), out), progress=False)
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
        self.thread.join()  # a job that never finishes is a hang: pytest-timeout ends it
        if self.error:
            raise self.error
        return self.result


# --------------------------------------------------------------------------- the shard worker, no Ray


def test_the_runners_import_without_ray():
    """Only `run_ray` imports Ray: the worker, the local runner and the pipeline load none of it."""
    code = (
        "import sys, capfilt.runners.ray, capfilt.runners.worker, capfilt.runners.local, capfilt.pipeline; "
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_removed_ray_keys_are_refused_with_what_to_set_instead(tmp_path):
    from capfilt.config import ConfigError

    with pytest.raises(ConfigError, match=r"ray\.captioner_actors was removed: .*ray\.min_actors / ray\.max_actors"):
        tiny([], tmp_path, ["ray.captioner_actors=4"])
    with pytest.raises(ConfigError, match=r"ray\.max_shards_in_flight was removed"):
        tiny([], tmp_path, ["ray.max_shards_in_flight=2"])


def no_models(config):
    return config.model_copy(update={"captioner": None, "filter": None, "clip": None})


def test_prefetched_decoding_changes_no_byte(corpus, tmp_path):
    """The next batches are decoded on the worker's threads while the stages run; the batches still
    reach the stages and the writer in the shard's order, so the outputs do not depend on it."""
    from capfilt.runners.worker import ShardWorker

    data, _ = corpus
    urls = [str(p) for p in sorted(data.glob("*.tar"))[:3]]
    results = {}
    for threads in (1, 4):
        config = no_models(tiny([], tmp_path, ["batch_size=2", f"decode_threads={threads}"]))
        with ShardWorker(config, tmp_path / str(threads)) as worker:
            results[threads] = [worker.run(u) for u in urls]
    assert [r["counts"] for r in results[1]] == [r["counts"] for r in results[4]]
    assert all(r["counts"]["input"] > 2 and not r["error"] for r in results[1])  # several batches each
    assert outputs(tmp_path / "1") == outputs(tmp_path / "4")
    assert {"Decode", "Decide", "Write"} <= set(results[4][0]["seconds"])


def test_a_worker_whose_run_lost_the_lock_writes_no_marker(corpus, tmp_path):
    """A worker can outlive its killed driver. Once a rerun holds the output's lock (and has swept
    this shard's files), the orphaned worker must not write a marker that vouches for them, nor
    delete what are now the rerun's files; the worker of the lock's holder commits as usual."""
    from capfilt.io.run_lock import RunLock
    from capfilt.runners.worker import ShardWorker

    url, out = str(corpus[0] / "00000.tar"), tmp_path / "out"
    config = no_models(tiny([], out))
    first_run = RunLock(out)  # the killed driver's token; a rerun now holds the lock
    with RunLock(out):
        with ShardWorker(config, out, owner=first_run.token) as orphan:
            result = orphan.run(url)
        assert result["counts"] is None and "no longer holds the output's lock" in result["error"]
        assert not (out / "_done" / "00000.done").exists()
        assert (out / "shards" / "00000.tar").exists()  # nothing deleted: the rerun's to keep or sweep
    with RunLock(out) as lock, ShardWorker(config, out, owner=lock.token) as worker:
        assert not worker.run(url)["error"]
    assert (out / "_done" / "00000.done").exists()


# --------------------------------------------------------------------------- a real 2-node cluster


@pytest.fixture(scope="class")
def cluster(s3):
    """Head node (the driver) + a node with the workers' resource.

    Ray's own head and worker processes on loopback; torn down however the tests end. Started
    after the S3 server, so its workers inherit the endpoint and credentials.
    """
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        c.add_node(**MODEL_NODE)
        c.wait_for_nodes()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def cluster_config(cluster, inputs, out):
    # The shard workers may only run where MODELS is, i.e. on the model node, never on the head: two
    # of them (one may sit behind the gate while the other does the other shards).
    config = tiny(inputs, out, ["runner=ray", f"ray.actor_resources={{{MODELS}: 1}}", "ray.cpus_per_actor=0.5"])
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
    def test_ray_equals_local_on_a_broken_corpus(self, cluster, corpus, s3_corpus, reference, tmp_path, caplog):
        from capfilt.io.shards import read_shard

        _, info = corpus
        bad = tmp_path / "bad" / "zbad.tar"  # not a tar at all: the shard fails as in the local runner
        bad.parent.mkdir()  # apart from the output folder (an output inside an input's folder is refused)
        bad.write_bytes(b"<html>403 Forbidden</html>")
        with pytest.raises(Exception) as local_error:
            next(read_shard(str(bad)))
        out = s3_output(tmp_path)
        caplog.set_level(logging.INFO, logger="capfilt")
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
        # The summary's time per stage is the workers' own, summed over every shard they did (not
        # a figure the driver measures): the same stages as the local run, each the sum of the
        # seconds the shards' results carried.
        shards = [r.shard_result for r in caplog.records if hasattr(r, "shard_result")]
        assert sorted(r["shard"] for r in shards) == [f"{i:05d}" for i in range(SHARDS)]
        assert set(result.stage_seconds) == set(reference[1].stage_seconds)
        for stage, seconds in result.stage_seconds.items():
            assert seconds == pytest.approx(sum(r["seconds"].get(stage, 0.0) for r in shards), rel=1e-9, abs=1e-9)
        received = next(r.driver_received for r in caplog.records if hasattr(r, "driver_received"))
        assert received < 2000 * (SHARDS + 1)  # counts and seconds per shard, never a batch

    def test_a_local_url_output_is_checked_like_a_path(self, cluster, tmp_path):
        """io/output.py's one rule says what is local: a plain path, file:// and local:// alike are
        probed on every node (here a folder that does not exist, so the probe cannot be written);
        an object-store URL is reachable from every node by itself."""
        import ray

        from capfilt.runners.ray.cluster import check_output_shared

        ray.init(address=cluster.address)
        try:
            missing = tmp_path / "not-made"
            for out in (str(missing), f"file://{missing}", f"local://{missing}"):
                with pytest.raises(FileNotFoundError):
                    check_output_shared(out)
            check_output_shared(f"s3://{BUCKET}/anywhere")
        finally:
            ray.shutdown()

    def test_a_killed_worker_loses_and_duplicates_nothing(self, cluster, corpus, s3_corpus, reference, gate, tmp_path):
        _, info = corpus
        inputs = gated_inputs(s3_corpus, gate)
        out = s3_output(tmp_path)
        job = Job(cluster_config(cluster, inputs, out))
        try:
            wait_for(lambda: committed(out) >= 1, "a first committed shard")
            raylet = raylet_pid(model_node(cluster))

            def workers():
                return [p for p in ray_processes(WORKER) if descends_from(p, raylet)]

            wait_for(lambda: len(workers()) == 2, "two workers (the last job's may be exiting)")
            pid = workers()[0]
            os.kill(pid, signal.SIGKILL)
            # Ray restarts the worker (a new process) and re-runs the shard it lost.
            wait_for(lambda: set(workers()) - {pid} and len(workers()) == 2, "the restarted worker")
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
            wait_for(lambda: len([p for p in ray_processes(WORKER) if descends_from(p, raylet)]) == 2, "both workers")
            workers = set(ray_processes(WORKER))
            # A spare node joins (as an autoscaler would provide one), then the model node dies with
            # every worker and object on it; the workers restart on the spare and redo their shards.
            cluster.add_node(**MODEL_NODE)
            cluster.wait_for_nodes()
            cluster.remove_node(node, allow_graceful=False)  # SIGKILL: a crash, not a drain
            # Its workers notice their raylet is gone and exit.
            wait_for(lambda: not set(ray_processes(WORKER)) & workers, "the node's workers to die")
            assert committed(out) < SHARDS
        finally:
            gate.open()
        assert_complete_and_equal(job.join(), out, info, reference)

    def test_the_pool_grows_with_the_cluster_and_lets_idle_workers_go(
        self, cluster, corpus, s3_corpus, reference, gate, tmp_path
    ):
        """One worker per node. The first worker takes the gated shard and blocks; a node joins (as
        an autoscaler adds one) and the pool, reading the cluster's resources again, starts a worker
        there, which does every other shard while the gate is still shut. With no shard left for it,
        that worker is let go (its resources back to the cluster) before the job ends."""
        _, info = corpus
        inputs = [gate.tar, *(u for u in s3_corpus if not u.endswith(f"/{GATED}.tar"))]  # gated first
        out = s3_output(tmp_path)
        config = cluster_config(cluster, inputs, out)
        config = config.model_copy(update={"ray": config.ray.model_copy(update={"cpus_per_actor": 1.0})})
        job = Job(config)
        try:
            wait_for(lambda: len(ray_processes(WORKER)) == 1, "the first worker")
            assert committed(out) == 0  # it holds the gated shard
            first = set(ray_processes(WORKER))
            cluster.add_node(**MODEL_NODE)
            cluster.wait_for_nodes()
            wait_for(lambda: committed(out) == SHARDS - 1, "the other shards, done by a second worker")
            wait_for(lambda: set(ray_processes(WORKER)) == first, "the idle second worker to be let go")
            assert committed(out) == SHARDS - 1  # the gate is still shut: the job is still running
        finally:
            gate.open()
        assert_complete_and_equal(job.join(), out, info, reference)


# --------------------------------------------------------------------------- a killed driver


@pytest.mark.slow
def test_a_killed_driver_takes_its_ray_along_and_resumes_to_the_same_outputs(
    corpus, s3_corpus, reference, gate, tmp_path
):
    """`capfilt run --runner ray` (a local Ray of its own), SIGKILLed mid-job: its shard workers
    go with it; then run again, to the uninterrupted run's bytes, on a quiet terminal."""
    _, info = corpus
    inputs = gated_inputs(s3_corpus, gate)
    out = s3_output(tmp_path)
    # Two workers: one sits behind the gate while the other does the other shards.
    settings = [*split_thresholds(), "threads=1", "ray.num_cpus=2", "ray.cpus_per_actor=1"]
    cmd = [
        sys.executable,
        "-m",
        "capfilt.cli",
        "run",
        str(RECIPE),
        "--runner",
        "ray",
        "--input",
        *map(str, inputs),
        "--output",
        out,
        *[a for t in settings for a in ("--set", t)],
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen([*cmd, "--quiet"], env=env, stdout=log, stderr=subprocess.STDOUT)
    workers: list[int] = []
    try:
        wait_for(lambda: committed(out) >= 1 or first.poll() is not None, "a first committed shard")
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        workers = [p for p in ray_processes(WORKER) if descends_from(p, first.pid)]
        assert len(workers) == 2
        first.send_signal(signal.SIGKILL)
        first.wait()
        # Nobody shuts that Ray down: it goes down by itself (its processes are bound to the driver's
        # life, and each worker watches the driver's pid).
        wait_for(lambda: not set(ray_processes(WORKER)) & set(workers), "the killed driver's workers to exit")
    finally:
        log.close()
        for pid in workers:  # only if the test failed: whatever of its Ray outlived it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    done_at_kill = committed(out)
    assert 1 <= done_at_kill < SHARDS
    assert_markers_vouch(out, reference[0])  # what the killed run left: complete shards or no marker

    gate.open()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    # The committed shards were skipped. A worker that outlived the killed driver for a moment may
    # have completed one more before the rerun took the lock over (with a marker vouching for it).
    found = re.search(r"(\d+) already complete, (\d+) to do", second.stderr)
    assert found and done_at_kill <= int(found[1]) < SHARDS and int(found[2]) == SHARDS - int(found[1])
    assert "starting a local Ray with 2 CPUs" in second.stderr
    assert "accounting: input" in second.stdout and "OK" in second.stdout
    assert "time per stage" in second.stdout and "Caption" in second.stdout
    # Only capfilt speaks: none of Ray's own lines (its token-auth warning, a core_worker error
    # line, Ray Data's "may hang forever") lands on the progress bar.
    for noise in ("Token authentication", "core_worker.cc", "may hang forever", "(ShardActor pid="):
        assert noise not in second.stderr
    check_accounting(out, info)
    assert outputs(out) == outputs(reference[0])
