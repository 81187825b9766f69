"""End to end on real shards: accounting over a broken corpus, outputs, resume, rethreshold."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from thresholds import split_thresholds

from capfilt.config import load_config
from capfilt.pipeline import run
from capfilt.rethreshold import rethreshold
from capfilt.synthetic import main_synth


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    info = main_synth(out, shards=3, per_shard=20, broken=True, seed=3)
    return out, info


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory, tiny):
    data, _ = corpus
    out = tmp_path_factory.mktemp("run")
    result = run(tiny(sorted(data.glob("*.tar")), out), progress=False)
    return out, result


def ledger(out: Path):
    return pq.read_table(sorted((out / "ledger").glob("*.parquet"))).to_pylist()


def test_every_sample_is_accounted_for(corpus, finished):
    data, info = corpus
    out, result = finished
    assert result.ok
    rows = ledger(out)
    samples = {(r["shard"], r["key"], r["occurrence"]): r["sample_status"] for r in rows}
    total = 0
    for stats_file in (out / "stats").glob("*.json"):
        s = json.loads(stats_file.read_text())
        assert s["input"] == s["kept"] + s["rejected"] + s["failed"]
        assert s["input"] == sum(1 for k in samples if k[0] == s["shard"])
        total += s["input"]
    summary = result.summary
    assert summary["input"] == summary["kept"] + summary["rejected"] + summary["failed"] == total
    # Every sample written to the corpus (duplicates and the truncated one included) is in the ledger.
    written = sum(1 for _ in data.glob("*.tar")) and info["samples"]
    assert total == written
    assert summary["kept"] > 0 and summary["rejected"] > 0 and summary["failed"] > 0


def test_broken_samples_carry_their_expected_reason(corpus, finished):
    data, _ = corpus
    out, _ = finished
    by_sample = {}
    for r in ledger(out):
        by_sample.setdefault((r["shard"], r["key"], r["occurrence"]), []).append(r)
    manifest = json.loads((data / "broken_manifest.json").read_text())
    assert len(manifest) >= 15
    for entry in manifest:
        rows = by_sample[(entry["shard"], entry["key"], entry["occurrence"])]
        reasons = {r["reason"] for r in rows}
        if entry["expected"] is None:  # odd but valid image (CMYK, 16-bit, EXIF-rotated, ...): scored
            assert rows[0]["candidate"] != -1, entry
        else:
            assert entry["expected"] in reasons, (entry, reasons)


def test_ledger_has_one_row_per_candidate(finished, tiny_recipe):
    out, _ = finished
    k = load_config(tiny_recipe).captioner.num_captions
    per_sample = {}
    for r in ledger(out):
        per_sample.setdefault((r["shard"], r["key"], r["occurrence"]), []).append(r)
    for rows in per_sample.values():
        if rows[0]["candidate"] == -1:
            assert len(rows) == 1 and rows[0]["sample_status"] == "failed" and rows[0]["reason"]
        else:
            assert sorted(r["candidate"] for r in rows) == list(range(k + 1))
            assert sum(r["selected"] for r in rows) == (1 if rows[0]["sample_status"] == "kept" else 0)
            assert all(r["kept"] == (r["reason"] == "") for r in rows)


def test_cleaned_shards_read_back_with_webdataset_and_ray(finished):
    out, _ = finished
    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    kept = {(r["shard"], r["key"]) for r in ledger(out) if r["sample_status"] == "kept"}
    seen = []
    for tar in tars:
        for sample in wds.WebDataset(tar, shardshuffle=False):
            meta = json.loads(sample["json"])
            assert sample["txt"].decode() == meta["caption"]
            assert any(t["text"] == meta["caption"] for t in meta["texts"])
            seen.append((Path(tar).stem, sample["__key__"]))
    assert sorted(seen) == sorted(kept)
    assert len({k for _, k in seen}) == len(seen)  # no key in two output shards

    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        # Raw bytes: the shards keep each image's original format (jpg, png, webp ... side by side),
        # and Ray's default decoder cannot stack a column that some samples lack into one tensor.
        ds = ray.data.read_webdataset(tars, decoder=None)
        assert ds.count() == len(kept)
    finally:
        ray.shutdown()


def test_rethreshold_equals_a_fresh_run_with_the_new_policy(corpus, finished, tiny, tmp_path):
    data, _ = corpus
    out, _ = finished
    new = [*split_thresholds(web=0.8, synthetic=0.2), "decide.top_m=1"]  # stricter web, looser synthetic
    summary = rethreshold(str(out), str(tmp_path / "re"), overrides=new)
    assert summary["input"] == json.loads((out / "summary.json").read_text())["input"]
    direct = run(tiny(sorted(data.glob("*.tar")), tmp_path / "direct", new), progress=False)
    assert direct.summary["kept"] == summary["kept"]
    key = lambda r: (r["shard"], r["key"], r["occurrence"], r["candidate"])
    a, b = sorted(ledger(tmp_path / "re"), key=key), sorted(ledger(tmp_path / "direct"), key=key)
    assert [(r["kept"], r["reason"], r["selected"], r["text"]) for r in a] == [
        (r["kept"], r["reason"], r["selected"], r["text"]) for r in b
    ]


def test_resume_refuses_a_changed_config_unless_fresh(corpus, finished, tiny):
    data, _ = corpus
    out, _ = finished
    from capfilt.io.run_dir import ResumeRefused

    with pytest.raises(ResumeRefused, match="different config"):
        run(tiny(sorted(data.glob("*.tar")), out, ["captioner.top_p=0.5"]), progress=False)
    # Same config again: nothing to do, same summary.
    again = run(tiny(sorted(data.glob("*.tar")), out), progress=False)
    assert again.summary["input"] == json.loads((out / "stats" / "00000.json").read_text())["input"] + sum(
        json.loads(p.read_text())["input"] for p in (out / "stats").glob("*.json") if p.stem != "00000"
    )


def _outputs(out: Path):
    rows = sorted(ledger(out), key=lambda r: (r["shard"], r["key"], r["occurrence"], r["candidate"]))
    tars = {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}
    return rows, tars


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_outputs(tmp_path, tiny_recipe, fifo_gate):
    """`capfilt run` SIGKILLed in the middle of a shard, then run again, writes what one whole run
    writes. A gate, not a clock, places the kill: shard 00001's sidecar is a FIFO, so the killed run
    commits shard 00000, opens shard 00001's outputs (temporaries) and waits reading it until it is
    killed; the gate opens for the resumed run."""
    data = tmp_path / "data"
    main_synth(data, shards=4, per_shard=4, seed=5)
    (data / "00001.parquet").unlink()  # the gate's place: every run reads shard 00001 without a sidecar
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "capfilt.cli",
        "run",
        str(tiny_recipe),
        "--input",
        str(data / "*.tar"),
        "--quiet",
        *[a for t in split_thresholds() for a in ("--set", t)],
    ]
    subprocess.run([*cmd, "--output", str(tmp_path / "whole")], check=True, env=env, capture_output=True)

    gate = fifo_gate(data / "00001.parquet")
    killed = tmp_path / "killed"
    log = tmp_path / "killed.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([*cmd, "--output", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        # The gate decides where the run stops; a run that never gets there is a hang (pytest-timeout).
        while not ((killed / "_done" / "00000.done").exists() and list(killed.rglob("00001*.tmp-*"))):
            assert proc.poll() is None, f"the run ended before it reached the gate: {log.read_text()[-2000:]}"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert sorted(p.name for p in (killed / "_done").iterdir()) == ["00000.done"]

    gate.open()
    subprocess.run([*cmd, "--output", str(killed)], check=True, env=env, capture_output=True)
    assert not list(killed.rglob("*.tmp-*"))
    assert _outputs(killed) == _outputs(tmp_path / "whole")


def test_batch_size_does_not_change_any_output(tmp_path, tiny):
    data = tmp_path / "data"
    main_synth(data, shards=1, per_shard=12, seed=9)
    one = run(tiny([data / "00000.tar"], tmp_path / "b1", ["batch_size=1"]), progress=False)
    eight = run(tiny([data / "00000.tar"], tmp_path / "b8", ["batch_size=8"]), progress=False)
    assert one.ok and eight.ok
    (a, tars_a), (b, tars_b) = _outputs(tmp_path / "b1"), _outputs(tmp_path / "b8")
    scores = ("itm", "itc", "clip")
    # Texts (captions included) and decisions are identical; scores may differ in the last float
    # bits because matrix kernels block differently for different batch shapes.
    assert [{k: v for k, v in r.items() if k not in scores} for r in a] == [
        {k: v for k, v in r.items() if k not in scores} for r in b
    ]
    for ra, rb in zip(a, b):
        for s in scores:
            assert (ra[s] is None) == (rb[s] is None) and (ra[s] is None or abs(ra[s] - rb[s]) < 1e-5)
    assert tars_a.keys() == tars_b.keys()


def test_laion_coco_mode_exports_its_columns(corpus, tiny, tmp_path):
    data, _ = corpus
    extra = ["decide.mode=laion_coco", "decide.web={}", "decide.synthetic={}", "captioner.num_captions=4"]
    result = run(tiny([data / "00000.tar"], tmp_path / "laion", extra, thresholds=()), progress=False)
    assert result.ok
    table = pq.read_table(tmp_path / "laion" / "laion" / "00000.parquet").to_pylist()
    assert table and set(table[0]) >= {"URL", "TEXT", "top_caption", "all_captions", "all_similarities", "similarity"}
    for row in table:
        if row["all_captions"]:
            best = max(range(len(row["all_similarities"])), key=row["all_similarities"].__getitem__)
            assert row["top_caption"] == row["all_captions"][best]
            assert row["similarity"] == pytest.approx(max(row["all_similarities"]))
    # The selected caption of each kept image is its top CLIP caption.
    selected = {r["key"]: r["text"] for r in ledger(tmp_path / "laion") if r["selected"]}
    for row in table:
        if row["key"] in selected and row["top_caption"]:
            assert selected[row["key"]] == row["top_caption"]


def test_cascade_skips_itm_outside_its_band_and_keeps_itm_inside(corpus, finished, tiny, tmp_path):
    """filter.cascade: ITC below the band rejects without ITM, above accepts without ITM, inside
    the band ITM decides with the same score as a run without the cascade."""
    data, _ = corpus
    out, _ = finished
    key = lambda r: (r["shard"], r["key"], r["occurrence"], r["candidate"])
    full = {key(r): r for r in ledger(out)}
    itcs = sorted(r["itc"] for r in full.values() if r["itc"] is not None)
    lo, hi = itcs[len(itcs) // 3], itcs[2 * len(itcs) // 3]
    cascade = [f"filter.cascade.itc_low={lo!r}", f"filter.cascade.itc_high={hi!r}"]
    result = run(tiny(sorted(data.glob("*.tar")), tmp_path / "cascade", cascade), progress=False)
    assert result.ok
    rows = ledger(tmp_path / "cascade")
    assert len(rows) == len(full)
    seen = {"below": 0, "band": 0, "above": 0}
    for r in rows:
        before = full[key(r)]
        if r["itc"] is None:  # never scored (failed sample, empty text): same as without the cascade
            assert before["itc"] is None and r["reason"] == before["reason"]
            continue
        assert abs(r["itc"] - before["itc"]) < 1e-5
        if r["itc"] < lo:
            seen["below"] += 1
            assert r["itm"] is None and r["reason"] == "itc_below_cascade" and not r["kept"]
        elif r["itc"] > hi:
            seen["above"] += 1
            assert r["itm"] is None and r["reason"] in ("", "not_in_top_m")
        else:
            seen["band"] += 1
            assert abs(r["itm"] - before["itm"]) < 1e-5 and r["reason"] == before["reason"]
    assert all(seen.values()), seen
    for s in (json.loads(p.read_text()) for p in (tmp_path / "cascade" / "stats").glob("*.json")):
        assert s["input"] == s["kept"] + s["rejected"] + s["failed"]


def test_cascade_bounds_must_be_ordered(tiny_recipe):
    from capfilt.config import ConfigError

    with pytest.raises(ConfigError, match="itc_low"):
        load_config(tiny_recipe, ["filter.cascade.itc_low=0.5", "filter.cascade.itc_high=0.1"])
