"""A hub model is recorded by the commit its revision resolved to, loads that commit, and a `main`
that moved since the run started refuses the resume like any changed weight.

There is no hub here: the models sit in a hub cache laid out as huggingface_hub lays it out
(``models--org--name/refs/main`` naming ``snapshots/<commit>/``), read offline."""

import shutil
from pathlib import Path

import pytest

from capfilt.cli import main
from capfilt.modeling.editor import resolve_editor
from capfilt.modeling.presets import ModelRefError, resolve_blip
from capfilt.synthetic import main_synth

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "pipelines" / "demo" / "tiny.yaml")
FIRST, SECOND = "1" * 40, "2" * 40


def publish(cache: Path, repo: str, source: str, commit: str, ref: str = "main") -> None:
    """``source``'s files as snapshot ``commit`` of ``repo``, with ``refs/<ref>`` pointing at it."""
    base = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(source, base / "snapshots" / commit)
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / ref).write_text(commit)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at its import
    return cache


def test_a_hub_model_is_recorded_and_loaded_by_commit(hub):
    publish(hub, "someone/tiny-filter", resolve_blip("tiny-blip", "filter").location, FIRST)
    ref = resolve_blip("someone/tiny-filter", "filter")
    assert ref.identity == {"hub_id": "someone/tiny-filter", "revision": "main", "commit": FIRST}
    assert (ref.location, ref.revision) == ("someone/tiny-filter", FIRST)  # from_pretrained loads that commit


def test_a_revision_is_accepted_in_the_config_key_or_in_the_id(hub):
    """``org/name@revision`` names a revision where a config has no revision key (start_med)."""
    source = resolve_blip("tiny-blip", "captioner").location
    publish(hub, "someone/tiny-captioner", source, FIRST)
    publish(hub, "someone/tiny-captioner", source, SECOND, ref="v2")
    for name, revision in (("someone/tiny-captioner", "v2"), ("someone/tiny-captioner@v2", None)):
        ref = resolve_blip(name, "captioner", revision)
        assert ref.identity == {"hub_id": "someone/tiny-captioner", "revision": "v2", "commit": SECOND}
    assert resolve_blip(f"someone/tiny-captioner@{FIRST}", "captioner").identity["commit"] == FIRST
    with pytest.raises(ModelRefError, match="names revision 'v2' but the config's revision is 'main'"):
        resolve_blip("someone/tiny-captioner@v2", "captioner", "main")
    publish(hub, "someone/tiny-editor", resolve_editor("tiny-t5").location, SECOND, ref="v2")
    assert resolve_editor("someone/tiny-editor@v2").identity["commit"] == SECOND


def test_a_moved_main_refuses_the_resume(hub, tmp_path, capsys):
    main_synth(tmp_path / "corpus", shards=2, per_shard=4, seed=5)
    shards = str(tmp_path / "corpus" / "{00000..00001}.tar")
    filter_dir = resolve_blip("tiny-blip", "filter").location
    publish(hub, "someone/tiny-filter", filter_dir, FIRST)
    out = tmp_path / "out"
    run = ["run", TINY, "--input", shards, "--output", str(out), "--quiet", "--set", "filter.model=someone/tiny-filter"]
    assert main(run) == 0
    (out / "_done" / "00001.done").unlink()  # an interrupted run: one shard left to do

    # The same files under a new commit: the hub's main moved, so this is another model.
    shutil.copytree(filter_dir, hub / "models--someone--tiny-filter" / "snapshots" / SECOND)
    (hub / "models--someone--tiny-filter" / "refs" / "main").write_text(SECOND)
    capsys.readouterr()
    assert main(run) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different config or models" in err
    assert f"models.filter.commit: {FIRST} -> {SECOND}" in err
    assert not (out / "_done" / "00001.done").exists()  # nothing ran

    # main back on the commit that ran: the resume goes on.
    (hub / "models--someone--tiny-filter" / "refs" / "main").write_text(FIRST)
    assert main(run) == 0
    assert (out / "_done" / "00001.done").exists()


def test_a_worker_loads_the_commit_its_run_recorded_after_main_moved(hub, tmp_path):
    """The driver resolves a hub id once and records its commit; a shard worker started later (a
    restarted Ray actor, a node that joined) loads that commit, not the one ``main`` names by then."""
    from capfilt.config import load_config
    from capfilt.runners.worker import ShardWorker

    main_synth(tmp_path / "corpus", shards=1, per_shard=2, seed=5)
    filter_dir = resolve_blip("tiny-blip", "filter").location
    publish(hub, "someone/tiny-filter", filter_dir, FIRST)
    out = tmp_path / "out"
    args = ["run", TINY, "--input", str(tmp_path / "corpus" / "00000.tar"), "--output", str(out), "--quiet"]
    assert main([*args, "--set", "filter.model=someone/tiny-filter"]) == 0
    shutil.copytree(filter_dir, hub / "models--someone--tiny-filter" / "snapshots" / SECOND)
    (hub / "models--someone--tiny-filter" / "refs" / "main").write_text(SECOND)  # main moved

    config = load_config(TINY, ["filter.model=someone/tiny-filter", "captioner=null", "clip=null"])
    with ShardWorker(config, out) as worker:  # a worker of that run: the commit run.json recorded
        (loaded,) = [s.filter for s in worker.stages if getattr(s, "filter", None)]
        assert (loaded.ref.revision, loaded.ref.identity["commit"]) == (FIRST, FIRST)
    with ShardWorker(config, tmp_path / "elsewhere") as worker:  # no run recorded there: main now
        (loaded,) = [s.filter for s in worker.stages if getattr(s, "filter", None)]
        assert loaded.ref.revision == SECOND


def test_every_hub_model_kind_records_its_commit(hub):
    """A captioner of another family and a LAION head take the same hub path: pinned by commit."""
    from capfilt.modeling.families import resolve
    from capfilt.modeling.heads import resolve_head

    publish(hub, "someone/tiny-git", resolve("tiny-git").location, FIRST)
    resolved = resolve("someone/tiny-git@main")
    assert resolved.identity == {"hub_id": "someone/tiny-git", "revision": "main", "commit": FIRST, "family": "git"}
    assert (resolved.location, resolved.revision) == ("someone/tiny-git", FIRST)

    publish(hub, "someone/tiny-watermark", str(resolve_head("tiny-watermark", "watermark.model")[0]), SECOND)
    directory, identity = resolve_head("someone/tiny-watermark", "watermark.model")
    assert identity == {"hub_id": "someone/tiny-watermark", "revision": "main", "commit": SECOND}
    assert directory.name == SECOND  # the snapshot it loads


def test_an_open_clip_hub_model_takes_a_revision(hub):
    """open_clip's ``hf-hub:`` ids take no revision; ``hf-hub:org/name@revision`` loads that commit's
    snapshot as a local open_clip directory."""
    from capfilt.modeling.clip_reranker import ClipReranker
    from capfilt.modeling.presets import resolve_clip

    local = resolve_clip("tiny-clip")[0].removeprefix("local-dir:")
    publish(hub, "someone/tiny-clip", local, FIRST)
    publish(hub, "someone/tiny-clip", local, SECOND, ref="v2")
    name, _, identity = resolve_clip("hf-hub:someone/tiny-clip")  # main: its commit's snapshot loads
    assert name == f"local-dir:{hub / 'models--someone--tiny-clip' / 'snapshots' / FIRST}"
    assert (identity["revision"], identity["commit"]) == ("main", FIRST)
    name, _, identity = resolve_clip("hf-hub:someone/tiny-clip@v2")
    assert name == f"local-dir:{hub / 'models--someone--tiny-clip' / 'snapshots' / SECOND}"
    assert (identity["revision"], identity["commit"]) == ("v2", SECOND)
    reranker = ClipReranker("hf-hub:someone/tiny-clip@v2", device="cpu")
    assert reranker.identity == identity and reranker.check  # loaded, and it agrees with open_clip's own encoders
