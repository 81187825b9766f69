"""The decode loop every non-BLIP captioner family shares: K samples per image from capfilt's
per-key sampler, through the model's public forward and its own cache.

A family (hf.py, coca.py) supplies three calls on its stock model: ``prefill`` (one forward over
an image group's prompt, once per image, whose cache is then repeated for the K samples), ``step``
(one token per row, through the public forward with the cache the model returned) and ``keep``
(finished rows leave the cache: the cache's own ``batch_select_indices``). Everything that decides
a token is capfilt's and shared with the BLIP fast path: the per-row settings and warps of
decoding.py (`RowRules`: the LAION-COCO schedule, forced end of sequence, min/max lengths, top-p,
top-k, penalty) and the counter-based noise of sampling.py, so a caption depends only on its
image, its key's seed and the recipe -- never on batch size, order, worker count or resume.

Images are decoded in groups whose prompts have the same length (the prompt includes the image
tokens, whose number can depend on the image: SmolVLM splits an image into tiles), so no row is
ever padded and positions are the plain ``prompt length + step`` stock `generate` uses.
"""

from __future__ import annotations

import math

import torch

from capfilt.modeling.decoding import Decoding, RowRules
from capfilt.modeling.loading import index_tensor
from capfilt.modeling.sampling import row_seeds, sample_tokens


def decode(
    family,
    prompt_ids: torch.Tensor,
    logits: torch.Tensor,
    state,
    seeds: torch.Tensor,
    rules: RowRules,
    *,
    sample: bool,
    steps: int,
    compact: bool = True,
    sync_every: int = 4,
    record: list | None = None,
) -> torch.Tensor:
    """New token ids (rows, used steps); a finished row emits ``family.pad``.

    ``prompt_ids`` (rows, L): each row's prompt (what the repetition penalty counts, as stock
    `generate` does); ``logits``: the prefill's next-token logits per row; ``state``: the family's
    cache after the prompt. ``record``: when a list, each step's raw logits are appended."""
    device = logits.device
    n = prompt_ids.shape[0]
    eos = torch.tensor(family.eos_ids, device=device)
    extra_eos = [e for e in family.eos_ids if e != rules.eos]  # blocked before min_new_tokens as well
    out = torch.full((n, steps), family.pad, dtype=torch.long, device=device)
    alive = torch.arange(n, device=device)
    ids, done = prompt_ids, torch.zeros(n, dtype=torch.bool, device=device)
    used = 0
    for step in range(steps):
        logits = logits.float()
        if record is not None:
            record.append(logits)
        forced = rules.forced_eos(logits)
        scores = rules.warp(ids, logits, step)
        if extra_eos and step < rules.min_steps:
            scores = scores.clone()
            scores[:, extra_eos] = scores[:, extra_eos].masked_fill((step < rules.min_new)[:, None], -math.inf)
        nxt = sample_tokens(scores, seeds, step) if sample else scores.argmax(dim=-1)
        if forced is not None:
            nxt = torch.where(forced, torch.full_like(nxt, rules.eos), nxt)
        nxt = torch.where(done, torch.full_like(nxt, family.pad), nxt)
        out[:, step].index_copy_(0, alive, nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done = done | torch.isin(nxt, eos)
        at_max = rules.at_max(step)
        if at_max is not None:
            done = done | at_max
        used = step + 1
        if used == steps:
            break
        if used % sync_every == 0:
            finished = done.cpu()  # the loop's only host<->device sync
            if bool(finished.all()):
                break
            n_done = int(finished.sum())
            if compact and n_done and n_done >= 0.25 * len(finished):
                index = index_tensor((~finished).nonzero().flatten().tolist(), device)
                state = family.keep(state, index)
                rules = rules.keep(index)
                alive, seeds, ids, done, nxt = alive[index], seeds[index], ids[index], done[index], nxt[index]
        logits = family.step(nxt, state, prompt_ids.shape[1] + step)
    return out[:, :used]


def caption_ids(family, decoding: Decoding, images: list, key_seeds: list[int]) -> list[torch.Tensor]:
    """Each image's K rows of new token ids (K x steps, finished rows padded), in image order."""
    k = decoding.samples
    result: list = [None] * len(images)
    for members, inputs in family.groups(images):
        prompt_ids, logits, state = family.prefill(inputs, k)
        seeds = row_seeds([key_seeds[i] for i in members], k, family.device)
        rules = RowRules.for_decoding(
            decoding,
            len(members),
            eos=family.eos_ids[0],
            vocab_size=logits.shape[-1],
            sample=decoding.sample,
            device=family.device,
        )
        ids = decode(
            family, prompt_ids, logits, state, seeds, rules, sample=decoding.sample, steps=decoding.max_steps
        ).cpu()
        for j, i in enumerate(members):
            result[i] = ids[j * k : (j + 1) * k]
    return result


def texts(family, rows: torch.Tensor) -> list[str]:
    """Rows of new ids as text: each cut at its first end of sequence, special tokens dropped."""
    stops = set(family.eos_ids)
    out = []
    for row in rows.tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        out.append(" ".join(family.decode_tokens(row[:cut]).split()))
    return out
