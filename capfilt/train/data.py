"""Training and evaluation data: capfilt cleaned shards, plain WebDataset shards, COCO-style sets.

An item is one image with its texts. Which item a micro-batch holds, and which of its texts is
used, is a pure function of (seed, batch number): a resumed run (or another worker count) sees the
same samples. Shards are read by CapFilt's own reader (io.shards.read_shard), so training finds the
samples, keys and failures CapFilt finds; images of local uncompressed tars are read by offset,
never held in memory.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from capfilt.io.folder import is_local, local_name
from capfilt.io.images import DecodeLimits, ImageDecodeError, decode_image
from capfilt.io.shards import ShardReadError, expand_shards, image_ext, read_shard, text_of

log = logging.getLogger(__name__)


@dataclass
class Item:
    key: str
    texts: list[str]
    image_id: int  # items of one image share it: ITC positives, never ITM negatives
    path: str  # image file, or the shard holding it
    offset: int = -1  # byte offset inside the shard (-1: `path` is the image file)
    size: int = 0
    data: bytes | None = field(default=None, repr=False)  # kept only when offsets are impossible

    def image_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:
            if self.offset >= 0:
                f.seek(self.offset)
                return f.read(self.size)
            return f.read()


def _texts_of(sample) -> tuple[list[str], str | None]:
    """(texts, None) of a sample: a cleaned shard's kept texts (json "texts"), else its web text by
    CapFilt's own rule (io.shards.text_of: the .txt, or the sidecar's caption); or ([], the
    reason CapFilt rejects that web text with)."""
    if "json" in sample.members:
        try:
            meta = json.loads(sample.members["json"])
            texts = [t["text"] for t in meta.get("texts", []) if isinstance(t, dict) and t.get("text")]
            if texts:
                return [" ".join(t.split()) for t in texts], None
        except (ValueError, AttributeError, TypeError):
            pass
    text, reason = text_of(sample)
    return ([" ".join(text.split())], None) if text else ([], reason)


def _small(ext: str) -> bool:
    """Members training reads into memory when indexing a local tar: texts, never images."""
    return ext.rpartition(".")[2] in ("txt", "json")


def _index(url: str, skipped: Counter) -> list[Item]:
    """Items of one shard, read by io.shards' reader: a local uncompressed tar with images left
    in place (offsets), any other shard streamed with its images in memory."""
    path = local_name(url) if is_local(url) else None
    if path is not None and path.endswith(".tar"):
        try:
            return _items(read_shard(url, load=_small), url, path, skipped)
        except ShardReadError:
            # A compressed tar named ".tar" has no file offsets; read it like a remote shard
            # (which raises again if it is no tar at all).
            log.info("%s: not an uncompressed tar; reading it with its images in memory", url)
    return _items(read_shard(url), url, url, skipped)


def _items(samples, url: str, path: str, skipped: Counter) -> list[Item]:
    """One Item per sample the reader does not fail that has an image and a text. A sample the
    reader fails (a duplicate key's later copy, the sample a tar breaks off in, an unsafe key) is
    skipped under the reader's reason, as CapFilt counts it failed; never merged with another."""
    items = []
    for s in samples:
        ext = image_ext([*s.members, *s.spans])
        texts, no_text = _texts_of(s)
        if s.failure or ext is None or not texts:
            skipped[s.failure or ("no_image" if ext is None else no_text)] += 1
            continue
        if ext in s.spans:
            span = s.spans[ext]
            items.append(Item(key=s.key, texts=texts, image_id=-1, path=path, offset=span.offset, size=span.size))
        else:
            items.append(Item(key=s.key, texts=texts, image_id=-1, path=url, data=s.members[ext]))
    return items


def load_shards(spec, skipped: Counter | None = None) -> list[Item]:
    """Training items of the shards `spec` names (io.shard_urls.expand_shards). Samples that are
    skipped are counted by reason into `skipped` (if given) and logged, never dropped silently."""
    skipped = Counter() if skipped is None else skipped
    before = skipped.copy()
    items = []
    for url in expand_shards(spec):
        items += _index(url, skipped)
    here = skipped - before
    if here:
        total = sum(here.values())
        log.warning(
            "skipped %d of %d samples (reason: count): %s",
            total,
            total + len(items),
            ", ".join(f"{k}: {v}" for k, v in sorted(here.items())),
        )
    return items


def load_coco(annotations: str, images: str | None = None) -> list[Item]:
    """COCO captions ({"images", "annotations"}) or BLIP's list ([{"image", "caption"}]): one
    item per image, all of its captions as texts."""
    path = Path(annotations)
    root = Path(images) if images else path.parent
    data = json.loads(path.read_text())
    by_image: dict[str, list[str]] = {}
    if isinstance(data, dict):
        files = {im["id"]: im["file_name"] for im in data["images"]}
        for ann in data["annotations"]:
            by_image.setdefault(files[ann["image_id"]], []).append(ann["caption"])
    else:
        for entry in data:
            captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            by_image.setdefault(entry["image"], []).extend(captions)
    return [
        Item(key=Path(f).stem, texts=[" ".join(c.split()) for c in caps], image_id=-1, path=str(root / f))
        for f, caps in by_image.items()
    ]


def load_sources(sources) -> list[Item]:
    """Items of every source, with dense image ids; raises if there is nothing to train on."""
    items = []
    for src in sources:
        items += load_shards(src.path) if src.kind == "shards" else load_coco(src.path, src.images)
    for i, item in enumerate(items):
        item.image_id = i
    if not items:
        raise ValueError("the data sources hold no usable samples")
    return items


def batch_plan(n_items: int, batch_size: int, seed: int, start: int, rank: int = 0, world: int = 1):
    """Micro-batches from number `start` on, forever: this rank's share of [(epoch, item, text_seed)].
    Each epoch is a fresh permutation; an incomplete last batch is dropped."""
    per_epoch = n_items // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {n_items} training items")
    share = batch_size // world
    b = start
    while True:
        epoch, pos = divmod(b, per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(n_items)
        rows = perm[pos * batch_size : (pos + 1) * batch_size][rank * share : (rank + 1) * share]
        yield [(epoch, int(i), seed) for i in rows]
        b += 1


def augment_image(image, rng: np.random.Generator, crop_scale=None, hflip: bool = False):
    """A random square crop of `crop_scale` of the area (at least 1 px), resized back; a mirror."""
    from PIL import Image

    if crop_scale is not None:
        w, h = image.size
        side = max(1, round(min(w, h) * float(np.sqrt(rng.uniform(*crop_scale)))))
        x, y = int(rng.integers(w - side + 1)), int(rng.integers(h - side + 1))
        image = image.resize((w, h), Image.Resampling.BICUBIC, box=(x, y, x + side, y + side))
    if hflip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


class TrainSet(torch.utils.data.Dataset):
    """Decoded, preprocessed samples; one text and the augmentation drawn per visit, seeded by
    (seed, epoch, item)."""

    def __init__(self, items: list[Item], image_processor, augment=None):
        self.items = items
        self.image_processor = image_processor
        self.augment = augment  # config.Augment, or None
        self.limits = DecodeLimits(max_side=1024)
        self.warned: set[str] = set()

    def __len__(self):
        return len(self.items)

    def pixels(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        # An image that does not decode is replaced by the next one: deterministic, never a crash.
        for k in range(len(self.items)):
            item = self.items[(index + k) % len(self.items)]
            try:
                image = decode_image(item.image_bytes(), self.limits)
                if self.augment is not None:
                    image = augment_image(image, rng, self.augment.crop_scale, self.augment.hflip)
                return self.image_processor(images=image, return_tensors="pt").pixel_values[0]
            except (ImageDecodeError, OSError) as err:
                if item.key not in self.warned:  # once per image, not once per epoch
                    self.warned.add(item.key)
                    log.warning("%s: image skipped (%s)", item.key, err)
        raise ValueError("no image in the training set decodes")

    def __getitem__(self, spec):
        epoch, index, seed = spec
        item = self.items[index]
        rng = np.random.default_rng([seed, epoch, index])
        text = item.texts[int(rng.integers(len(item.texts)))]
        return self.pixels(index, rng), text, item.image_id


class Collate:
    """Tokenise a micro-batch for the encoder (ITC/ITM) and the decoder (prompt + caption, LM)."""

    def __init__(
        self, tokenizer, prompt: str, max_text_tokens: int, max_caption_tokens: int, bos_token_id: int | None = None
    ):
        self.tok, self.prompt = tokenizer, prompt
        # The decoder's start token: the model config's (what the captioner and stock `generate`
        # start from), which a checkpoint's tokenizer may not declare as its bos token.
        self.bos = tokenizer.bos_token_id if bos_token_id is None else bos_token_id
        if self.bos is None:
            raise ValueError("no decoder start token: the tokenizer has no bos token and none was given")
        self.max_text, self.max_caption = max_text_tokens, max_caption_tokens
        self.prompt_len = len(tokenizer(prompt).input_ids) - 1  # [CLS] + prompt words, as BLIP

    def __call__(self, rows):
        pixels, texts, ids = zip(*rows)
        enc = self.tok(list(texts), padding="longest", truncation=True, max_length=self.max_text, return_tensors="pt")
        dec = self.tok(
            [self.prompt + t for t in texts],
            padding="longest",
            truncation=True,
            max_length=self.max_caption,
            return_tensors="pt",
        )
        dec_ids = dec.input_ids.clone()
        dec_ids[:, 0] = self.bos  # [CLS] -> [DEC], what the captioner starts from
        labels = dec_ids.masked_fill(dec.attention_mask == 0, -100)
        labels[:, : self.prompt_len] = -100
        return {
            "pixel_values": torch.stack(pixels),
            "image_ids": torch.tensor(ids, dtype=torch.long),
            "input_ids": enc.input_ids,
            "attention_mask": enc.attention_mask,
            "dec_input_ids": dec_ids,
            "dec_attention_mask": dec.attention_mask,
            "dec_labels": labels,
        }


def decode_rgb(item: Item):
    """The item's image as RGB PIL (evaluation), or None when it does not decode."""
    try:
        return decode_image(item.image_bytes(), DecodeLimits(max_side=1024))
    except (ImageDecodeError, OSError):
        return None
