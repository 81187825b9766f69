"""The load-time self-check: it passes on a correct fast path and refuses a perturbed one, with one
line that names the model and the size of the difference."""

import pytest
import torch

from capfilt.modeling import blip
from capfilt.modeling.captioner import Captioner
from capfilt.modeling.clip_reranker import ClipReranker
from capfilt.modeling.itm_filter import ItmFilter
from capfilt.modeling.selfcheck import TOLERANCE, ModelMismatch


def test_correct_fast_paths_pass_with_float_rounding_differences(sensitive_filter, sensitive_captioner):
    for wrapper in (
        ItmFilter(str(sensitive_filter), device="cpu"),
        Captioner(str(sensitive_captioner), device="cpu"),
        ClipReranker("tiny-clip", device="cpu"),
    ):
        diffs = wrapper.check["diffs"]
        assert diffs and all(0 <= v < 1e-5 for v in diffs.values()), diffs


def _image_zero_for_every_row(monkeypatch):
    """The bug transformers 5.24 exposed: cross-attention reads image 0's keys/values for every text."""

    def attend(self, layer, query):
        key, value = self._present[layer]
        return torch.nn.functional.scaled_dot_product_attention(
            query, key[:1].expand(len(query), -1, -1, -1), value[:1].expand(len(query), -1, -1, -1)
        )

    monkeypatch.setattr(blip.ImageKeysValues, "attend", attend)


@pytest.mark.parametrize("role", ["filter", "captioner"])
def test_cross_image_leak_is_refused_at_load(role, monkeypatch, sensitive_filter, sensitive_captioner):
    _image_zero_for_every_row(monkeypatch)
    build = {
        "filter": lambda: ItmFilter(str(sensitive_filter), device="cpu"),
        "captioner": lambda: Captioner(str(sensitive_captioner), device="cpu"),
    }[role]
    with pytest.raises(ModelMismatch) as err:
        build()
    message = str(err.value)
    assert "\n" not in message and f"{role} " in message and "disagrees with transformers' Blip" in message
    assert "tolerance" in message and "self_check: false" in message


def test_decoder_without_history_is_refused(monkeypatch, sensitive_captioner):
    """The other half of the 5.24 break: the decoder step attends only to its newest token."""
    original = blip.DecoderCache.append

    def forgetful(self, layer, key, value):
        original(self, layer, key, value)
        return key, value

    monkeypatch.setattr(blip.DecoderCache, "append", forgetful)
    with pytest.raises(ModelMismatch, match=r"max \|Δlogit\| = "):
        Captioner(str(sensitive_captioner), device="cpu")


def test_perturbed_weights_are_refused_and_the_switch_turns_the_check_off(sensitive_filter):
    from transformers import BlipForImageTextRetrieval

    from capfilt.modeling.selfcheck import check_filter

    filt = ItmFilter(str(sensitive_filter), device="cpu", self_check=False)
    assert not hasattr(filt, "check")
    stock = BlipForImageTextRetrieval.from_pretrained(filt.ref.location).eval()
    assert max(check_filter(filt, stock)["diffs"].values()) < TOLERANCE
    shift = torch.tensor([0.0, 0.05])  # the match logit only: fast path only, stock keeps its tensor
    filt.model.itm_head.bias = torch.nn.Parameter(filt.model.itm_head.bias + shift)
    with pytest.raises(ModelMismatch, match=r"max \|Δitm\| = \d\.\de-0[12]"):
        check_filter(filt, stock)


def test_clip_fast_path_is_checked(monkeypatch):
    from capfilt.modeling import clip_reranker

    monkeypatch.setattr(clip_reranker, "trimmed_length", lambda tokens: 3)  # cuts texts short
    with pytest.raises(ModelMismatch, match=r"^clip tiny-clip: .*Δclip"):
        ClipReranker("tiny-clip", device="cpu")


def test_run_config_switch(tmp_path):
    from capfilt.config import parse_config

    on = parse_config({"filter": {"model": "tiny-blip"}})
    off = parse_config({"filter": {"model": "tiny-blip"}, "self_check": False})
    assert on.self_check and not off.self_check
    assert on.fingerprint() == off.fingerprint()  # the check changes no output: a resume may toggle it
