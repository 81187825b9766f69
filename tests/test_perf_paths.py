"""capfilt's own BLIP compute (modeling/blip.py) computes what the stock transformers classes
compute: the modules on batches of different images, per-image cross-attention keys/values, the
ITC->ITM cascade, and decode-loop compaction. No timings here (see benchmarks/)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.config import CascadeConfig as Cascade
from capfilt.modeling.attention import ImageGroups
from capfilt.modeling.captioner import Captioner, Decoding
from capfilt.modeling.clip_reranker import ClipReranker
from capfilt.modeling.itm_filter import ItmFilter

TEXTS = ["a red circle", "two small blue squares on the left", "x", "a picture of three yellow stars at the top"]


@pytest.fixture(scope="module")
def itm_filter(sensitive_filter):
    """A filter whose scores depend clearly on image and text: a text scored against the wrong
    image shows at once."""
    return ItmFilter(str(sensitive_filter), device="cpu")


@pytest.fixture(scope="module")
def stock_filter(itm_filter):
    """The same weights in a model that nobody patched: transformers' eager modules as shipped."""
    return BlipForImageTextRetrieval.from_pretrained(itm_filter.ref.location).eval()


def _ragged(images):
    return [TEXTS[: (i * 3) % 5] for i in range(len(images))]  # 0..4 texts per image, some images none


def test_own_modules_equal_stock_modules_on_different_images(itm_filter, stock_filter):
    """ViT, unimodal and image-grounded text encoder, each on a batch of 3 different images (a row
    that read another row's image would differ) and padded texts (the mask is exercised)."""
    ours, stock = itm_filter.model, stock_filter
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 64, 64)
    tokens = itm_filter.tokenize(TEXTS[:3])
    with torch.no_grad():
        vision = ours.vision_model(pixels)
        stock_vision = stock.vision_model(pixel_values=pixels).last_hidden_state
        assert torch.allclose(vision, stock_vision, atol=1e-5, rtol=0)
        text = ours.text_encoder(tokens.input_ids, tokens.attention_mask)
        stock_text = stock.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        mask = tokens.attention_mask.bool()
        assert torch.allclose(text[mask], stock_text.last_hidden_state[mask], atol=1e-5, rtol=0)
        images = ours.text_encoder.image_keys_values(vision, [0, 1, 2])
        grounded = ours.text_encoder(tokens.input_ids, tokens.attention_mask, images=images)
        stock_grounded = stock.text_encoder(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=stock_vision
        ).last_hidden_state
        assert torch.allclose(grounded[mask], stock_grounded[mask], atol=1e-5, rtol=0)
        # The same texts read the images in another order: the rows follow their images.
        swapped = ours.text_encoder(tokens.input_ids, tokens.attention_mask, images=images.for_rows([2, 0, 1]))
        stock_swapped = stock.text_encoder(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=stock_vision[[2, 0, 1]],
        ).last_hidden_state
        assert torch.allclose(swapped[mask], stock_swapped[mask], atol=1e-5, rtol=0)
        assert not torch.allclose(swapped[mask], grounded[mask], atol=1e-3)


def test_own_model_state_dict_is_the_stock_one(itm_filter, stock_filter):
    assert set(itm_filter.model.state_dict()) == set(stock_filter.state_dict())


def test_image_groups_equal_gathered_attention():
    torch.manual_seed(0)
    rows = [2, 0, 2, 2, 3, 0]  # ragged, unordered, image 1 has no row
    query, key, value = torch.randn(6, 4, 5, 8), torch.randn(4, 4, 11, 8), torch.randn(4, 4, 11, 8)
    groups = ImageGroups(rows, "cpu")
    present = torch.tensor(groups.images)
    grouped = groups.attend(query, key[present], value[present])
    index = torch.tensor(rows)
    gathered = F.scaled_dot_product_attention(query, key[index], value[index])
    assert not groups.dense and torch.allclose(grouped, gathered, atol=1e-6)
    dense = ImageGroups([0, 0, 1, 1, 2, 2], "cpu")
    assert dense.dense
    out = dense.attend(query, key[:3], value[:3])
    assert torch.allclose(
        out, F.scaled_dot_product_attention(query, key[[0, 0, 1, 1, 2, 2]], value[[0, 0, 1, 1, 2, 2]]), atol=1e-6
    )


def test_filter_equals_unpatched_stock_per_pair_forward(itm_filter, stock_filter, images):
    texts = _ragged(images)
    itm, itc = itm_filter.score(images, texts)
    proc = itm_filter.processor
    with torch.no_grad():
        for i, image in enumerate(images):
            for j, text in enumerate(texts[i]):
                inputs = proc(images=image, text=text, return_tensors="pt")
                assert abs(stock_filter(**inputs).itm_score.softmax(-1)[0, 1].item() - itm[i][j]) < 1e-5
                assert abs(stock_filter(**inputs, use_itm_head=False).itm_score[0, 0].item() - itc[i][j]) < 1e-5


def test_filter_scores_do_not_depend_on_text_chunking(itm_filter, images):
    texts = _ragged(images)
    small = ItmFilter(itm_filter.ref.location, device="cpu", text_batch_size=3)  # chunks that cut across images
    for a, b in zip(itm_filter.score(images, texts), small.score(images, texts)):
        for x, y in zip(a, b):
            assert np.allclose(x, y, atol=1e-5)


def test_cascade_computes_itm_only_inside_the_band(itm_filter, images):
    texts = _ragged(images)
    full = itm_filter.score_detailed(images, texts)
    assert all(c.all() for c in full.itm_computed)
    itc = np.concatenate(full.itc)
    lo, hi = np.quantile(itc, [0.3, 0.7])
    cascade = Cascade(itc_low=float(lo), itc_high=float(hi))
    part = itm_filter.score_detailed(images, texts, cascade)
    mask = np.concatenate(part.itm_computed)
    assert 0 < mask.sum() < len(mask)
    assert np.array_equal(mask, (itc >= lo) & (itc <= hi))
    assert np.allclose(np.concatenate(part.itc), itc, atol=1e-6)
    assert np.allclose(np.concatenate(part.itm)[mask], np.concatenate(full.itm)[mask], atol=1e-6)
    assert np.all(np.concatenate(part.itm)[~mask] == 0.0) and np.isfinite(np.concatenate(part.itm)).all()
    for values, computed, itcs in zip(part.itm_or_none(), part.itm_computed, part.itc):
        assert [v is None for v in values] == [not c for c in computed]
        assert all(cascade.verdict(s) == "band" for s, c in zip(itcs, computed) if c)
    # A band nothing falls into skips the ITM pass entirely.
    nothing = itm_filter.score_detailed(images, texts, Cascade(itc_low=1.0))
    assert not np.concatenate(nothing.itm_computed).any()
    assert Cascade(itc_low=0.1, itc_high=0.2).verdict(0.05) == "below" and Cascade(itc_high=0.2).verdict(0.3) == "above"


def _ending_captioner(**kwargs) -> Captioner:
    """A tiny captioner whose decoder ends a caption with ~18% chance per step, so rows finish at
    different steps and compaction really removes rows mid-batch."""
    cap = Captioner("tiny-blip", device="cpu", **kwargs)
    with torch.no_grad():
        cap.model.text_decoder.cls.predictions.decoder.bias[cap.eos] += 4.0
    return cap


def test_compaction_and_sync_interval_keep_captions_identical(images):
    # Sampling, so rows of one image end at different steps (greedy rows of this model end together).
    decoding = Decoding(num_captions=3, min_new_tokens=2, max_new_tokens=16)
    seeds = [7 + i for i in range(len(images))]
    reference = _ending_captioner(decoding=decoding, compact=False, sync_every=1)
    pixels = reference.pixel_values(images)
    ids = reference.generate_ids(pixels, seeds)
    lengths = (ids != reference.pad).sum(dim=1)
    assert lengths.min() < lengths.max()  # rows really finish at different steps
    for compact, sync_every in [(True, 1), (True, 3), (False, 5)]:
        cap = _ending_captioner(decoding=decoding, compact=compact, sync_every=sync_every)
        other = cap.generate_ids(pixels, seeds)
        width = min(ids.shape[1], other.shape[1])
        assert torch.equal(ids[:, :width], other[:, :width])
        assert (ids[:, width:] == cap.pad).all() and (other[:, width:] == cap.pad).all()
    cap = _ending_captioner(decoding=decoding, compact=True, sync_every=2)
    assert cap.caption(images, seeds) == [cap.caption([im], [s])[0] for im, s in zip(images, seeds)]


def test_greedy_captions_equal_unpatched_stock_generate(images, sensitive_captioner):
    """On a batch whose image 0 differs from the others, with a captioner whose words depend on its
    image: a decoder that read image 0 for every row would caption them all alike."""
    cap = Captioner(
        str(sensitive_captioner),
        device="cpu",
        decoding=Decoding(sample=False, min_new_tokens=1, max_new_tokens=12),
        sync_every=2,
    )
    stock = BlipForConditionalGeneration.from_pretrained(cap.ref.location).eval()
    pixels = cap.pixel_values(images)
    ours = cap.generate_ids(pixels, list(range(len(images))))
    prompt = torch.tensor([cap.prompt_ids + [cap.eos]] * len(images))
    with torch.no_grad():
        ref = stock.generate(
            pixel_values=pixels, input_ids=prompt, do_sample=False, num_beams=1, max_new_tokens=12, min_new_tokens=1
        )[:, len(cap.prompt_ids) :]
    width = min(ours.shape[1], ref.shape[1])
    assert torch.equal(ours[:, :width], ref[:, :width])
    assert len({tuple(row.tolist()) for row in ours}) == len(images)  # every image its own caption


def test_clip_length_sorted_small_batches_equal_one_big_batch(images):
    texts = _ragged(images)
    big = ClipReranker("tiny-clip", device="cpu").score(images, texts)
    small = ClipReranker("tiny-clip", device="cpu", text_batch_size=2).score(images, texts)
    for a, b in zip(big, small):
        assert np.allclose(a, b, atol=1e-5)


def _images_per_kv_call(monkeypatch) -> list[int]:
    """Images in each cross-attention K/V computation (capfilt's own method, spied on)."""
    from capfilt.modeling import blip

    calls, original = [], blip.TextModel.image_keys_values

    def spy(self, image_embeds, rows):
        calls.append(len(image_embeds))
        return original(self, image_embeds, rows)

    monkeypatch.setattr(blip.TextModel, "image_keys_values", spy)
    return calls


def test_captioner_holds_one_group_of_images_at_a_time_without_changing_captions(images, monkeypatch):
    """Memory: a batch with more than `max_rows` rows decodes in groups of images, so the cross-attention
    K/V and the KV cache of one group exist at a time; the ids are those of the batch decoded whole."""
    decoding = Decoding(num_captions=3, min_new_tokens=2, max_new_tokens=16)
    seeds = [7 + i for i in range(len(images))]
    whole = _ending_captioner(decoding=decoding, max_rows=3 * len(images))
    grouped = _ending_captioner(decoding=decoding, max_rows=6)
    pixels = whole.pixel_values(images)
    ids = whole.generate_ids(pixels, seeds)
    calls = _images_per_kv_call(monkeypatch)
    other = grouped.generate_ids(pixels, seeds)
    assert calls == [2] * (len(images) // 2)
    width = min(ids.shape[1], other.shape[1])
    assert torch.equal(ids[:, :width], other[:, :width])
    assert (ids[:, width:] == whole.pad).all() and (other[:, width:] == whole.pad).all()


def test_filter_holds_cross_attention_of_a_few_images_at_a_time(itm_filter, images, monkeypatch):
    texts = _ragged(images)
    whole = itm_filter.score_detailed(images, texts)
    saved, itm_filter.kv_images = itm_filter.kv_images, 3
    try:
        calls = _images_per_kv_call(monkeypatch)
        grouped = itm_filter.score_detailed(images, texts)
    finally:
        itm_filter.kv_images = saved
    assert max(calls) <= 3 and len(calls) >= len(images) // 3
    for a, b in zip(whole.itm, grouped.itm):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_lm_head_in_vocabulary_slices_gives_the_same_bits():
    """On a CPU the decoder's LM head runs a slice of the vocabulary at a time (faster at 16+ rows);
    every logit must be the same float as the whole product's, or sampled captions would move."""
    from types import SimpleNamespace

    from capfilt.modeling.blip import Predictions

    cfg = SimpleNamespace(hidden_size=64, hidden_act="gelu", layer_norm_eps=1e-12, vocab_size=5000)
    torch.manual_seed(0)
    head = Predictions(cfg)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    for rows in (1, 16, 40):
        x = torch.randn(rows, 64)
        whole = head.decoder(head.transform(x))
        assert torch.equal(head(x), whole)
