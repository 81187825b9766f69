"""The load-time self-check: it passes on a correct fast path and refuses a perturbed one, with one
line that names the model and the size of the difference."""

import re

import numpy as np
import pytest
import torch

from capfilt.modeling import attention
from capfilt.modeling.captioner import Captioner
from capfilt.modeling.clip_reranker import ClipReranker
from capfilt.modeling.itm_filter import ItmFilter
from capfilt.modeling.selfcheck import PROBE_TEXTS, TOLERANCE, ModelMismatch, probe_images


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

    monkeypatch.setattr(attention.ImageKeysValues, "attend", attend)


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
    original = attention.DecoderCache.append

    def forgetful(self, layer, key, value):
        original(self, layer, key, value)
        return key, value

    monkeypatch.setattr(attention.DecoderCache, "append", forgetful)
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


def _loaded(wrapper, stock_class):
    """A wrapper built without the check and its own stock reference instance (the one to drift)."""
    return stock_class.from_pretrained(wrapper.ref.location).eval()


def test_small_upstream_itm_logit_drift_at_p_001_is_refused(sensitive_filter):
    """The stock ITM head's match logit moves by 0.05 where p is about 0.01 (both sides first
    shifted to p in [0.007, 0.015]): p moves by at most p(1 - p) x 0.05 = 7.4e-4, under the old
    rule's 1e-3 on probabilities, so the old check passed it. As logits (each row over its largest
    magnitude, about 5 here) the drift is ~1e-2, ten times the tolerance."""
    from transformers import BlipForImageTextRetrieval

    from capfilt.modeling.selfcheck import check_filter

    filt = ItmFilter(str(sensitive_filter), device="cpu", self_check=False)
    stock = _loaded(filt, BlipForImageTextRetrieval)
    low = torch.tensor([0.0, -5.3])  # the probe's margins are 0.3 to 1.1: p becomes 0.007 to 0.015
    for model in (filt.model, stock):
        model.itm_head.bias = torch.nn.Parameter(model.itm_head.bias + low)
    probs = np.concatenate(filt.score(probe_images(), [PROBE_TEXTS, PROBE_TEXTS[::-1]])[0])
    assert probs.min() > 0.005 and probs.max() < 0.02, probs
    assert max(check_filter(filt, stock)["diffs"].values()) < 1e-5
    stock.itm_head.bias = torch.nn.Parameter(stock.itm_head.bias + torch.tensor([0.0, 0.05]))  # upstream
    with pytest.raises(ModelMismatch) as err:
        check_filter(filt, stock)
    sizes = dict(re.findall(r"max \|Δ(\w+)\| = ([\d.e+-]+)", str(err.value)))
    assert float(sizes["p"]) < 1e-3 < TOLERANCE * 5 < float(sizes["itm"])  # old rule: passed


def test_upstream_decoder_drift_is_refused_by_the_generate_probe(sensitive_captioner):
    """A change on the stock side only (its LM head now favours one token) shows in stock
    `generate`'s greedy ids, not only in the logits."""
    from transformers import BlipForConditionalGeneration

    from capfilt.modeling.selfcheck import check_captioner

    cap = Captioner(str(sensitive_captioner), device="cpu", self_check=False)
    stock = _loaded(cap, BlipForConditionalGeneration)
    assert check_captioner(cap, stock)["diffs"]["ids"] == 0.0
    head = stock.text_decoder.cls.predictions.decoder
    favoured = torch.zeros_like(head.bias)
    favoured[100] = 50.0
    head.bias = torch.nn.Parameter(head.bias + favoured)
    with pytest.raises(ModelMismatch, match=r"greedy ids differ from generate's in [1-9]\d*%"):
        check_captioner(cap, stock)


def test_upstream_prompt_handling_drift_is_refused(monkeypatch, sensitive_captioner):
    """The stock processor's prompt handling changes (here: it drops the prompt's last word):
    stock `generate` then continues a different prompt than capfilt's own prompt path."""
    from transformers import BlipProcessor

    original = BlipProcessor.__call__

    def drifted(self, images=None, text=None, **kwargs):
        return original(self, images=images, text=" ".join(text.split()[:-1]) if text else text, **kwargs)

    monkeypatch.setattr(BlipProcessor, "__call__", drifted)
    with pytest.raises(ModelMismatch, match=r"^captioner .*greedy ids differ from generate's in 100%"):
        Captioner(str(sensitive_captioner), device="cpu")
