"""The captioner: K synthetic captions per image, with the weights of a `BlipForConditionalGeneration`.

The compute is capfilt's own (blip.py), loaded strictly from the stock checkpoint and checked
against the stock model when it loads (selfcheck.py). Stock `generate(num_return_sequences=K)`
copies each image's embeddings K times, recomputes their cross-attention K/V per copy, and draws
from one global random stream, which makes captions depend on batch composition. Here one vision
pass and one cross-attention K/V computation serve all K samples of an image (and are never
copied per sample), the decoder keeps its own KV cache, noise comes from per-key seeds
(sampling.py), and finished rows are compacted out of the batch. Each row decodes with its own
parameters (decoding.py: a schedule gives groups of an image's K samples their own top-p, top-k,
lengths, penalty and LAION-COCO's forced end of sequence), applied per row inside the one batched
loop; the warps are the ones stock `generate` applies, and tests compare them with transformers'
logits processors and with LAION-COCO's sampler.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoProcessor, BlipForConditionalGeneration

from capfilt.modeling.attention import DecoderCache, ImageKeysValues
from capfilt.modeling.blip import BlipCaptioning
from capfilt.modeling.decoding import Decoding, Group, RowRules
from capfilt.modeling.loading import (
    from_pretrained,
    index_tensor,
    inference_autocast,
    pick_device,
    release_freed_memory,
)
from capfilt.modeling.presets import check_vocabulary, resolve_blip
from capfilt.modeling.sampling import row_seeds

__all__ = ["Captioner", "Decoding", "Group"]


class Captioner:
    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        device: str = "auto",
        precision: str = "fp32",
        decoding: Decoding = Decoding(),
        sync_every: int = 4,
        compact: bool = True,
        self_check: bool = True,
        max_rows: int = 128,
    ):
        """``sync_every``: decode steps between checks of which rows finished (one host sync each).
        ``compact``: drop finished rows from the batch at those checks. Neither changes a caption.
        ``max_rows``: rows (images x K) decoded together; a batch with more images is decoded in
        groups of images, so its cross-attention keys/values and KV cache exist for one group at a
        time (at K = 40 and 32 images: ~0.6 GB instead of ~6 GB at BLIP-base). No caption changes.
        ``self_check``: compare with the stock model on a probe at load and refuse on disagreement."""
        self.ref = resolve_blip(model, "captioner", revision)
        self.sync_every, self.compact, self.compact_fraction = max(1, sync_every), compact, 0.25
        self.max_rows = max(1, max_rows)
        self.device = pick_device(device)
        self.precision = precision
        self.decoding = decoding
        self.processor = AutoProcessor.from_pretrained(self.ref.location, revision=self.ref.revision)
        stock = from_pretrained(BlipForConditionalGeneration, self.ref.location, self.ref.revision).to(self.device)
        text_cfg = stock.config.text_config
        check_vocabulary(len(self.processor.tokenizer), text_cfg.vocab_size, f"captioner.model {model}")
        self.model = BlipCaptioning.load_stock(stock)
        self.bos, self.eos, self.pad = text_cfg.bos_token_id, text_cfg.sep_token_id, text_cfg.pad_token_id
        self.vocab_size = text_cfg.vocab_size
        prompt = self.processor.tokenizer(decoding.prompt, add_special_tokens=False).input_ids
        self.prompt_ids = [self.bos, *prompt]  # stock BLIP: [CLS] replaced by [DEC], trailing [SEP] dropped
        if self_check:
            from capfilt.modeling.selfcheck import check_captioner

            self.check = check_captioner(self, stock)
        del stock  # its tensors live on in self.model
        release_freed_memory()

    @property
    def identity(self) -> dict:
        return self.ref.identity

    def rules(self, images: int) -> RowRules:
        """The per-row decoding parameters of ``images`` images x their samples (rows key-major)."""
        return RowRules.for_decoding(
            self.decoding,
            images,
            eos=self.eos,
            vocab_size=self.vocab_size,
            sample=self.decoding.sample,
            device=self.device,
        )

    def pixel_values(self, images: list[np.ndarray]) -> torch.Tensor:
        return self.processor.image_processor(images=images, return_tensors="pt").pixel_values.to(self.device)

    @torch.inference_mode()
    def generate_ids(self, pixel_values: torch.Tensor, key_seeds: list[int]) -> torch.Tensor:
        """Token ids (B*K, new tokens), rows key-major; finished rows are padded.

        Images are decoded in groups of at most `max_rows` rows: one ViT pass and one
        cross-attention K/V computation per group, shared by each image's K rows."""
        k = self.decoding.samples
        per = max(1, self.max_rows // k)
        groups = []
        with inference_autocast(self.device, self.precision):
            for start in range(0, len(key_seeds), per):
                seeds = key_seeds[start : start + per]
                image_embeds = self.model.vision_model(pixel_values[start : start + per])
                rows = [i for i in range(len(seeds)) for _ in range(k)]
                images = self.model.text_decoder.bert.image_keys_values(image_embeds, rows)
                del image_embeds  # only the keys/values are read from here on
                groups.append(
                    self.decode(
                        images,
                        row_seeds(seeds, k, self.device),
                        self.rules(len(seeds)),
                        sample=self.decoding.sample,
                        steps=self.decoding.max_steps,
                        compact=self.compact,
                    )
                )
        if len(groups) == 1:
            return groups[0]
        width = max(g.shape[1] for g in groups)
        return torch.cat([F.pad(g, (0, width - g.shape[1]), value=self.pad) for g in groups])

    def decode(
        self,
        images: ImageKeysValues,
        seeds: torch.Tensor,
        rules,
        *,
        sample: bool,
        steps: int,
        compact: bool,
        record: list | None = None,
    ) -> torch.Tensor:
        """The decode loop over all rows of ``images``; finished rows leave the batch at sync points.

        A row's tokens depend only on its own image, prompt, decoding parameters (``rules``, a
        `RowRules`; a transformers `LogitsProcessorList` is taken as uniform rules applying it) and
        (seed, step, token) noise, so removing finished rows changes no caption. A row finishes on
        end-of-sequence (sampled, or forced by ``force_eos_prob``) or at its own maximum length.
        The device is asked whether rows finished only every `sync_every` steps; a finished row
        emits padding until it is removed.
        ``record``: when a list, each step's raw next-token logits are appended (the self-check).
        """
        n = len(images.rows)
        if not isinstance(rules, RowRules):
            rules = RowRules.plain(
                n, steps, eos=self.eos, vocab_size=self.vocab_size, sample=sample, device=self.device, processors=rules
            )
        decoder = self.model.text_decoder
        out = torch.full((n, steps), self.pad, dtype=torch.long, device=self.device)
        alive = torch.arange(n, device=self.device)  # original position of each row still decoding
        prompt = len(self.prompt_ids)
        # every row's tokens so far (the repetition penalty reads them), written in place
        ids = torch.full((n, prompt + steps), self.pad, dtype=torch.long, device=self.device)
        ids[:, :prompt] = torch.tensor(self.prompt_ids, device=self.device)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        cache = DecoderCache(len(decoder.bert.encoder.layer), prompt + steps)
        logits = self._prompt_logits(images, ids[:, :prompt], cache)
        used = 0
        for step in range(steps):
            if step:
                logits = decoder.next_token_logits(ids[:, prompt + step - 1 : prompt + step], images, cache)
            logits = logits.float()
            if record is not None:
                record.append(logits)
            forced = rules.forced_eos(logits)  # on the raw logits, before any warp
            nxt = rules.choose(ids[:, : prompt + step], logits, step, seeds if sample else None)
            if forced is not None:
                nxt = nxt.masked_fill(forced, self.eos)
            nxt = nxt.masked_fill(done, self.pad)
            out[:, step].index_copy_(0, alive, nxt)
            ids[:, prompt + step] = nxt
            done = done | (nxt == self.eos)
            at_max = rules.at_max(step)
            if at_max is not None:
                done = done | at_max
            used = step + 1
            if used % self.sync_every and used < steps:
                continue
            finished = done.cpu()  # the loop's only host<->device sync
            if bool(finished.all()):
                break
            n_done = int(finished.sum())
            if compact and n_done and n_done >= self.compact_fraction * len(images.rows):
                keep = (~finished).nonzero().flatten().tolist()
                index = index_tensor(keep, self.device)
                cache.keep(index)
                images = images.keep(keep)
                rules = rules.keep(index)
                alive, seeds, ids, done = alive[index], seeds[index], ids[index], done[index]
        return out[:, :used]

    def _prompt_logits(self, images: ImageKeysValues, prompt: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """The prompt's pass: every row of an image has the same prompt, so it runs once per image
        and its logits and cache rows are shared by that image's K rows (K times less work than
        running it per row, which at K = 40 cost more than a whole ViT pass)."""
        first: dict[int, int] = {}
        for image in images.rows:
            first.setdefault(image, len(first))
        if len(first) == len(images.rows):
            return self.model.text_decoder.next_token_logits(prompt, images, cache)
        own = images.for_rows(list(first))
        logits = self.model.text_decoder.next_token_logits(prompt[: len(first)], own, cache)
        index = index_tensor([first[image] for image in images.rows], self.device)
        cache.keep(index)
        return logits.index_select(0, index)

    def decode_text(self, token_ids: torch.Tensor) -> list[str]:
        texts = self.processor.tokenizer.batch_decode(token_ids.cpu(), skip_special_tokens=True)
        prompt = self.decoding.prompt.strip()
        # BLIP strips the prompt from the decoded text; we decode only new tokens, so it is gone
        # unless the model repeated it, which we keep as the model's own words.
        return [" ".join(t.split()) for t in texts] if prompt else texts

    def caption(self, images: list[np.ndarray], key_seeds: list[int]) -> list[list[str]]:
        """K captions for each image, as a list per image."""
        if not images:
            return []
        ids = self.generate_ids(self.pixel_values(images), key_seeds)
        texts = self.decode_text(ids)
        k = len(texts) // len(images)
        return [texts[i * k : (i + 1) * k] for i in range(len(images))]
