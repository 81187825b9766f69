"""The Ray runner's data path at growing job size: does the driver stay flat?

    python -m benchmarks.ray_scale                       # 4, 32, 256 shards of 8 samples, 2 CPUs
    python -m benchmarks.ray_scale --shards 4,32 --per-shard 8 --cpus 2

For each job size, one `capfilt run --runner ray` in a fresh process over the same synthetic
shards (tiny presets): peak RSS of the driver and of every Ray worker process (VmHWM, read from
/proc while the job runs), the bytes the driver received from Ray (envelope blocks and commit
results: metadata only, by design), wall and CPU time. Then the same shards through the local
runner on the same cores, alternated with the Ray runner (best of N each), for Ray's overhead.
Writes its section of docs/benchmarks.md (between `<!-- ray-scale:begin -->` and
`<!-- ray-scale:end -->`; `make bench` keeps it) and prints it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- ray-scale:begin -->", "<!-- ray-scale:end -->"
RECIPE = ROOT / "pipelines" / "demo" / "tiny.yaml"


# --------------------------------------------------------------------------- one job (child process)


class _Received(logging.Handler):
    """Picks up the driver's own count of what it received (run_ray logs it with `extra`)."""

    def __init__(self):
        super().__init__()
        self.received = None

    def emit(self, record):
        if hasattr(record, "driver_received"):
            self.received = (record.driver_received, record.parts_stored)


def child(runner: str, inputs: list[str], out: str, cpus: int) -> None:
    import torch

    from capfilt.config import load_config
    from capfilt.pipeline import run

    torch.set_num_threads(cpus)
    settings = ["decide.mode=laion_coco", f"ray.num_cpus={cpus}"]
    config = load_config(RECIPE, settings).model_copy(update={"input": inputs, "output": out, "runner": runner})
    handler = _Received()
    logging.getLogger("capfilt").addHandler(handler)
    logging.getLogger("capfilt").setLevel(logging.INFO)
    start = time.perf_counter()
    result = run(config, progress=False)
    wall = time.perf_counter() - start
    if not result.ok:
        raise SystemExit(f"the job failed: {result.shard_errors}")
    received, stored = handler.received or (None, None)
    print(
        json.dumps(
            {
                "wall": wall,
                "samples": result.summary["input"],
                "driver_received": received,
                "parts_stored": stored,
                "driver_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


# --------------------------------------------------------------------------- the parent: watch and compare


def _tree(root_pid: int) -> dict[int, str]:
    """pid -> command line of `root_pid` and every process below it."""
    parents, titles = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            titles[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = {}, [root_pid]
    while todo:
        pid = todo.pop()
        found[pid] = titles.get(pid, "")
        todo += [p for p, pp in parents.items() if pp == pid and p not in found]
    return found


def _hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _role(title: str) -> str | None:
    """What a process of the job is, from its command line (Ray titles its workers ``ray::…``)."""
    if title.startswith("ray::"):
        for role in ("CaptionActor", "FilterActor", "ClipActor", "read_shards", "decode", "commit_shard"):
            if role in title:
                return role
        return "ray worker (idle / other)"
    exe = os.path.basename(title.split(" ", 1)[0])
    if exe in ("raylet", "gcs_server"):
        return exe
    return "Ray's helper processes" if "ray" in title else None


def measure(runner: str, inputs: list[str], out: str, cpus: int) -> dict:
    """One job in a fresh process; its process tree watched for peak RSS; CPU time of the whole tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.ray_scale",
            "--child",
            runner,
            "--out",
            out,
            "--cpus",
            str(cpus),
            "--inputs",
            *inputs,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    peaks: dict[int, tuple[int, str]] = {}
    while proc.poll() is None:
        for pid, title in _tree(proc.pid).items():
            hwm = _hwm(pid)
            role = "driver" if pid == proc.pid else _role(title)
            if hwm is None or role is None:
                continue
            old = peaks.get(pid, (0, role))
            # a Ray worker's title changes with the task it runs; keep its most specific role
            keep = old[1] if role == "ray worker (idle / other)" else role
            peaks[pid] = (max(old[0], hwm), keep)
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    _reap_orphans()
    if proc.returncode:
        raise RuntimeError(f"{runner} job failed:\n{stderr[-3000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    by_role: dict[str, list[int]] = {}
    for hwm, role in peaks.values():
        by_role.setdefault(role, []).append(hwm)
    res["peaks"] = {role: {"n": len(v), "max": max(v)} for role, v in sorted(by_role.items())}
    return res


def _reap_orphans(grace: float = 10.0) -> None:
    """Wait for the job's Ray processes, reparented to us (a subreaper), so their CPU time counts."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.1)


def make_shards(directory: Path, shards: int, per_shard: int) -> list[str]:
    from capfilt.synthetic import make_split, write_shards

    examples = make_split("bench", shards * per_shard, seed=0, noise_share=0.3)
    return write_shards(directory, examples, per_shard=per_shard, sidecar=False)


def mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def render(scale: list[dict], compare: dict, info: dict) -> str:
    lines = [
        BEGIN,
        "## The Ray runner's data path at growing job size (`python -m benchmarks.ray_scale`)",
        "",
        f"- Date: {info['date']}; {info['cpu']} ({info['cores']} cores), load average before: "
        f"{info['load']}; local Ray with {info['cpus']} CPUs; tiny presets, laion_coco mode; "
        f"shards of {info['per_shard']} samples",
        "- Peak RSS is VmHWM of each process (MiB); for worker roles, the largest of that role "
        "(n = processes seen). Received: bytes of envelope blocks and commit results the driver got "
        "from Ray; stored: bytes of part files the workers wrote (the batches' outputs).",
        "",
        "| shards | samples | driver peak RSS | received by driver | per shard | parts stored by workers | "
        "workers' peak RSS by role | wall s | CPU s |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in scale:
        roles = "; ".join(f"{role} {mib(p['max'])} (n={p['n']})" for role, p in r["peaks"].items() if role != "driver")
        lines.append(
            f"| {r['shards']} | {r['samples']} | {mib(r['driver_peak_rss'])} | {r['driver_received']:,} | "
            f"{r['driver_received'] / r['shards']:,.0f} | {r['parts_stored']:,} | {roles} | "
            f"{r['wall']:.1f} | {r['cpu']:.1f} |"
        )
    small, big, runs = compare["small"], compare["big"], compare["runs"]
    rows, marginal = [], {}
    for runner in ("local", "ray"):
        a, b = runs[runner, small], runs[runner, big]
        # None when the larger job was not slower: too little work to tell start-up from the rest
        marginal[runner] = (b["samples"] - a["samples"]) / (b["wall"] - a["wall"]) if b["wall"] > a["wall"] else None
        start_up = f"{a['wall'] - a['samples'] / marginal[runner]:.1f}" if marginal[runner] else "n/a"
        rate = f"{marginal[runner]:.1f}" if marginal[runner] else "n/a"
        rows.append(
            f"| {runner} | {b['samples'] / b['wall']:.1f} | {rate} | {start_up} | "
            f"{a['wall']:.1f} / {b['wall']:.1f} | {a['cpu']:.1f} / {b['cpu']:.1f} |"
        )
    overhead = f"{1 - marginal['ray'] / marginal['local']:.0%}" if all(marginal.values()) else "n/a"
    lines += [
        "",
        f"Ray vs local on the same {info['cpus']} cores: the same {small} and {big} shards on both "
        f"runners, alternated, best of {compare['repeats']} each. Marginal samples/s = the extra "
        f"samples of the larger job over its extra wall time (start-up and model loading cancel out).",
        "",
        f"| runner | samples/s ({big} shards, all included) | marginal samples/s | start-up s | "
        f"wall s ({small} / {big} shards) | CPU s ({small} / {big}) |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"- Overhead of Ray at steady state: {overhead} of the local runner's marginal samples/s",
        END,
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    from benchmarks.gpu_report import write_section as write

    write(path, section, BEGIN, END)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ray_scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", default="4,32,256")
    ap.add_argument("--per-shard", type=int, default=8)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--compare-shards", type=int, default=32, help="job size of the Ray vs local comparison")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out-md", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--child", choices=["ray", "local"])
    ap.add_argument("--inputs", nargs="*")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.inputs, args.out, args.cpus)
        return 0
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: Ray's orphans come back to us
    sizes = [int(n) for n in args.shards.split(",")]
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cores": os.cpu_count(),
        "cpus": args.cpus,
        "load": [round(x, 2) for x in os.getloadavg()],
        "per_shard": args.per_shard,
        "cpu": next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "unknown CPU",
        ),
    }
    with tempfile.TemporaryDirectory(prefix="capfilt-ray-scale-") as tmp:
        tmp = Path(tmp)
        shards = make_shards(tmp / "data", max(sizes + [args.compare_shards]), args.per_shard)
        scale = []
        for n in sizes:
            res = measure("ray", shards[:n], str(tmp / f"ray-{n}"), args.cpus)
            res["shards"] = n
            scale.append(res)
            print(f"[{n} shards] {json.dumps(res)}", file=sys.stderr)
        # Same work on both runners, alternated, best of N: a small and a larger job, so that the
        # fixed start-up (Ray, model loading) and the marginal samples/s can be told apart.
        small, big = min(sizes), args.compare_shards
        best: dict[tuple[str, int], dict] = {}
        for i in range(args.repeats):
            for runner in ("local", "ray"):
                for n in (small, big):
                    res = measure(runner, shards[:n], str(tmp / f"cmp-{runner}-{n}-{i}"), args.cpus)
                    print(f"[compare {runner} {n} shards #{i}] {res['wall']:.1f} s", file=sys.stderr)
                    if (runner, n) not in best or res["wall"] < best[runner, n]["wall"]:
                        best[runner, n] = res
        compare = {"small": small, "big": big, "repeats": args.repeats, "runs": best}
    section = render(scale, compare, info)
    write_section(Path(args.out_md), section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
