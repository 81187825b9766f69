"""Captioner families (capfilt/modeling/families): `capfilt run` with each family's tiny preset,
captions independent of batch size, the load-time check against the stock `generate`, and one-line
errors for references that name no captioner."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from thresholds import split_thresholds

from capfilt.config import CaptionerConfig, load_config
from capfilt.modeling.families import FamilyCaptioner, build_captioner, resolve
from capfilt.modeling.presets import ModelRefError
from capfilt.modeling.selfcheck import ModelMismatch
from capfilt.pipeline import model_identities, run
from capfilt.synthetic import main_synth

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {
    "coca": "coca",
    "git": "git",
    "blip2": "image-text-to-text",
    "smolvlm": "image-text-to-text",
    "qwen2vl": "image-text-to-text",
}
CHAT = {"instruction": "Describe the image.", "prompt": ""}
TINY = ["tiny-git", "tiny-blip2", "tiny-smolvlm", "tiny-qwen2vl", "tiny-coca"]


def chat(model: str) -> dict:
    return CHAT if model in ("tiny-smolvlm", "tiny-qwen2vl") else {}


def recipe(name: str) -> Path:
    return ROOT / "pipelines" / "demo" / f"captioner-{name}.yaml"


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    data = tmp_path_factory.mktemp("families")
    main_synth(data, shards=1, per_shard=6, seed=11)
    return data / "00000.tar"


def _run(name, shard, out, *extra):
    config = load_config(recipe(name), [*split_thresholds(), *extra])
    config = config.model_copy(update={"input": [str(shard)], "output": str(out)})
    return run(config, progress=False)


def _captions(out: Path) -> list:
    rows = pq.read_table(sorted((out / "ledger").glob("*.parquet"))).to_pylist()
    return sorted((r["key"], r["candidate"], r["text"]) for r in rows if r["candidate"] > 0)


@pytest.fixture(scope="module")
def local(shard, tmp_path_factory):
    """Each family's local run at batch size 1 (output folder), made once for this module."""
    done = {}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp(f"local-{name}")
            assert _run(name, shard, out, "batch_size=1").ok
            done[name] = out
        return done[name]

    return get


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_run_with_each_family_accounts_for_every_sample_and_ignores_batch_size(name, shard, local, tmp_path):
    five = _run(name, shard, tmp_path / "b5", "batch_size=5")
    assert five.ok
    s = five.summary
    assert s["input"] == s["kept"] + s["rejected"] + s["failed"] == 6
    k = load_config(recipe(name)).captioner.num_captions
    captions = _captions(tmp_path / "b5")
    assert len(captions) == k * (s["input"] - s["failed"]) and any(text for _, _, text in captions)
    assert captions == _captions(local(name))  # byte-identical at batch sizes 1 and 5
    identity = json.loads((tmp_path / "b5" / "run.json").read_text())["models"]["captioner"]
    assert identity["family"] == FAMILIES[name] and identity["preset"] == f"tiny-{name}"


@pytest.mark.slow
def test_every_family_on_ray_writes_the_local_captions(shard, local, tmp_path):
    """The Caption stage is one Ray actor pool whatever the family: same captions as the local runner."""
    for name in sorted(FAMILIES):
        result = _run(name, shard, tmp_path / name, "runner=ray", "ray.num_cpus=2", "batch_size=2")
        assert result.ok, result.shard_errors
        assert _captions(tmp_path / name) == _captions(local(name))


def test_blip_stays_the_default_fast_path_with_its_identity_unchanged():
    from capfilt.modeling.captioner import Captioner

    config = load_config(ROOT / "pipelines" / "demo" / "tiny.yaml")
    assert "family" not in model_identities(config)["captioner"]  # resuming older runs keeps its fingerprint
    assert "family" not in config.captioner.model_dump()
    assert isinstance(build_captioner(config.captioner, device="cpu", self_check=False), Captioner)


def _family(model, **kw):
    cfg = CaptionerConfig(model=model, num_captions=2, min_new_tokens=1, max_new_tokens=6, **kw)
    return build_captioner(cfg, device="cpu")


IMAGES = [np.random.default_rng(i).integers(0, 255, (40, 48 + 24 * i, 3), dtype=np.uint8) for i in range(3)]


@pytest.mark.parametrize("model", TINY)
def test_schedule_and_forced_end_of_sequence_apply_to_every_family(model):
    extra = chat(model)
    short = build_captioner(
        CaptionerConfig(
            model=model,
            min_new_tokens=0,
            schedule=[{"n": 2, "max_new_tokens": 1}, {"n": 1, "max_new_tokens": 8}],
            **extra,
        ),
        device="cpu",
        self_check=False,
    )
    caps = short.caption(IMAGES, [1, 2, 3])
    assert all(len(c[0].split()) <= 1 and len(c[1].split()) <= 1 for c in caps)  # one token at most
    assert any(len(c[2].split()) > 1 for c in caps)
    forced = build_captioner(
        CaptionerConfig(model=model, num_captions=2, min_new_tokens=3, force_eos_prob=1e-9, **extra),
        device="cpu",
        self_check=False,
    )
    assert forced.caption(IMAGES, [1, 2, 3]) == [["", ""]] * 3  # EOS forced at the first step


@pytest.mark.parametrize("model", TINY)
def test_load_time_check_refuses_capfilt_side_drift(model, monkeypatch):
    extra = chat(model)
    family = _family(model, **extra).family  # passes as shipped
    cls = type(family)
    step = cls.step

    def drifted(self, tokens, state, position):  # e.g. a cache handed back wrongly: logits change
        logits = step(self, tokens, state, position)
        return logits + torch.linspace(0, 50, logits.shape[-1], device=logits.device)

    monkeypatch.setattr(cls, "step", drifted)
    with pytest.raises(ModelMismatch, match="disagrees with .* on the load-time probe") as err:
        _family(model, **extra)
    assert "\n" not in str(err.value)


def test_load_time_check_refuses_stock_side_drift(monkeypatch):
    import open_clip
    from transformers import Blip2ForConditionalGeneration, GitForCausalLM

    for cls, model in ((GitForCausalLM, "tiny-git"), (Blip2ForConditionalGeneration, "tiny-blip2")):
        generate = cls.generate

        def upstream(self, *args, _generate=generate, **kw):  # a new release decodes differently
            from transformers import LogitsProcessorList, SequenceBiasLogitsProcessor

            bias = SequenceBiasLogitsProcessor({(7,): 100.0})
            return _generate(self, *args, logits_processor=LogitsProcessorList([bias]), **kw)

        monkeypatch.setattr(cls, "generate", upstream)
        with pytest.raises(ModelMismatch, match="greedy token"):
            _family(model)
        monkeypatch.undo()

    def coca_upstream(self, image, text=None, seq_len=30, **kw):
        return torch.cat([text, torch.full((len(text), seq_len - text.shape[1]), 7)], dim=1)

    monkeypatch.setattr(open_clip.CoCa, "generate", coca_upstream, raising=False)
    with pytest.raises(ModelMismatch, match="CoCa.generate"):
        _family("tiny-coca")


def test_family_is_read_from_the_checkpoint_and_a_mismatch_refused():
    assert resolve("tiny-blip2").family == "image-text-to-text"
    assert resolve("tiny-coca").family == "coca" and resolve("tiny-git").family == "git"
    assert resolve("tiny-blip").family == "blip"
    with pytest.raises(ModelRefError, match="captioner.family git, but the checkpoint is a image-text-to-text"):
        resolve("tiny-blip2", "git")


def _one_line(call, match):
    with pytest.raises(ModelRefError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def test_bad_references_and_unsupported_architectures_fail_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at import
    _one_line(lambda: resolve("no-such-org/no-such-captioner"), "hub is unreachable")
    _one_line(lambda: resolve("tiny-t5"), "the preset is a t5 model, not a captioner")
    _one_line(lambda: resolve("tiny-clip"), "open_clip model, not a captioner")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    _one_line(lambda: resolve(str(bert)), "a BertModel \\(bert\\) is not a captioner capfilt can run")
    both = tmp_path / "both"
    both.mkdir()
    (both / "config.json").write_text(json.dumps({"model_type": "git"}))
    (both / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"multimodal_cfg": {}}}))
    _one_line(lambda: resolve(str(both)), "fits the captioner families coca, git; say which with captioner.family")
    _one_line(lambda: resolve("tiny-git", pretrained="laion2b"), "captioner.pretrained names open_clip weights")
    _one_line(lambda: _family("tiny-git", instruction="Describe."), "GIT model has no chat template")
    _one_line(lambda: _family("tiny-blip2", instruction="Describe."), "needs a chat template")


def test_encoder_decoder_language_models_are_refused_in_one_line(tmp_path):
    from capfilt.modeling.families.build import builder
    from capfilt.modeling.presets import load_preset

    t5 = load_preset("tiny-blip2")  # BLIP-2 over Flan-T5: an encoder-decoder language model
    t5["config"]["text_config"] = {
        "model_type": "t5",
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 1,
        "num_heads": 4,
    }
    builder(t5)(tmp_path / "blip2-t5")
    _one_line(lambda: _family(str(tmp_path / "blip2-t5")), "encoder-decoder language model")


def test_family_captioner_is_the_stage_captioner():
    from capfilt.stages.caption import Caption

    stage = Caption(load_config(recipe("git")).captioner, device="cpu")
    assert isinstance(stage.captioner, FamilyCaptioner)
    batch = {"key": ["a", "b"], "image": IMAGES[:2], "seed": [1, 2], "failure": ["", ""], "detail": ["", ""]}
    out = stage(batch)
    assert [len(c) for c in out["captions"]] == [3, 3]


@pytest.mark.parametrize("model", TINY)
def test_families_call_their_dependencies_in_no_deprecated_way(model):
    import warnings

    extra = chat(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _family(model, **extra).caption(IMAGES, [1, 2, 3])  # the load-time check's stock generate included
    assert not [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
