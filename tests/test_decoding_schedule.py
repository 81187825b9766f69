"""Decoding schedules (per-sample parameters within an image's K samples) and LAION-COCO's decoding.

- The per-row warps equal transformers' logits processors row by row, and a batch of rows with
  different parameters equals each row warped alone; a whole decode with capfilt's warps equals
  the same loop driven by transformers' processors.
- Captions under a schedule do not change with batch size, order, sync interval or compaction.
- Token for token, capfilt's batched decode equals an independent step-by-step transcription of
  LAION-COCO's production sampler (andreaskoepf/laion_idle_cap, docker/sampling.py `generate`)
  run on the stock `BlipForConditionalGeneration` without a cache, under the same fixed noise.
- The schedule's config keys are validated, and pipelines/laion_coco.yaml holds LAION's values.
- `make bench`'s K=40 rows run (no timing asserted).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BlipForConditionalGeneration,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from capfilt.config import (
    DECODING_SETTINGS,
    PER_SAMPLE,
    CaptionerConfig,
    ConfigError,
    DecodingGroup,
    load_config,
    parse_config,
)
from capfilt.modeling.captioner import Captioner, Decoding, Group
from capfilt.modeling.decoding import RowRules
from capfilt.modeling.sampling import gumbel_noise, row_seeds, sample_tokens

NO_DECIDE = {"decide": {"web": {}, "synthetic": {}}}

# A LAION-like schedule, scaled to the tiny captioner (241 token ids; raw EOS probability ~0.07-0.13
# per step, logits of spread ~0.25, so stronger penalties in two groups): groups with their own
# lengths, top-p, top-k and penalty, LAION's repetition penalty elsewhere, forced EOS.
LAION_LIKE = Decoding(
    num_captions=10,
    top_p=0.2427,
    top_k=120,
    repetition_penalty=1.3,
    min_new_tokens=5,
    max_new_tokens=20,
    force_eos_prob=0.1,
    prompt="a picture of ",
    schedule=(
        Group(n=2, top_p=0.9, min_new_tokens=0, max_new_tokens=6, force_eos_prob=0.09),
        Group(n=3, top_p=0.5, top_k=50, min_new_tokens=3, max_new_tokens=12),
        Group(n=2, force_eos_prob=0.085, repetition_penalty=4.0),
        Group(n=3, top_p=0.9, min_new_tokens=2, max_new_tokens=9, repetition_penalty=2.5),
    ),
)


# ----------------------------------------------------------------------------------- the warps


def _rules(rows: list[dict], vocab: int, sample: bool = True) -> RowRules:
    return RowRules(rows, eos=3, vocab_size=vocab, sample=sample, device="cpu")


def _row(**kw) -> dict:
    base = {
        "top_p": 1.0,
        "top_k": 0,
        "temperature": 1.0,
        "repetition_penalty": 1.0,
        "min_new_tokens": 0,
        "max_new_tokens": 10,
        "force_eos_prob": None,
    }
    return {**base, **kw}


@pytest.mark.parametrize(
    "params",
    [
        dict(repetition_penalty=1.3, min_new_tokens=4, temperature=0.7, top_k=40, top_p=0.8),
        dict(repetition_penalty=0.8, top_p=0.3),
        dict(top_k=7),
        dict(min_new_tokens=1, top_p=0.95, temperature=1.5),
    ],
)
@pytest.mark.parametrize("step", [0, 5])
def test_row_warps_equal_transformers_processors(params, step):
    gen = torch.Generator().manual_seed(0)
    vocab, prompt = 300, 4
    logits = torch.randn(6, vocab, generator=gen) * 3
    ids = torch.randint(0, vocab, (6, prompt + step), generator=gen)
    ids[:, :prompt] = torch.tensor([1, 2, 4, 5])
    p = _row(**params)
    hf = LogitsProcessorList()
    if p["repetition_penalty"] != 1.0:
        hf.append(RepetitionPenaltyLogitsProcessor(p["repetition_penalty"]))
    if p["min_new_tokens"]:
        hf.append(MinNewTokensLengthLogitsProcessor(prompt, p["min_new_tokens"], 3))
    if p["temperature"] != 1.0:
        hf.append(TemperatureLogitsWarper(p["temperature"]))
    if p["top_k"]:
        hf.append(TopKLogitsWarper(p["top_k"]))
    if p["top_p"] < 1.0:
        hf.append(TopPLogitsWarper(p["top_p"]))
    ours = _rules([p] * 6, vocab).warp(ids, logits.clone(), step)
    ref = hf(ids, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.allclose(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)], rtol=1e-6, atol=1e-6)
    if step < p["min_new_tokens"]:
        assert (ours[:, 3] == -math.inf).all()


def test_rows_with_different_parameters_warp_as_each_row_alone():
    gen = torch.Generator().manual_seed(1)
    vocab = 200
    rows = [
        _row(top_p=0.9),
        _row(top_p=0.3, top_k=20, repetition_penalty=1.3),
        _row(top_k=5, min_new_tokens=9),
        _row(temperature=0.5, top_p=0.6),
        _row(top_k=0, top_p=1.0),
        _row(top_k=500, top_p=0.99),
    ]
    logits = torch.randn(len(rows), vocab, generator=gen) * 2
    ids = torch.randint(0, vocab, (len(rows), 7), generator=gen)
    batched = _rules(rows, vocab).warp(ids, logits, 3)
    for i, row in enumerate(rows):
        alone = _rules([row], vocab).warp(ids[i : i + 1], logits[i : i + 1], 3)
        assert torch.equal(batched[i : i + 1], alone), row
    # Compacting the rules keeps each row's own parameters.
    index = torch.tensor([5, 1, 2])
    kept = _rules(rows, vocab).keep(index).warp(ids[index], logits[index], 3)
    assert torch.equal(kept, batched[index])


@pytest.mark.parametrize("spread", [0.05, 1.0, 4.0])  # flat (many candidates fall outside) .. peaked
def test_choose_samples_what_sampling_the_sorted_warp_samples(spread):
    """The decode loop's `choose` finds the nucleus without sorting; it must pick, row by row, the
    token that Gumbel-max sampling of the sorted `warp` picks (and its argmax when greedy)."""
    gen = torch.Generator().manual_seed(2)
    vocab = 400
    kinds = [
        _row(top_p=0.9),
        _row(top_p=0.2427, top_k=150, repetition_penalty=1.3, min_new_tokens=4),
        _row(top_p=0.5, temperature=0.7),
        _row(top_p=0.3, top_k=20),
        _row(top_k=9),
        _row(),
    ]
    per_row = [kinds[i % len(kinds)] for i in range(48)]
    uniform = [kinds[1]] * 48  # LAION-COCO's shape: one top-k for every row
    seeds = row_seeds(list(range(12)), 4, "cpu")
    retried = 0
    for rows in (per_row, uniform):
        rules = _rules(rows, vocab)
        no_top_p = _rules([{**row, "top_p": 1.0} for row in rows], vocab)  # every warp but top-p
        for step in (0, 3, 7):
            logits = torch.randn(len(rows), vocab, generator=gen) * spread
            ids = torch.randint(0, vocab, (len(rows), 4 + step), generator=gen)
            warped = rules.warp(ids, logits, step)
            expected = sample_tokens(warped, seeds, step)
            assert torch.equal(rules.choose(ids, logits, step, seeds), expected)
            assert torch.equal(rules.choose(ids, logits, step, None), warped.argmax(dim=-1))
            unfiltered = (no_top_p.warp(ids, logits, step) + gumbel_noise(seeds, step, vocab)).argmax(-1)
            retried += int((unfiltered != expected).sum())
    if spread < 1:
        assert retried  # the candidate left the nucleus on some rows: the retry path ran


def test_forced_eos_reads_the_raw_logits_and_the_schedule_expands_in_sample_order():
    logits = torch.tensor([[0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    # raw EOS (id 3) probabilities: 0.71, 0.25, 0.71; thresholds 0.5, 0.2, none
    rules = _rules([_row(force_eos_prob=0.5, min_new_tokens=5), _row(force_eos_prob=0.2), _row()], 4)
    assert rules.forced_eos(logits).tolist() == [True, True, False]
    assert _rules([_row()], 4).forced_eos(logits) is None
    d = Decoding(
        num_captions=5,
        min_new_tokens=2,
        max_new_tokens=7,
        force_eos_prob=0.3,
        schedule=[{"n": 2, "max_new_tokens": 3}, {"n": 3, "force_eos_prob": 0.2, "top_p": 0.5}],
    )
    per = d.per_sample()
    assert [s["max_new_tokens"] for s in per] == [3, 3, 7, 7, 7] and d.max_steps == 7
    assert [s["force_eos_prob"] for s in per] == [0.3, 0.3, 0.2, 0.2, 0.2]
    assert [s["top_p"] for s in per] == [0.9, 0.9, 0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="sum to 4, num_captions is 5"):
        Decoding(num_captions=5, schedule=[Group(n=4)])
    with pytest.raises(ValueError, match="needs sample: true"):
        Decoding(num_captions=1, sample=False, schedule=[Group(n=1)])


# ------------------------------------------------------------------- the captioner under a schedule


@pytest.fixture(scope="module")
def laion_like(ending_captioner):
    return Captioner(str(ending_captioner), device="cpu", decoding=LAION_LIKE, sync_every=3)


def _tokens(row: torch.Tensor, eos: int, pad: int) -> list[int]:
    out = []
    for t in row.tolist():
        if t in (eos, pad):
            break
        out.append(t)
    return out


def test_captions_under_a_schedule_do_not_change_with_batch_size(laion_like, images):
    cap, images = laion_like, images[:5]
    seeds = [31 + i for i in range(len(images))]
    batched = cap.caption(images, seeds)
    assert all(len(c) == LAION_LIKE.num_captions for c in batched)
    assert batched == [cap.caption([im], [s])[0] for im, s in zip(images, seeds)]
    assert batched == cap.caption(images[::-1], seeds[::-1])[::-1]
    # Compaction and the sync interval change no token either.
    pixels = cap.pixel_values(images)
    ids = cap.generate_ids(pixels, seeds)
    for compact, sync_every in [(False, 1), (True, 5)]:
        other = Captioner.__new__(Captioner)
        other.__dict__.update({**cap.__dict__, "compact": compact, "sync_every": sync_every})
        again = other.generate_ids(pixels, seeds)
        width = min(ids.shape[1], again.shape[1])
        assert torch.equal(ids[:, :width], again[:, :width])
    # Each sample keeps its group's maximum length; rows really end at different steps.
    per = LAION_LIKE.per_sample()
    lengths = [len(_tokens(r, cap.eos, cap.pad)) for r in ids]
    for row, n in enumerate(lengths):
        assert n <= per[row % len(per)]["max_new_tokens"]
    assert len(set(lengths)) > 3


def test_captioner_decodes_as_with_transformers_logits_processors(ending_captioner, images):
    """The whole decode with capfilt's warps equals the same loop driven by transformers' own
    processors (the path `decode` keeps for a `LogitsProcessorList`), sampled, LAION's warps."""
    warps = dict(top_k=120, top_p=0.6, repetition_penalty=1.3, min_new_tokens=3, temperature=0.9)
    decoding = Decoding(num_captions=6, max_new_tokens=14, **warps)
    cap = Captioner(str(ending_captioner), device="cpu", decoding=decoding, sync_every=2)
    pixels, seeds = cap.pixel_values(images[:4]), [7, 8, 9, 10]
    ours = cap.generate_ids(pixels, seeds)
    hf = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.3),
            MinNewTokensLengthLogitsProcessor(len(cap.prompt_ids), 3, cap.eos),
            TemperatureLogitsWarper(0.9),
            TopKLogitsWarper(120),
            TopPLogitsWarper(0.6),
        ]
    )
    with torch.inference_mode():
        embeds = cap.model.vision_model(pixels)
        rows = [i for i in range(len(seeds)) for _ in range(6)]
        images_kv = cap.model.text_decoder.bert.image_keys_values(embeds, rows)
        ref = cap.decode(images_kv, row_seeds(seeds, 6, "cpu"), hf, sample=True, steps=14, compact=True)
    assert torch.equal(ours, ref)
    assert len({len(_tokens(r, cap.eos, cap.pad)) for r in ours}) > 3  # rows end at different steps


# ------------------------------------------------------------- LAION-COCO's sampler, transcribed


@torch.no_grad()
def laion_generate(stock, pixels, prompt_ids, eos, key_seeds, per_sample, *, sample=True):
    """LAION-COCO's decode loop, transcribed from andreaskoepf/laion_idle_cap docker/sampling.py:
    `sample` (lines 243-275) and `generate` (130-239) with `repetition_penalty_apply` (69-73) and
    `top_k_top_p_filtering_batch` (76-127), on the stock transformers decoder, full forward every
    step (no cache), rows removed as they complete. One change: `torch.multinomial(p, 2,
    replacement=False)[:, :1]` (line 185-187; its second draw is unused with min_alternate_prob=0)
    becomes a Gumbel-max draw from the same filtered logits with capfilt's counter-based noise of
    the row's seed (or the argmax when ``sample`` is false), so both sides draw alike.
    Returns {row: (new token ids, why it ended)} with row = image * K + sample."""
    k = len(per_sample)
    col = lambda name, dtype: torch.tensor([s[name] for s in per_sample] * len(pixels), dtype=dtype)
    top_p, top_k = col("top_p", torch.float32), col("top_k", torch.long)
    min_length, max_length = col("min_new_tokens", torch.long), col("max_new_tokens", torch.long)
    penalty = col("repetition_penalty", torch.float32)
    force_eos_log_prob = torch.tensor([math.log(s["force_eos_prob"]) for s in per_sample] * len(pixels))
    # sample(): image_embeds.repeat_interleave(sample_count); prompt ids [DEC] + prompt, no [SEP]
    image_embeds = stock.vision_model(pixel_values=pixels).last_hidden_state.repeat_interleave(k, dim=0)
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    inputs = torch.tensor([prompt_ids] * len(image_embeds))
    seeds, rows = row_seeds(key_seeds, k, "cpu"), torch.arange(len(inputs))
    results = {}
    for i in range(int(max_length.max())):
        if inputs.size(0) == 0:
            break
        logits = stock.text_decoder(
            input_ids=inputs, encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts
        ).logits
        last_token_logits = logits[:, -1, :]
        raw_p = F.softmax(last_token_logits, dim=-1)
        min_indices = torch.nonzero(i < min_length).view(-1)
        last_token_logits[min_indices, eos] = float("-inf")
        # repetition_penalty_apply(last_token_logits, tokens=inputs, penalty=...) (per row here)
        tok_logits = torch.gather(last_token_logits, -1, inputs)
        tok_logits = torch.where(tok_logits < 0, tok_logits * penalty[:, None], tok_logits / penalty[:, None])
        last_token_logits.scatter_(-1, inputs, tok_logits)
        # top_k_top_p_filtering_batch: top_k per row (its tensor branch), then top_p over the rows
        for r in range(len(inputs)):
            kk = int(top_k[r])
            if kk <= 0:
                continue
            cutoff = torch.topk(last_token_logits[r], k=kk, largest=True).values[-1]
            last_token_logits[r][last_token_logits[r] < cutoff] = float("-inf")
        sorted_logits, sorted_indices = torch.sort(last_token_logits, descending=True, dim=-1)
        cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        sorted_indices_to_remove = cumulative_probs > top_p.unsqueeze(-1)
        sorted_indices_to_remove[:, 1:] = sorted_indices_to_remove[:, :-1].clone()
        sorted_indices_to_remove[:, 0] = False
        row_starts = torch.arange(sorted_indices.shape[0]).unsqueeze(1) * sorted_indices.shape[1]
        indices_to_remove = (sorted_indices + row_starts)[sorted_indices_to_remove]
        last_token_logits = last_token_logits.contiguous()
        last_token_logits.view(-1)[indices_to_remove] = float("-inf")
        eos_prob = raw_p[:, eos].log()
        if sample:
            noise = gumbel_noise(seeds, i, last_token_logits.shape[-1])
            next_token = torch.argmax(last_token_logits + noise, dim=-1, keepdim=True)
        else:
            next_token = torch.argmax(last_token_logits, dim=-1, keepdim=True)
        sampled_eos = next_token.squeeze(-1) == eos
        at_max = max_length <= i
        high_eos = eos_prob > force_eos_log_prob
        completed = sampled_eos | at_max | high_eos
        for r in completed.nonzero().flatten().tolist():
            why = "max" if at_max[r] else ("eos" if sampled_eos[r] else "forced")
            results[int(rows[r])] = (inputs[r, len(prompt_ids) :].tolist(), why, i < int(min_length[r]))
        keep = ~completed
        inputs, next_token, rows, seeds = inputs[keep], next_token[keep], rows[keep], seeds[keep]
        top_p, top_k, min_length, max_length = top_p[keep], top_k[keep], min_length[keep], max_length[keep]
        penalty, force_eos_log_prob = penalty[keep], force_eos_log_prob[keep]
        image_embeds, image_atts = image_embeds[keep], image_atts[keep]
        inputs = torch.cat([inputs, next_token], dim=-1)
    for r in range(len(inputs)):
        results[int(rows[r])] = (inputs[r, len(prompt_ids) :].tolist(), "max", False)
    return results


@pytest.mark.parametrize("sample", [True, False], ids=["fixed-noise", "greedy"])
def test_forced_eos_and_schedule_match_laion_cocos_sampler_token_for_token(ending_captioner, images, sample):
    decoding = (
        LAION_LIKE
        if sample
        else Decoding(
            num_captions=1,
            sample=False,
            repetition_penalty=1.3,
            min_new_tokens=3,
            max_new_tokens=16,
            force_eos_prob=0.097,
        )
    )
    cap = Captioner(str(ending_captioner), device="cpu", decoding=decoding, sync_every=2)
    stock = BlipForConditionalGeneration.from_pretrained(cap.ref.location).eval()
    picked = images[:4] if sample else images
    seeds = [500 + i for i in range(len(picked))]
    pixels = cap.pixel_values(picked)
    ours = cap.generate_ids(pixels, seeds)
    per_sample = decoding.per_sample()
    ref = laion_generate(stock, pixels, cap.prompt_ids, cap.eos, seeds, per_sample, sample=sample)
    assert len(ref) == len(ours) == len(picked) * decoding.samples
    for row, (tokens, why, _) in sorted(ref.items()):
        assert _tokens(ours[row], cap.eos, cap.pad) == tokens, (row, why)
    causes = [why for _, why, _ in ref.values()]
    # Every way to end happens here: the model's own EOS, forced EOS, a forced end before the
    # minimum length (LAION checks it at every step), and (with the schedule) each group's maximum.
    assert "forced" in causes and "eos" in causes and (not sample or "max" in causes), causes
    assert any(why == "forced" and early for _, why, early in ref.values())
    if sample:
        # LAION drops identical captions of an image; capfilt's candidates() marks them duplicate_text.
        from capfilt.stages.rows import candidates

        texts = cap.caption(picked, seeds)
        for caps in texts:
            kept = [c["text"] for c in candidates(None, "web_text_missing", caps)[1:] if not c["reason"]]
            assert len(kept) == len(set(kept)) == len({c for c in caps if c.strip()})


# ------------------------------------------------------------------------------------- the config


def test_schedule_config_is_validated():
    def cap(**kw):
        return parse_config({**NO_DECIDE, "captioner": {"model": "tiny-blip", **kw}}).captioner

    c = cap(
        schedule=[{"n": 8, "max_new_tokens": 20}, {"n": 32, "max_new_tokens": 45, "top_p": 0.3}], force_eos_prob=0.18
    )
    assert c.num_captions == 40  # from the schedule when not given
    assert c.model_dump()["schedule"][0] == {"n": 8, "max_new_tokens": 20}  # a group dumps what it sets
    # Without the new keys a config dumps (and fingerprints) as it did before they existed.
    assert not {"force_eos_prob", "schedule"} & set(cap().model_dump())
    fields = {k: v for k, v in c.model_dump().items() if k in Decoding.model_fields}
    d = Decoding(**fields)
    assert [s["max_new_tokens"] for s in d.per_sample()] == [20] * 8 + [45] * 32 and d.force_eos_prob == 0.18
    bad = [
        ({"num_captions": 4, "schedule": [{"n": 8}]}, "sum to 8, num_captions is 4"),
        ({"schedule": [{"n": 8, "top_q": 0.5}]}, "captioner.schedule.0.top_q: unknown key"),
        ({"schedule": [{"n": 2, "min_new_tokens": 9, "max_new_tokens": 4}]}, "schedule[0]: min_new_tokens 9"),
        ({"sample": False, "schedule": [{"n": 1}]}, "needs sample: true"),
        ({"schedule": [{"max_new_tokens": 3}]}, "captioner.schedule.0.n"),
        ({"force_eos_prob": 1.5}, "captioner.force_eos_prob"),
        ({"schedule": [{"n": 0}]}, "captioner.schedule.0.n"),
    ]
    for kw, message in bad:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            cap(**kw)


def test_decoding_is_the_captioner_sections_settings_checked_once():
    """The decode loop's `Decoding` is the captioner section's decoding settings, declared once:
    the same defaults, a schedule group's keys are the per-sample settings, and a bad value is
    refused by both with the same key and words (the checks are written once)."""
    assert Decoding().model_dump() == {k: getattr(CaptionerConfig(model="m"), k) for k in DECODING_SETTINGS}
    assert tuple(DecodingGroup.model_fields) == ("n", *PER_SAMPLE) and Group is DecodingGroup
    bad = [
        {"min_new_tokens": 9, "max_new_tokens": 4},
        {"num_captions": 4, "schedule": [{"n": 8}]},
        {"sample": False, "schedule": [{"n": 1}]},
        {"schedule": [{"n": 2, "min_new_tokens": 9, "max_new_tokens": 4}]},
        {"schedule": [{"n": 2, "top_p": 1.5}]},
        {"schedule": [{"n": 2, "top_k": "50"}]},
        {"top_k": True},
        {"temperature": float("nan")},
    ]
    for kw in bad:
        with pytest.raises(ValueError) as ours:
            Decoding(**kw)
        with pytest.raises(ValueError) as section:
            CaptionerConfig(model="m", **kw)
        assert [(e["loc"], e["msg"]) for e in ours.value.errors()] == [
            (e["loc"], e["msg"]) for e in section.value.errors()
        ], kw
    schedule = Decoding(schedule=[{"n": 2, "max_new_tokens": 9}, {"n": 1}])  # K defaults to the groups' sum
    assert schedule.num_captions == 3 and schedule.replace(max_new_tokens=12).max_steps == 12
    with pytest.raises(ValueError, match="sum to 3, num_captions is 4"):
        schedule.replace(num_captions=4)  # a changed copy is checked again


def test_laion_coco_recipe_decodes_as_laion_coco(root):
    c = load_config(root / "pipelines" / "laion_coco.yaml").captioner
    fields = {k: v for k, v in c.model_dump().items() if k in Decoding.model_fields}
    per = Decoding(**fields).per_sample()
    assert len(per) == c.num_captions == 40 and c.prompt == "a picture of "
    assert [s["max_new_tokens"] for s in per] == [20] * 8 + [30] * 8 + [30] * 8 + [45] * 8 + [45] * 8
    assert {
        (s["min_new_tokens"], s["top_k"], s["top_p"], s["repetition_penalty"], s["force_eos_prob"], s["temperature"])
        for s in per
    } == {(5, 9607, 0.2427084604681384, 1.3, 0.17937666742679637, 1.0)}
    assert c.sample


def test_rules_cost_nothing_when_unused():
    rules = _rules([_row()] * 3, 50)
    assert not (
        rules.use_penalty
        or rules.use_temperature
        or rules.use_top_k
        or rules.use_top_p
        or rules.use_force
        or rules.use_max
    )
    logits = torch.randn(3, 50)
    assert rules.warp(torch.zeros(3, 2, dtype=torch.long), logits, 0) is logits
    assert np.isfinite(logits.numpy()).all()


def test_benchmark_rows_at_laion_cocos_k_run_and_agree_with_stock(images):
    """`make bench`'s K=40 rows (benchmarks/suite.py `laion_rows`), small: both sides run, greedy ids
    with LAION's penalty and minimum length equal stock generate's. No timing is asserted."""
    import argparse

    from benchmarks.suite import laion_rows

    cap = Captioner("tiny-blip", device="cpu")
    stock = BlipForConditionalGeneration.from_pretrained(cap.ref.location).eval()
    args = argparse.Namespace(laion_k=10, precision="fp32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny steps: spinning OpenMP threads on a shared machine cost ~40x
    try:
        rows = laion_rows(cap, stock, cap.pixel_values(images[:2]), [0, 1], args, torch.device("cpu"), 1)
    finally:
        torch.set_num_threads(threads)
    assert [r["id"] for r in rows] == ["b40", "b40+"]
    assert rows[0]["ok"] is True and "identical" in rows[0]["check"]
    assert cap.decoding == Decoding()  # the captioner's own decoding is restored


def test_warps_leave_the_callers_logits_alone():
    """The warps write into one copy of the scores (not into ``logits``): the decode loop records
    those logits for the self-check and reads the forced-EOS rule from them."""
    torch.manual_seed(3)
    row = {
        "top_p": 0.5,
        "top_k": 7,
        "temperature": 0.7,
        "repetition_penalty": 1.3,
        "min_new_tokens": 2,
        "max_new_tokens": 6,
        "force_eos_prob": None,
    }
    rules = _rules([row] * 4, vocab=40)
    ids = torch.randint(0, 40, (4, 5))
    logits = torch.randn(4, 40)
    before = logits.clone()
    rules.choose(ids, logits, step=0, seeds=torch.arange(4))
    rules.warp(ids, logits, step=0)
    assert torch.equal(logits, before)
