"""The MED: weight sharing, strict key mapping both ways, and exports that load with stock
`from_pretrained` and with capfilt's Captioner / ItmFilter and compute what the MED computes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.modeling.captioner import Captioner, Decoding
from capfilt.modeling.itm_filter import ItmFilter
from capfilt.modeling.loading import from_pretrained
from capfilt.modeling.med import KeyMismatch, Med, MedOptions
from capfilt.modeling.med_export import (
    export,
    export_state,
    import_med,
    import_stock,
    load_med,
    new_med,
    save_med,
    stock_keys,
)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared 2-core box: one OpenMP thread is ~10x faster than two fighting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def med_and_processor():
    med, processor = new_med("tiny-blip", MedOptions(queue_size=8), seed=3)
    with torch.no_grad():  # random init ties many logits; spread them so greedy decoding is not degenerate
        noise = torch.Generator().manual_seed(0)
        for p in med.text_encoder.parameters():  # shared with the decoder, too
            p.add_(torch.randn(p.shape, generator=noise) * 0.5)
        med.itm_head.bias.copy_(torch.tensor([0.3, -0.2]))
    return med.eval(), processor


@pytest.fixture(scope="module")
def exported(med_and_processor, tmp_path_factory):
    med, processor = med_and_processor
    root = tmp_path_factory.mktemp("export")
    return export(med, "captioner", root / "captioner", processor), export(med, "filter", root / "filter", processor)


def _inputs(processor, images, texts):
    pixels = processor.image_processor(images=images, return_tensors="pt").pixel_values
    tok = processor.tokenizer(texts, padding="longest", return_tensors="pt")
    return pixels, tok.input_ids, tok.attention_mask


def test_decoder_shares_everything_but_self_attention(med_and_processor):
    med, _ = med_and_processor
    enc, dec = med.text_encoder, med.text_decoder.bert
    assert dec.embeddings is enc.embeddings
    assert med.text_decoder.cls.predictions.decoder.weight is enc.embeddings.word_embeddings.weight
    for le, ld in zip(enc.encoder.layer, dec.encoder.layer):
        assert ld.crossattention is le.crossattention and ld.intermediate is le.intermediate
        assert ld.output is le.output
        assert ld.attention is not le.attention
        assert ld.attention.self.query.weight.data_ptr() != le.attention.self.query.weight.data_ptr()


@pytest.mark.parametrize("role", ["captioner", "filter"])
def test_export_keys_are_exactly_the_stock_keys(med_and_processor, role):
    med, _ = med_and_processor
    assert set(export_state(med, role)) == stock_keys(role, med.config)


def test_import_accounts_for_every_key(exported, med_and_processor):
    med, _ = med_and_processor
    canonical = set(med.canonical_state_dict())
    cap_keys, filt_keys = stock_keys("captioner", med.config), stock_keys("filter", med.config)
    both, _, report = import_med(captioner=str(exported[0]), filter=str(exported[1]), options=MedOptions(queue_size=8))
    assert report.initialised == ["temp"] and not report.copied  # temp is not in any stock class
    assert set(report.loaded) == canonical - {"temp"}
    used = {v for v in report.loaded.values()} | set(report.superseded)
    tied = {"text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"}
    assert used | {f"captioner:{k}" for k in tied} == {f"captioner:{k}" for k in cap_keys} | {
        f"filter:{k}" for k in filt_keys
    }
    a, b = med.canonical_state_dict(), both.canonical_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in canonical - {"temp"})

    _, _, cap_only = import_med(captioner=str(exported[0]), options=MedOptions(queue_size=8))
    assert set(cap_only.initialised) == {
        "temp",
        "itm_head.weight",
        "itm_head.bias",
        "vision_proj.weight",
        "vision_proj.bias",
        "text_proj.weight",
        "text_proj.bias",
    }
    assert all(k.startswith("text_encoder.") and ".attention." in k for k in cap_only.copied)
    _, _, filt_only = import_med(filter=str(exported[1]), options=MedOptions(queue_size=8))
    assert all(k.startswith("text_decoder.cls.") or k == "temp" for k in filt_only.initialised)
    assert all(k.startswith("text_decoder.bert.") and ".attention." in k for k in filt_only.copied)


def test_import_rejects_missing_and_unexpected_keys(med_and_processor):
    med, _ = med_and_processor
    state = export_state(med, "filter")
    target = Med(med.config, MedOptions(queue_size=0, momentum=False))
    with pytest.raises(KeyMismatch, match="unexpected"):
        import_stock(target, {"filter": {**state, "text_encoder.pooler.dense.weight": torch.zeros(1)}})
    with pytest.raises(KeyMismatch, match="missing"):
        import_stock(target, {"filter": {k: v for k, v in state.items() if k != "itm_head.bias"}})
    with pytest.raises(KeyMismatch, match="unexpected"):
        target.load_canonical({**target.canonical_state_dict(), "extra": torch.zeros(1)})


def test_med_checkpoint_round_trip(med_and_processor, tmp_path):
    med, processor = med_and_processor
    save_med(med, tmp_path / "med", processor)
    again, _ = load_med(tmp_path / "med")
    a, b = med.canonical_state_dict(), again.canonical_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exported_filter_computes_what_the_med_computes(med_and_processor, exported, images):
    med, processor = med_and_processor
    stock = from_pretrained(BlipForImageTextRetrieval, str(exported[1]))  # strict: raises on any key mismatch
    texts = ["a red circle on the left", "two blue squares at the top", "a big star", "three small crosses"]
    pixels, ids, mask = _inputs(processor, images[:4], texts)
    with torch.no_grad():
        embeds = med.image_embeds(pixels)
        med_itm = med.itm_logits(embeds, ids, mask).softmax(-1)[:, 1]
        med_itc = med.image_feat(embeds) @ med.text_feat(ids, mask).t()
        stock_itm = stock(input_ids=ids, pixel_values=pixels, attention_mask=mask).itm_score.softmax(-1)[:, 1]
        stock_itc = stock(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
    torch.testing.assert_close(stock_itm, med_itm, rtol=0, atol=1e-6)
    torch.testing.assert_close(stock_itc, med_itc, rtol=0, atol=1e-6)
    itm, itc = ItmFilter(str(exported[1]), device="cpu").score(images[:4], [[t] for t in texts])
    np.testing.assert_allclose(np.concatenate(itm), med_itm.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.concatenate(itc), med_itc.diagonal().numpy(), atol=1e-5)


def test_exported_captioner_computes_what_the_med_computes(med_and_processor, exported, images):
    med, processor = med_and_processor
    stock = from_pretrained(BlipForConditionalGeneration, str(exported[0]))
    texts = ["a picture of a red circle", "a picture of two blue squares at the top"]
    pixels, ids, mask = _inputs(processor, images[:2], texts)
    ids[:, 0] = processor.tokenizer.bos_token_id
    with torch.no_grad():
        med_logits = med.lm_logits(med.image_embeds(pixels), ids, mask)
        stock_logits = stock(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(stock_logits, med_logits, rtol=0, atol=1e-5)

    captioner = Captioner(
        str(exported[0]),
        device="cpu",
        decoding=Decoding(num_captions=1, sample=False, min_new_tokens=0, max_new_tokens=8),
    )
    tok = processor.tokenizer
    cfg = med.config.text_config
    with torch.no_grad():
        ours = med.greedy(
            captioner.pixel_values(images[:3]), captioner.prompt_ids, cfg.sep_token_id, cfg.pad_token_id, 8
        )
    theirs = captioner.generate_ids(captioner.pixel_values(images[:3]), [0, 1, 2])

    def tokens(ids):  # the captioner may carry extra trailing padding columns
        return [[t for t in row if t != cfg.pad_token_id] for row in ids.tolist()]

    assert tokens(theirs) == tokens(ours)
    assert captioner.decode_text(theirs) == tok.batch_decode(ours, skip_special_tokens=True)
    assert len(set(captioner.decode_text(theirs)[0].split())) > 1  # a real sequence, not one token repeated


def test_forward_losses_and_trainable_sets(med_and_processor):
    med, processor = med_and_processor
    model = Med(med.config, MedOptions(queue_size=8))
    model.load_canonical(med.canonical_state_dict())
    model.set_trainable({"itc": 0, "itm": 0, "lm": 1})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("vision_proj", "itm_head", "temp", "vision_model_m")) for n in trainable)
    assert any(".crossattention." in n for n in trainable)
    assert not any(n.startswith("text_encoder.") and ".attention." in n for n in trainable)
    model.set_trainable({"itc": 1, "itm": 1, "lm": 0})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("text_decoder.") for n in trainable)
    assert {"temp", "itm_head.weight"} <= trainable
    assert F.normalize(model.image_queue, dim=0).shape == (med.config.image_text_hidden_size, 8)
