"""The model wrappers: CLIP against open_clip, per-key sampling, presets as local directories.
(BLIP against the stock transformers classes: test_perf_paths.py and test_selfcheck.py.)"""

import numpy as np
import pytest
import torch

from capfilt.modeling.captioner import Captioner, Decoding
from capfilt.modeling.clip_reranker import ClipReranker, encode_text_trimmed
from capfilt.modeling.itm_filter import ItmFilter
from capfilt.modeling.loading import cpu_has_bf16
from capfilt.modeling.presets import resolve_blip, weights_sha256

TEXTS = ["a red circle", "two small blue squares on the left", "x", "a picture of three yellow stars at the top"]


@pytest.fixture(scope="module")
def itm_filter():
    return ItmFilter("tiny-blip", device="cpu")


def test_filter_handles_images_without_texts(itm_filter, images):
    itm, itc = itm_filter.score(images[:3], [[], ["a red circle"], []])
    assert [len(x) for x in itm] == [0, 1, 0] and [len(x) for x in itc] == [0, 1, 0]


def test_sampled_captions_do_not_depend_on_batch_size_or_order(images):
    cap = Captioner("tiny-blip", device="cpu", decoding=Decoding(num_captions=3, max_new_tokens=12))
    seeds = [101 + i for i in range(len(images))]
    batched = cap.caption(images, seeds)
    one_by_one = [cap.caption([im], [s])[0] for im, s in zip(images, seeds)]
    reversed_ = cap.caption(images[::-1], seeds[::-1])[::-1]
    assert batched == one_by_one == reversed_
    assert all(len(c) == 3 for c in batched)
    # Different seeds give different samples (the noise is really used).
    assert cap.caption(images[:1], [1])[0] != cap.caption(images[:1], [2])[0]


def test_clip_scores_equal_naive_per_pair(images):
    clip = ClipReranker("tiny-clip", device="cpu")
    texts = [TEXTS[: 1 + i % 4] for i in range(len(images))]
    sims = clip.score(images, texts)
    from PIL import Image

    with torch.no_grad():
        for i, image in enumerate(images):
            pixel = clip.preprocess(Image.fromarray(image))[None]
            for j, text in enumerate(texts[i]):
                img = torch.nn.functional.normalize(clip.model.encode_image(pixel), dim=-1)
                txt = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer([text])), dim=-1)
                assert abs((img * txt).sum().item() - sims[i][j]) < 1e-5


def test_trimmed_clip_text_encoding_equals_full_context():
    clip = ClipReranker("tiny-clip", device="cpu")
    tokens = clip.tokenizer(TEXTS)
    with torch.no_grad():
        assert torch.allclose(encode_text_trimmed(clip.model, tokens), clip.model.encode_text(tokens), atol=1e-5)


def test_preset_materialises_to_a_directory_stock_from_pretrained_loads(tmp_path):
    from transformers import BlipForImageTextRetrieval

    ref = resolve_blip("tiny-blip", "filter")
    model = BlipForImageTextRetrieval.from_pretrained(ref.location)
    assert model.config.vision_config.hidden_size == 64
    assert ref.identity["sha256"] == weights_sha256(ref.location)
    # A local directory is accepted as a model name and identified by its weights.
    model.save_pretrained(tmp_path / "copy")
    assert resolve_blip(str(tmp_path / "copy"), "filter").identity["sha256"] == ref.identity["sha256"]


# bf16 vs fp32 scores of the tiny presets on these images, measured (AMD EPYC, avx512_bf16): ITM 3.3e-4,
# ITC 9.4e-4, CLIP 3.4e-3 (BLIP-base: docs/benchmarks.md). A wrong cast or dtype mix-up is far beyond it.
BF16_TOLERANCE = 2e-2


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16: precision bf16 computes fp32")
def test_precision_bf16_computes_bf16_on_a_cpu_that_has_it(itm_filter, images):
    texts = [TEXTS[: 1 + i % 4] for i in range(4)]
    clip = ClipReranker("tiny-clip", device="cpu", self_check=False)
    cap = Captioner("tiny-blip", device="cpu", self_check=False, decoding=Decoding(num_captions=2))
    fp32 = itm_filter.score_detailed(images[:4], texts), clip.score(images[:4], texts), cap.caption(images[:2], [1, 2])
    itm_filter.precision = clip.precision = cap.precision = "bf16"
    try:
        bf16 = itm_filter.score_detailed(images[:4], texts), clip.score(images[:4], texts)
        bf16_captions = cap.caption(images[:2], [1, 2])
    finally:
        itm_filter.precision = "fp32"
    for name, a, b in [
        ("itm", fp32[0].itm, bf16[0].itm),
        ("itc", fp32[0].itc, bf16[0].itc),
        ("clip", fp32[1], bf16[1]),
    ]:
        diff = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
        assert 0 < diff < BF16_TOLERANCE, (name, diff)  # really bf16 (not fp32), and close to fp32
    assert [len(c) for c in bf16_captions] == [2, 2] and all(all(isinstance(t, str) for t in c) for c in bf16_captions)


def test_precision_bf16_is_fp32_where_the_cpu_lacks_it_and_in_training(monkeypatch, itm_filter, images):
    from capfilt.modeling import loading

    texts = [TEXTS[:2]] * 2
    fp32 = itm_filter.score_detailed(images[:2], texts)
    monkeypatch.setattr(loading, "cpu_has_bf16", lambda: False)
    itm_filter.precision = "bf16"
    try:
        same = itm_filter.score_detailed(images[:2], texts)
    finally:
        itm_filter.precision = "fp32"
    assert all(np.array_equal(a, b) for a, b in zip(fp32.itm, same.itm))
    # training's autocast stays fp32 on a CPU whatever the CPU has (its default precision is bf16)
    assert not isinstance(loading.autocast(torch.device("cpu"), "bf16"), torch.autocast)
