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
from capfilt.modeling.loading import cpu_has_bf16
from capfilt.modeling.selfcheck import LOW_PRECISION_TOLERANCE, PROBE_TEXTS, TOLERANCE, ModelMismatch, probe_images


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


needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="bf16 autocast computes fp32 on a CPU without native bf16")


@needs_bf16
def test_a_bf16_run_gets_a_second_probe_in_bf16_and_an_fp32_run_none(sensitive_filter, sensitive_captioner):
    """Issue 23 item 5: the run's own precision is probed too (with its measured tolerance), and the
    default fp32 run pays nothing for it."""
    for build, keys in [
        (lambda p: Captioner(str(sensitive_captioner), device="cpu", precision=p), {"logit@bf16"}),
        (lambda p: ItmFilter(str(sensitive_filter), device="cpu", precision=p), {"itm@bf16", "itc@bf16"}),
        (lambda p: ClipReranker("tiny-clip", device="cpu", precision=p), {"clip@bf16"}),
    ]:
        low = build("bf16").check["diffs"]
        assert keys <= set(low)
        # bf16 rounding shows (the probe ran in bf16, not fp32) and stays inside its tolerance
        assert all(TOLERANCE / 1000 < low[k] <= LOW_PRECISION_TOLERANCE["bf16"] for k in keys), low
        assert not any("@" in k for k in build("fp32").check["diffs"])


def _leak_under_autocast(monkeypatch):
    """A drift only the low-precision path takes: under CPU autocast, every text row reads image 0's
    keys/values (a bf16 kernel gone wrong); fp32 stays correct, so only the second probe sees it."""
    original = attention.ImageKeysValues.attend

    def attend(self, layer, query):
        if not torch.is_autocast_enabled("cpu"):
            return original(self, layer, query)
        key, value = self._present[layer]
        return torch.nn.functional.scaled_dot_product_attention(
            query, key[:1].expand(len(query), -1, -1, -1), value[:1].expand(len(query), -1, -1, -1)
        )

    monkeypatch.setattr(attention.ImageKeysValues, "attend", attend)


@needs_bf16
@pytest.mark.parametrize("role", ["filter", "captioner"])
def test_a_drift_only_in_bf16_is_refused_by_the_bf16_probe(role, monkeypatch, sensitive_filter, sensitive_captioner):
    build = {
        "filter": lambda p: ItmFilter(str(sensitive_filter), device="cpu", precision=p),
        "captioner": lambda p: Captioner(str(sensitive_captioner), device="cpu", precision=p),
    }[role]
    _leak_under_autocast(monkeypatch)
    build("fp32")  # the fp32 path is untouched: the first probe passes
    with pytest.raises(ModelMismatch, match=r"@bf16\| = .*tolerance 1e-03, 3e-02"):
        build("bf16")


@needs_bf16
def test_a_clip_drift_only_in_bf16_is_refused(monkeypatch):
    from capfilt.modeling import clip_reranker

    original = clip_reranker.encode_text_trimmed

    def cut_under_autocast(model, tokens, length):  # texts cut short, only on the bf16 path
        if torch.is_autocast_enabled("cpu"):
            return original(model, tokens[:, :3], 3)
        return original(model, tokens, length)

    monkeypatch.setattr(clip_reranker, "encode_text_trimmed", cut_under_autocast)
    ClipReranker("tiny-clip", device="cpu")
    with pytest.raises(ModelMismatch, match=r"Δclip@bf16"):
        ClipReranker("tiny-clip", device="cpu", precision="bf16")
