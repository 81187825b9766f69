"""What a user can get wrong ends in one or two lines that name it and say what to do, exit 2
(130 on Ctrl-C), no traceback unless --debug; model references are checked before any model
loads, and a start that fails leaves nothing that blocks the corrected rerun."""

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from capfilt.cli import main
from capfilt.modeling.presets import ModelRefError, hub, resolve_blip, resolve_clip
from capfilt.synthetic import main_synth

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "pipelines" / "demo" / "tiny.yaml")


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    main_synth(out, shards=1, per_shard=6, seed=5)
    return out / "00000.tar"


@pytest.fixture(scope="module")
def finished(shard, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "out"
    assert main(["run", TINY, "--input", str(shard), "--output", str(out), "--quiet"]) == 0
    return out


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("capfilt:")]
    assert 1 <= len(lines) <= 2 or code == 0, err
    return code, err


def run_tiny(capsys, shard, out, *extra) -> tuple[int, str]:
    return run_cli(capsys, "run", TINY, "--input", str(shard), "--output", str(out), "--quiet", *extra)


# --------------------------------------------------------------------------- model references


@pytest.mark.parametrize(
    "override, expected",
    [
        ("captioner.model=./no-such-model", "captioner.model ./no-such-model: no such directory"),
        ("filter.model=/no/such/dir", "filter.model /no/such/dir: no such directory"),
        (
            "clip.model=ViT-B-99",
            "clip.model ViT-B-99: not a capfilt preset, a local open_clip directory or an open_clip "
            "architecture (did you mean ViT-B-32?)",
        ),
        ("clip.pretrained=my_checkpoint.pt", "clip.model tiny-clip is a capfilt preset"),
        ("captioner.model=tiny-clip", "captioner.model tiny-clip: the preset is an open_clip model, not a captioner"),
    ],
)
def test_bad_model_reference_fails_before_anything_loads_or_is_written(capsys, shard, tmp_path, override, expected):
    out = tmp_path / "out"
    code, err = run_tiny(capsys, shard, out, "--set", override)
    assert code == 2 and f"capfilt: error: {expected}" in err
    assert not out.exists()  # no run.json, no lock: the corrected rerun starts clean


def test_open_clip_tag_and_file_references(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at import
    with pytest.raises(
        ModelRefError,
        match=r"clip.pretrained nosuchtag: neither a checkpoint file nor a pretrained "
        r"tag of ViT-B-32 \(its tags: openai, ",
    ):
        resolve_clip("ViT-B-32", "nosuchtag")
    with pytest.raises(ModelRefError, match="clip.pretrained /no/such.pt: no such checkpoint file"):
        resolve_clip("ViT-B-32", "/no/such.pt")
    with pytest.raises(ModelRefError, match=r"the hub is unreachable \(HF_HUB_OFFLINE is set\)"):
        resolve_clip("ViT-B-32", "openai")  # a valid tag whose weights are not cached here
    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(b"weights")
    with pytest.raises(ModelRefError, match="is a checkpoint file; name its open_clip architecture as clip.model"):
        resolve_clip(str(checkpoint))
    assert resolve_clip("ViT-B-32", str(checkpoint))[2]["checkpoint"] == str(checkpoint)


def test_an_open_clip_checkpoint_loads_with_its_architecture_named(capsys, shard, tmp_path):
    """clip: {model: ARCH, pretrained: FILE}: the file's weights are what runs and what run.json names."""
    import open_clip
    import torch

    arch = "capfilt-test-tiny-arch"
    cfg = json.loads((ROOT / "models" / "tiny-clip.json").read_text())["model_cfg"]
    (tmp_path / f"{arch}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{arch}.json")
    torch.manual_seed(1)
    torch.save(open_clip.create_model(arch).state_dict(), tmp_path / "ckpt.pt")
    out = tmp_path / "out"
    code, _ = run_tiny(
        capsys,
        shard,
        out,
        "--set",
        "captioner=null",
        "--set",
        f"clip.model={arch}",
        "--set",
        f"clip.pretrained={tmp_path / 'ckpt.pt'}",
    )
    assert code == 0
    clip = json.loads((out / "run.json").read_text())["models"]["clip"]
    assert clip["open_clip"] == arch and clip["checkpoint"] == str(tmp_path / "ckpt.pt") and len(clip["sha256"]) == 64


def test_a_preset_name_never_shadows_a_local_path(capsys, shard, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-blip").mkdir()
    code, err = run_tiny(capsys, shard, tmp_path / "out")
    assert (
        code == 2 and "captioner.model tiny-blip: both a capfilt preset and a directory here; write ./tiny-blip" in err
    )


def test_local_directory_must_hold_a_model(tmp_path):
    with pytest.raises(ModelRefError, match="has no config.json"):
        resolve_blip(str(tmp_path), "filter")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelRefError, match="no weight files"):
        resolve_blip(str(tmp_path), "filter")


def test_hub_id_offline_fails_fast_without_touching_the_network(capsys, shard, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at import
    monkeypatch.setattr(hub, "_probe_hub", lambda: pytest.fail("offline: the hub must not be asked"))
    code, err = run_tiny(
        capsys, shard, tmp_path / "out", "--set", "captioner.model=Salesforce/blip-image-captioning-large"
    )
    assert code == 2
    assert (
        "captioner.model Salesforce/blip-image-captioning-large: not a preset, not a local directory, and the "
        "hub is unreachable (HF_HUB_OFFLINE is set)"
    ) in err


def test_an_unreachable_hub_is_asked_once_and_briefly(monkeypatch):
    with socket.socket() as s:  # a local port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from huggingface_hub import constants

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hub, "_HUB", {})
    for name in ("someone/some-captioner", "tiny-blp"):
        with pytest.raises(ModelRefError, match=rf"the hub is unreachable \(http://127.0.0.1:{port}: "):
            resolve_blip(name, "captioner")
    with pytest.raises(ModelRefError, match=r"tiny-blp: not a preset \(did you mean tiny-blip\?\)"):
        resolve_blip("tiny-blp", "captioner")
    assert list(hub._HUB) == ["reason"]  # asked once


def test_a_cached_hub_model_is_accepted_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--someone--tiny-filter" / "snapshots" / ("0" * 40)
    shutil.copytree(resolve_blip("tiny-blip", "filter").location, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at import
    assert resolve_blip("someone/tiny-filter", "filter").identity == {
        "hub_id": "someone/tiny-filter",
        "revision": "main",
        "commit": "0" * 40,  # the snapshot refs/main names: what loads, and what a resume compares
    }
    # Without offline mode an unreachable hub would be retried for minutes: say how to use the copy.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_HUB", {"reason": "no answer"})
    with pytest.raises(ModelRefError, match="the model is in the local cache; set HF_HUB_OFFLINE=1"):
        resolve_blip("someone/tiny-filter", "filter")


def test_tokenizer_that_does_not_fit_the_model_is_refused(capsys, shard, tmp_path, monkeypatch):
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models", models)
    preset = json.loads((models / "tiny-blip.json").read_text())
    preset["config"]["text_config"]["vocab_size"] = 1000
    (models / "tiny-blip.json").write_text(json.dumps(preset))
    monkeypatch.setenv("CAPFILT_MODELS_DIR", str(models))
    code, err = run_tiny(capsys, shard, tmp_path / "out")
    assert code == 2
    assert "its tokenizer has 241 tokens but the model's vocabulary has 1000 ids" in err


def test_a_config_whose_heads_do_not_divide_the_width_is_refused_when_built():
    import torch
    from transformers import BlipConfig

    from capfilt.modeling.blip import BlipCaptioning, BlipRetrieval

    for tower in ("text_config", "vision_config"):
        config = BlipConfig(**{tower: {"hidden_size": 30, "num_attention_heads": 4}})
        for model_cls in (BlipCaptioning, BlipRetrieval):
            with torch.device("meta"), pytest.raises(ValueError, match="hidden_size 30 is not a multiple of num_"):
                model_cls(config)


def test_vocabulary_rule():
    from capfilt.modeling.presets import check_vocabulary

    check_vocabulary(30524, 30524, "m")
    check_vocabulary(30522, 30524, "m")  # BLIP on the hub: BERT's 30522 tokens, 30524 ids ([DEC], [ENC])
    with pytest.raises(ModelRefError, match="its tokenizer has 30525 tokens but the model's vocabulary has only 30524"):
        check_vocabulary(30525, 30524, "m")
    with pytest.raises(ModelRefError, match="241 tokens but the model's vocabulary has 30524 ids, so it would mostly"):
        check_vocabulary(241, 30524, "m")


def _with_bigger_tokenizer(directory: Path) -> Path:
    """A tiny-blip captioner directory whose saved tokenizer has 300 tokens more than the model."""
    from transformers import AutoProcessor, BertTokenizer, BlipProcessor

    shutil.copytree(resolve_blip("tiny-blip", "captioner").location, directory)
    words = (ROOT / "models" / "tokenizers" / "tiny-wordpiece" / "vocab.txt").read_text().split()
    vocab = directory / "bigger-vocab.txt"
    vocab.write_text("\n".join(words + [f"extra{i}" for i in range(300)]) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab), bos_token="[DEC]", extra_special_tokens={"enc_token": "[ENC]"})
    BlipProcessor(
        image_processor=AutoProcessor.from_pretrained(directory).image_processor, tokenizer=tokenizer
    ).save_pretrained(directory)
    return directory


def test_failed_start_does_not_block_the_corrected_rerun(capsys, shard, tmp_path):
    """A model that passes the reference check but fails to load (here: its tokenizer does not fit)
    stops the start after run.json was written; the rerun with the fixed config replaces it."""
    out = tmp_path / "out"
    broken = _with_bigger_tokenizer(tmp_path / "captioner")
    code, err = run_tiny(capsys, shard, out, "--set", f"captioner.model={broken}")
    assert code == 2
    assert f"captioner.model {broken}: its tokenizer has 541 tokens but the model's vocabulary has only 241 ids" in err
    assert (out / "run.json").is_file() and not list(out.glob("_done/*"))
    code, err = run_tiny(capsys, shard, out)
    assert code == 0
    assert json.loads((out / "run.json").read_text())["models"]["captioner"]["preset"] == "tiny-blip"


# --------------------------------------------------------------------------- resume


def test_refused_resume_names_the_changed_keys(capsys, shard, finished):
    code, err = run_tiny(capsys, shard, finished, "--set", "captioner.top_p=0.5", "--set", "decide.top_m=1")
    assert code == 2
    assert "different config" in err and "changed: captioner.top_p: 0.9 -> 0.5; decide.top_m: 2 -> 1" in err
    assert "rethreshold" not in err and "--fresh" in err


def test_refused_resume_suggests_rethreshold_when_only_decide_changed(capsys, shard, finished):
    code, err = run_tiny(capsys, shard, finished, "--set", "decide.web.itm=0.3")
    assert code == 2
    assert "changed: decide.web.itm: 0.385 -> 0.3" in err
    assert f"capfilt rethreshold {finished} --output NEW_DIR --set decide.web.itm=0.3" in err


def test_rethreshold_into_a_derived_run_of_other_thresholds_names_the_changed_keys(shard, finished, tmp_path):
    """One resume verdict for `run` and `rethreshold` (io/resume.py): the same message, naming keys."""
    from capfilt.io.run_dir import ResumeRefused
    from capfilt.rethreshold import rethreshold

    derived = tmp_path / "derived"
    rethreshold(str(finished), str(derived), overrides=["decide.web.itm=0.3"])
    with pytest.raises(ResumeRefused, match=r"changed: decide\.web\.itm: 0\.3 -> 0\.5"):
        rethreshold(str(finished), str(derived), overrides=["decide.web.itm=0.5"])


# --------------------------------------------------------------------------- input, output, device


def test_a_directory_as_input(capsys, shard, tmp_path):
    code, err = run_tiny(capsys, shard.parent, tmp_path / "out")
    assert code == 2 and "is a directory; name its shards with a glob" in err


def test_output_that_cannot_be_a_directory(capsys, shard, tmp_path):
    (tmp_path / "file").write_text("x")
    code, err = run_tiny(capsys, shard, tmp_path / "file")
    assert code == 2 and f"output {tmp_path / 'file'} is a file, not a directory" in err
    code, err = run_tiny(capsys, shard, tmp_path / "file" / "out")
    assert code == 2 and "is a file, so no directory can be made there" in err


def _unwritable_dir(tmp_path: Path) -> Path | None:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/proc/sys")):
        if candidate.is_dir() and not os.access(candidate, os.W_OK):
            return candidate
    return None  # root on an ordinary file system writes anywhere


def test_output_on_a_path_that_cannot_be_written(capsys, shard, tmp_path):
    folder = _unwritable_dir(tmp_path)
    if folder is None:
        pytest.skip("every folder is writable here (running as root)")
    code, err = run_tiny(capsys, shard, folder / "out")
    assert code == 2 and f"output {folder / 'out'}: {folder} is " in err and "choose another --output" in err


def test_cuda_without_cuda_and_an_unknown_device(capsys, shard, tmp_path):
    import torch

    if not torch.cuda.is_available():
        code, err = run_tiny(capsys, shard, tmp_path / "out", "--device", "cuda")
        assert code == 2 and "capfilt: error: device cuda: no CUDA device is available here" in err
    code, err = run_tiny(capsys, shard, tmp_path / "out", "--device", "gpu")
    assert code == 2 and "device 'gpu': not a device; use auto, cpu, cuda or cuda:N" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- interrupt, --debug, other commands


def test_ctrl_c_is_one_line_exit_130_and_the_lock_is_released(capsys, shard, tmp_path, monkeypatch):
    import capfilt.runners.local

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(capfilt.runners.local, "run_local", interrupted)
    out = tmp_path / "out"
    code = main(["run", TINY, "--input", str(shard), "--output", str(out), "--quiet"])
    assert code == 130
    assert capsys.readouterr().err.strip() == "capfilt: interrupted; rerun the same command to resume"
    assert not (out / "run.lock").exists()


def test_debug_shows_the_traceback(shard, tmp_path):
    with pytest.raises(ModelRefError):
        main(
            [
                "run",
                TINY,
                "--input",
                str(shard),
                "--output",
                str(tmp_path / "o"),
                "--set",
                "filter.model=./nope",
                "--debug",
            ]
        )


@pytest.mark.parametrize("command", ["report", "calibrate"])
def test_report_and_calibrate_on_a_folder_that_is_not_a_run(capsys, tmp_path, command):
    code, err = run_cli(capsys, command, str(tmp_path))
    assert code == 2 and "capfilt: error:" in err and "run.json" in err


def test_models_with_an_empty_presets_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPFILT_MODELS_DIR", str(tmp_path))
    code, err = run_cli(capsys, "models")
    assert code == 2 and f"no model presets (*.json) in {tmp_path} (CAPFILT_MODELS_DIR)" in err


def test_a_missing_config_file_points_at_the_shipped_recipes(capsys, tmp_path):
    code, err = run_cli(capsys, "run", str(tmp_path / "nope.yaml"), "--input", "x.tar", "--output", "o")
    assert code == 2 and "config file not found" in err and "`capfilt recipes`" in err
