"""`capfilt eval`: retrieval recall (ITC, and ITM re-ranking of the ITC top-k, as BLIP) and
captioning BLEU-4 / CIDEr-D on a held-out set, for the exported filter and captioner.

The models are loaded by capfilt's own `ItmFilter` / `Captioner` (what CapFilt runs), so the
numbers describe the checkpoints the pipeline will use. Captions are greedy (BLIP reports beam
search; capfilt's captioner has no beam search), with the captioner's prompt stripped.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from capfilt.config import DEFAULT_PROMPT
from capfilt.metrics import bleu, cider_d, recall_at_k, roc_auc, tokenize
from capfilt.train.data import Item, decode_rgb

log = logging.getLogger(__name__)


def load_images(items: list[Item]) -> tuple[list[np.ndarray], list[list[str]]]:
    images, refs = [], []
    for item in items:
        rgb = decode_rgb(item)
        if rgb is None:
            log.warning("%s: image does not decode; left out of the evaluation", item.key)
            continue
        images.append(np.array(rgb))  # writable: the image processor hands it to torch
        refs.append(item.texts)
    if not images:
        raise ValueError("no evaluation image decodes")
    return images, refs


@torch.inference_mode()
def _features(filt, images, texts, batch_size):
    """ViT embeddings and ITC features of every image and text, by the filter's own methods."""
    embeds, image_feat, text_feat = [], [], []
    for i in range(0, len(images), batch_size):
        e = filt.image_embeds(images[i : i + batch_size])
        embeds.append(e)
        image_feat.append(filt.model.image_feat(e))
    for i in range(0, len(texts), batch_size):
        tok = filt.tokenize(texts[i : i + batch_size])
        text_feat.append(filt.model.text_feat(tok.input_ids, tok.attention_mask))
    return torch.cat(embeds), torch.cat(image_feat), torch.cat(text_feat)


@torch.inference_mode()
def _itm_match_logits(filt, embeds: torch.Tensor, rows: list[int], texts: list[str]) -> np.ndarray:
    """ITM "match" logit of each (embeds[rows[j]], texts[j]) pair (BLIP ranks by the logit, not the prob)."""
    tok = filt.tokenize(texts)
    images = filt.model.text_encoder.image_keys_values(embeds, rows)
    return filt.model.itm_logits(tok.input_ids, tok.attention_mask, images)[:, 1].cpu().numpy()


def _summary(i2t: dict, t2i: dict) -> dict:
    out = {f"txt_r{k}": v for k, v in i2t.items()} | {f"img_r{k}": v for k, v in t2i.items()}
    out["r_mean"] = float(np.mean(list(out.values())))
    return out


def retrieval(filter_model: str, images, refs, *, k_test: int = 16, batch_size: int = 32, device: str = "auto") -> dict:
    from capfilt.modeling.itm_filter import ItmFilter

    filt = ItmFilter(filter_model, device=device)
    texts = [t for r in refs for t in r]
    txt2img = [i for i, r in enumerate(refs) for _ in r]
    img2txt = [set() for _ in refs]
    for j, i in enumerate(txt2img):
        img2txt[i].add(j)
    embeds, image_feat, text_feat = _features(filt, images, texts, batch_size)
    sims = (image_feat @ text_feat.t()).float().cpu().numpy()
    t2i_pos = [{i} for i in txt2img]
    out = {"itc": _summary(recall_at_k(sims, img2txt), recall_at_k(sims.T, t2i_pos))}
    # Re-rank each query's ITC top-k by ITM logit + ITC similarity (BLIP's evaluation); the rest
    # keep a score below any re-ranked one.
    k_i, k_t = min(k_test, len(texts)), min(k_test, len(images))
    i2t = np.full_like(sims, -100.0)
    for i in range(len(images)):
        top = np.argsort(-sims[i], kind="stable")[:k_i]
        logits = _itm_match_logits(filt, embeds[i : i + 1], [0] * len(top), [texts[j] for j in top])
        i2t[i, top] = logits + sims[i, top]
    t2i = np.full_like(sims.T, -100.0)
    for j in range(len(texts)):
        top = np.argsort(-sims[:, j], kind="stable")[:k_t]
        logits = _itm_match_logits(
            filt, embeds[torch.as_tensor(top, device=embeds.device)], list(range(len(top))), [texts[j]] * len(top)
        )
        t2i[j, top] = logits + sims[top, j]
    out["itm"] = _summary(recall_at_k(i2t, img2txt), recall_at_k(t2i, t2i_pos))
    # Matched vs mismatched pairs as CapFilt's filter sees them (ITM probability): the image's first
    # reference vs the first reference of the image half the set away (one that is not its own).
    shift = max(1, len(images) // 2)
    negatives = [next((t for t in refs[(i + shift) % len(refs)] if t not in refs[i]), None) for i in range(len(refs))]
    pairs = [[r[0]] + ([n] if n else []) for r, n in zip(refs, negatives)]
    itm, itc = filt.score(images, pairs)
    pos = np.array([s[0] for s in itm])
    neg = np.array([s[1] for s in itm if len(s) > 1])
    out["itm_auc"] = roc_auc(pos, neg) if len(neg) else None
    out["itc_auc"] = (
        roc_auc(np.array([s[0] for s in itc]), np.array([s[1] for s in itc if len(s) > 1])) if len(neg) else None
    )
    return out


def captioning(
    captioner_model: str,
    images,
    refs,
    *,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 20,
    min_new_tokens: int = 5,
    batch_size: int = 32,
    device: str = "auto",
) -> dict:
    from capfilt.modeling.captioner import Captioner, Decoding

    cap = Captioner(
        captioner_model,
        device=device,
        decoding=Decoding(
            num_captions=1, sample=False, prompt=prompt, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens
        ),
    )
    captions = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        captions += [c[0] for c in cap.caption(chunk, key_seeds=[0] * len(chunk))]
    hyps = [tokenize(c) for c in captions]
    gts = [[tokenize(r) for r in rs] for rs in refs]
    b = bleu(gts, hyps)
    cider, _ = cider_d(gts, hyps)
    return {
        **{f"bleu{k + 1}": b[k] for k in range(4)},
        "cider": cider,
        "examples": [{"caption": c, "references": r} for c, r in zip(captions[:5], refs[:5])],
    }


def evaluate(
    items: list[Item],
    *,
    filter: str | None = None,
    captioner: str | None = None,
    k_test: int = 16,
    batch_size: int = 32,
    device: str = "auto",
    prompt: str = DEFAULT_PROMPT,
    max_images: int | None = None,
) -> dict:
    if not filter and not captioner:
        raise ValueError("evaluate needs a filter and/or a captioner")
    images, refs = load_images(items[:max_images] if max_images else items)
    result: dict = {"images": len(images), "texts": sum(len(r) for r in refs)}
    if filter:
        result["retrieval"] = retrieval(filter, images, refs, k_test=k_test, batch_size=batch_size, device=device)
    if captioner:
        result["captioning"] = captioning(captioner, images, refs, prompt=prompt, batch_size=batch_size, device=device)
    return result


def format_report(result: dict) -> str:
    lines = [f"{result['images']} images, {result['texts']} reference texts"]
    for name, r in result.get("retrieval", {}).items():
        if isinstance(r, dict):
            lines.append(
                f"  {name.upper():4s} text R@1/5/10 {r['txt_r1']:.1f}/{r['txt_r5']:.1f}/{r['txt_r10']:.1f}  "
                f"image R@1/5/10 {r['img_r1']:.1f}/{r['img_r5']:.1f}/{r['img_r10']:.1f}  mean {r['r_mean']:.1f}"
            )
    if result.get("retrieval", {}).get("itm_auc") is not None:
        lines.append(
            f"  ITM AUC (matched vs mismatched) {result['retrieval']['itm_auc']:.3f}, "
            f"ITC AUC {result['retrieval']['itc_auc']:.3f}"
        )
    if "captioning" in result:
        c = result["captioning"]
        lines.append(f"  captions BLEU-4 {c['bleu4']:.3f}  CIDEr {c['cider']:.3f}")
        lines += [f"    {e['caption']!r}  (ref: {e['references'][0]!r})" for e in c["examples"][:3]]
    return "\n".join(lines)
