"""Load-time check of a captioner family: capfilt's decode loop (loop.py) against the stock
`generate` of the same model, greedy, on the probe images of selfcheck.py, two rows per image
(so the cache shared by an image's K samples is checked too). The token ids must be equal step
for step until each row ends, and where the stock side returns its logits (transformers), those
too within selfcheck's tolerance; otherwise the run refuses to start with one line
(`ModelMismatch`). The probe runs in fp32 whatever the run's precision."""

from __future__ import annotations

import time

import torch

from capfilt.modeling.decoding import RowRules
from capfilt.modeling.selfcheck import PROBE_STEPS, TOLERANCE, ModelMismatch, max_diff, probe_images

ROWS_PER_IMAGE = 2


def _cut(ids: torch.Tensor, stops: list[int], pad: int) -> torch.Tensor:
    """Ids with everything after a row's first stop token set to ``pad`` (how each side pads differs)."""
    ids = ids.clone()
    ended = torch.zeros(ids.shape[0], dtype=torch.bool)
    for j in range(ids.shape[1]):
        ids[ended, j] = pad
        ended |= torch.isin(ids[:, j], torch.tensor(stops))
    return ids


@torch.inference_mode()
def check_family(family, name: str, stock_name: str) -> dict:
    from capfilt.modeling.families.loop import decode

    start = time.perf_counter()
    saved, family.precision = family.precision, "fp32"
    diffs = {"ids": 0.0, "logit": 0.0}
    try:
        for members, inputs in family.groups(probe_images()):
            k = ROWS_PER_IMAGE
            prompt, logits, state = family.prefill(inputs, k)
            rows = len(members) * k
            rules = RowRules.plain(
                rows,
                PROBE_STEPS,
                eos=family.eos_ids[0],
                vocab_size=logits.shape[-1],
                sample=False,
                device=family.device,
            )
            seeds = torch.zeros(rows, dtype=torch.long, device=family.device)
            record: list = []
            ours = decode(
                family,
                prompt,
                logits,
                state,
                seeds,
                rules,
                sample=False,
                steps=PROBE_STEPS,
                compact=False,
                record=record,
            ).cpu()
            stock_ids, stock_logits = family.stock_greedy(inputs, PROBE_STEPS)
            stock_ids = stock_ids.cpu().repeat_interleave(k, dim=0)
            n = min(ours.shape[1], stock_ids.shape[1])
            a, b = _cut(ours, family.eos_ids, family.pad), _cut(stock_ids, family.eos_ids, family.pad)
            if ours.shape[1] != stock_ids.shape[1] and not (a[:, n:] == family.pad).all():
                diffs["ids"] = max(diffs["ids"], float(abs(ours.shape[1] - stock_ids.shape[1])))
            diffs["ids"] = max(diffs["ids"], float((a[:, :n] != b[:, :n]).sum()))
            if stock_logits is not None:
                m = min(len(record), len(stock_logits))
                ref = torch.stack([s.float() for s in stock_logits[:m]], dim=1).repeat_interleave(k, dim=0)
                diffs["logit"] = max(diffs["logit"], max_diff(torch.stack(record[:m], dim=1), ref, per_row=True))
    finally:
        family.precision = saved
    bad = diffs["ids"] != 0 or not (diffs["logit"] <= TOLERANCE)
    if bad:
        raise ModelMismatch(
            f"captioner {name}: capfilt's decoding disagrees with {stock_name} on the load-time probe "
            f"({diffs['ids']:.0f} greedy token(s) differ, max |Δlogit| = {diffs['logit']:.1e}, tolerance "
            f"{TOLERANCE:.0e}); refusing to run with it. Check the installed versions against the lock "
            "(requirements.lock); `self_check: false` skips this check"
        )
    return {"diffs": diffs, "seconds": time.perf_counter() - start}
