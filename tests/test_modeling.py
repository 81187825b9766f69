"""The model wrappers: CLIP against open_clip, per-key sampling, presets as local directories.
(BLIP against the stock transformers classes: test_perf_paths.py and test_selfcheck.py.)"""

import pytest
import torch

from capfilt.modeling.captioner import Captioner, Decoding
from capfilt.modeling.clip_reranker import ClipReranker, encode_text_trimmed
from capfilt.modeling.itm_filter import ItmFilter
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
