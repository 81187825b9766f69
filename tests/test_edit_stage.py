"""The edit stage (config section ``edit``): a seq2seq model rewrites each kept sample's selected
caption after Decide. On the tiny T5 preset (models/tiny-t5.json: T5's architecture, small config,
seeded random weights, shipped Unigram vocabulary), through `capfilt run` and `capfilt rethreshold`."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from capfilt.cli import main
from capfilt.config import ConfigError, load_config, parse_config
from capfilt.pipeline import run
from capfilt.synthetic import main_synth

ROOT = Path(__file__).resolve().parents[1]
EDIT = {"model": "tiny-t5", "prompt": "Fix the grammar: ", "max_new_tokens": 12}
SCORES = ("itm", "itc", "clip")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    data = tmp_path_factory.mktemp("edit-corpus")
    main_synth(data, shards=1, per_shard=10, broken=True, seed=4)
    return data


def recipe(tmp_path: Path, **changes) -> Path:
    """The tiny recipe without CLIP (not needed here), thresholds at the median of the tiny
    filter's scores (about half the texts kept), and ``changes`` on top."""
    from thresholds import split_thresholds

    data = yaml.safe_load((ROOT / "pipelines" / "demo" / "tiny.yaml").read_text())
    data.pop("clip")
    for assignment in split_thresholds():
        key, value = assignment.split("=")
        section, source, score = key.split(".")
        data[section][source] = {score: float(value)}
    data.update(changes)
    path = tmp_path / "edit.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def ledger(out: Path) -> list[dict]:
    rows = pq.read_table(sorted((out / "ledger").glob("*.parquet"))).to_pylist()
    return sorted(rows, key=lambda r: (r["shard"], r["key"], r["occurrence"], r["candidate"]))


def members(out: Path) -> dict[str, bytes]:
    found = {}
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            found.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return found


@pytest.fixture(scope="module")
def edited_run(corpus, tmp_path_factory):
    """`capfilt run` with an edit section: batches of 3 images, the editor 2 captions at a time."""
    tmp = tmp_path_factory.mktemp("edited")
    config = recipe(tmp, batch_size=3, edit={**EDIT, "batch_size": 2})
    out = tmp / "out"
    assert main(["run", str(config), "--input", str(corpus / "*.tar"), "--output", str(out), "--quiet"]) == 0
    return config, out


def test_the_selected_caption_is_edited_and_the_original_kept(edited_run):
    _, out = edited_run
    rows = ledger(out)
    files = members(out)
    selected = [r for r in rows if r["selected"]]
    assert selected and any(r["sample_status"] == "rejected" for r in rows)  # some kept, some not
    assert any(r["sample_status"] == "failed" for r in rows)  # the broken samples
    # edited_text on the selected candidate's row of each kept sample, null on every other row
    assert all(r["edited_text"] is not None for r in selected)
    assert all(r["edited_text"] is None for r in rows if not r["selected"])
    # the tiny T5 writes text that depends on its input: rewrites, not copies, and not one string
    assert all(r["edited_text"] != r["text"] for r in selected)
    assert len({r["edited_text"] for r in selected}) > len(selected) // 2
    for r in selected:
        caption = r["edited_text"] or r["text"]  # an empty edit leaves the original as the caption
        assert files[f"{r['key']}.txt"].decode() == caption
        meta = json.loads(files[f"{r['key']}.json"])
        assert meta["caption"] == caption and meta["caption_original"] == r["text"]
        assert r["text"] in [t["text"] for t in meta["texts"]]  # the kept texts as scored
    assert {n.rsplit(".", 1)[0] for n in files} == {r["key"] for r in selected}
    record = json.loads((out / "run.json").read_text())
    assert record["models"]["edit"]["preset"] == "tiny-t5" and record["models"]["edit"]["sha256"]
    assert record["config"]["edit"] == {**EDIT, "revision": None, "num_beams": 1, "batch_size": 2}


def test_batch_sizes_do_not_change_the_edits(corpus, edited_run, tmp_path):
    """Batches of 8 images and the whole batch per generate call, against 3 and 2: the same texts,
    decisions, edits and captions (scores may differ in their last float bits, as everywhere)."""
    config, out = edited_run
    other = load_config(config, ["batch_size=8", "edit.batch_size=null"]).model_copy(
        update={"input": [str(corpus / "00000.tar")], "output": str(tmp_path / "b8")}
    )
    assert run(other, progress=False).ok
    a, b = ledger(out), ledger(tmp_path / "b8")
    assert [{k: v for k, v in r.items() if k not in SCORES} for r in a] == [
        {k: v for k, v in r.items() if k not in SCORES} for r in b
    ]
    txt = lambda files: {n: v for n, v in files.items() if n.endswith(".txt")}
    assert txt(members(out)) == txt(members(tmp_path / "b8"))


def test_edit_keys_are_checked(tmp_path, monkeypatch):
    base = {"filter": {"model": "tiny-blip"}}
    config = parse_config({**base, "edit": {"model": "tiny-t5"}})
    assert config.edit.num_beams == 1 and config.edit.prompt == ""
    assert parse_config(base).edit is None  # off unless set
    with pytest.raises(ConfigError, match=r"edit\.beams: unknown key"):
        parse_config({**base, "edit": {"model": "tiny-t5", "beams": 2}})
    with pytest.raises(ConfigError, match=r"edit\.model: Field required"):
        parse_config({**base, "edit": {"prompt": "Fix: "}})
    with pytest.raises(ConfigError, match=r"edit\.num_beams"):
        parse_config({**base, "edit": {"model": "tiny-t5", "num_beams": 0}})
    # in a recipe, through the CLI: exit 2 with the key named
    path = recipe(tmp_path, edit={**EDIT, "temperature": 0.7})
    assert main(["run", str(path), "--input", str(tmp_path / "none.tar"), "--output", str(tmp_path / "o")]) == 2
    # a model reference that names nothing: refused before anything loads
    from capfilt.modeling.editor import resolve_editor
    from capfilt.modeling.presets import ModelRefError

    with pytest.raises(ModelRefError, match="not a seq2seq"):
        resolve_editor("tiny-blip")
    with pytest.raises(ModelRefError, match="no such directory"):
        resolve_editor(str(tmp_path / "missing"))
    # a hub id takes the captioner's path: from the local cache or a reachable hub, else one line
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at import
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(ModelRefError, match=r"edit\.model google/flan-t5-small: .*hub is unreachable"):
        resolve_editor("google/flan-t5-small")


def test_a_stock_saved_directory_loads_as_a_user_model_would(tmp_path):
    """A directory written by the stock save_pretrained (a hub model's layout, e.g. a downloaded
    google/flan-t5-small) goes through AutoModelForSeq2SeqLM / AutoTokenizer and edits exactly as
    the preset it was saved from; greedy and beam search are batch-independent."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from capfilt.modeling.editor import Editor, resolve_editor

    preset = resolve_editor("tiny-t5").location
    saved = tmp_path / "my-t5"
    AutoModelForSeq2SeqLM.from_pretrained(preset).save_pretrained(saved)
    AutoTokenizer.from_pretrained(preset).save_pretrained(saved)
    texts = [
        "a red circle on the left",
        "two blue squares",
        "x",
        "three small yellow triangles at the bottom",
        "cheap free shipping buy now",
    ]
    mine = Editor(str(saved), device="cpu", prompt="Fix the grammar: ", max_new_tokens=10)
    assert mine.identity["path"] == str(saved.resolve()) and mine.identity["sha256"]
    edits = mine.edit(texts)
    assert edits == Editor("tiny-t5", device="cpu", prompt="Fix the grammar: ", max_new_tokens=10).edit(texts)
    assert edits == [mine.edit([t])[0] for t in texts]
    beams = Editor(str(saved), device="cpu", prompt="Fix the grammar: ", max_new_tokens=10, num_beams=3, batch_size=2)
    assert beams.edit(texts) == [beams.edit([t])[0] for t in texts]


def test_a_sample_the_editor_raises_on_fails_alone(corpus, tmp_path):
    """A batch the edit model raises on is retried one sample at a time: the poisonous sample fails
    (model_error), its batch-mates are edited."""
    from capfilt.runners.local import row_batches
    from capfilt.stages import Edit, build_stages, run_stages

    config = load_config(recipe(tmp_path, edit=EDIT))
    stages = build_stages(config)
    edit = next(s for s in stages if isinstance(s, Edit))
    real = edit.editor.edit
    batch = run_stages(stages[:-1], next(row_batches(str(corpus / "00000.tar"), config, 16)), {})
    kept = [i for i in range(len(batch["key"])) if batch["status"][i] == "kept" and not batch["failure"][i]]
    assert len(kept) >= 2
    poison = (
        batch["web_text"][kept[0]]
        if batch["selected"][kept[0]] == 0
        else batch["captions"][kept[0]][batch["selected"][kept[0]] - 1]
    )

    def edit_or_raise(texts):
        if poison in texts:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(texts)

    edit.editor.edit = edit_or_raise
    out = edit(batch)
    assert out["failure"][kept[0]] == "model_error" and "illegal memory access" in out["detail"][kept[0]]
    assert all(out["edited"][i] is not None and not out["failure"][i] for i in kept[1:])


# --------------------------------------------------------------------------- rethreshold


def test_rethreshold_keeps_the_edits_of_an_unchanged_selection_and_refuses_a_changed_one(edited_run, tmp_path):
    from capfilt.rethreshold import EditNotRedoable, rethreshold

    _, out = edited_run
    same = rethreshold(str(out), str(tmp_path / "same"))  # the run's own policy: nothing to redo
    assert same["kept"] == json.loads((out / "summary.json").read_text())["kept"]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in SCORES} for r in rows]
    assert strip(ledger(tmp_path / "same")) == strip(ledger(out))
    txt = lambda files: {n: v for n, v in files.items() if n.endswith(".txt")}
    assert txt(members(tmp_path / "same")) == txt(members(out))

    # Everything kept: the samples rejected before now select a caption nobody edited.
    with pytest.raises(EditNotRedoable, match=r"kept sample\(s\) select a caption that run did not edit"):
        rethreshold(str(out), str(tmp_path / "looser"), overrides=["decide.web.itm=0", "decide.synthetic.itm=0"])
    assert not (tmp_path / "looser").exists()  # refused before anything was written
    assert (
        main(
            [
                "rethreshold",
                str(out),
                "--output",
                str(tmp_path / "looser"),
                "--set",
                "decide.web.itm=0",
                "--set",
                "decide.synthetic.itm=0",
            ]
        )
        == 2
    )
    # Rejecting everything needs no edit: allowed, and nothing is edited.
    none = rethreshold(str(out), str(tmp_path / "stricter"), overrides=["decide.web.itm=1", "decide.synthetic.itm=1"])
    assert none["kept"] == 0 and all(r["edited_text"] is None for r in ledger(tmp_path / "stricter"))


def test_the_report_shows_the_rewrite_beside_the_original(edited_run, tmp_path):
    from capfilt.report import build_report

    _, out = edited_run
    edits = [r["edited_text"] for r in ledger(out) if r["edited_text"]]
    html = build_report(out, tmp_path / "r.html", show=["web-kept", "random"], date=False).read_text()
    assert edits and 'class="edit">edited: ' in html
