"""The ``coca`` family: open_clip's `CoCa` (contrastive + captioning in one model).

open_clip's CoCa has no KV cache: its own `generate` runs the public forward over the whole text
at every step (with the image's latent and tokens computed once), and so does this family, with
capfilt's sampler deciding the tokens (loop.py). open_clip ends a caption at end-of-text or at its
pad id (0), so both end one here too.
"""

from __future__ import annotations

import numpy as np
import torch

from capfilt.modeling.loading import autocast
from capfilt.modeling.presets import ModelRefError


class CocaFamily:
    family = "coca"

    def __init__(self, name: str, pretrained, *, prompt: str, instruction, steps: int, what: str, device, precision):
        import open_clip

        if instruction:
            raise ModelRefError(f"{what}: a CoCa model has no chat template; drop captioner.instruction")
        self.device, self.precision = device, precision
        model, _, self.preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
        if not isinstance(model, open_clip.CoCa):
            raise ModelRefError(f"{what}: an open_clip {type(model).__name__}, not a CoCa; it cannot write captions")
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        sot, eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        self.eos_ids = [eot] + ([model.pad_id] if model.pad_id != eot else [])
        self.pad = model.pad_id
        self.prompt = [sot, *self.tokenizer.encode(prompt)] if prompt.strip() else [sot]
        if len(self.prompt) + steps > model.context_length:
            raise ModelRefError(
                f"{what}: the prompt ({len(self.prompt)} tokens) and max_new_tokens ({steps}) exceed its "
                f"context of {model.context_length} tokens"
            )

    def groups(self, images: list[np.ndarray]):
        from PIL import Image

        pixels = torch.stack([self.preprocess(Image.fromarray(image)) for image in images]).to(self.device)
        yield list(range(len(images))), pixels

    def _logits(self, state: dict) -> torch.Tensor:
        with autocast(self.device, self.precision):
            out = self.model(
                None, state["text"], image_latent=state["latent"], image_embs=state["embs"], output_labels=False
            )
        return out["logits"][:, -1]

    def prefill(self, pixels: torch.Tensor, k: int):
        with autocast(self.device, self.precision):
            image = self.model(pixels)  # the image's latent and tokens, once per image
        text = torch.tensor(self.prompt, device=self.device).expand(len(pixels) * k, -1)
        state = {
            "latent": image["image_features"].repeat_interleave(k, dim=0),
            "embs": image["image_embs"].repeat_interleave(k, dim=0),
            "text": text,
        }
        return text, self._logits(state), state

    def step(self, tokens: torch.Tensor, state: dict, position: int) -> torch.Tensor:
        state["text"] = torch.cat([state["text"], tokens[:, None]], dim=1)
        return self._logits(state)

    def keep(self, state: dict, index: torch.Tensor) -> dict:
        return {k: v.index_select(0, index) for k, v in state.items()}

    def decode_tokens(self, ids: list[int]) -> str:
        special = {self.tokenizer.sot_token_id, self.tokenizer.eot_token_id}
        return self.tokenizer.decode([t for t in ids if t not in special])

    def stock_greedy(self, pixels: torch.Tensor, steps: int) -> tuple[torch.Tensor, None]:
        """open_clip's greedy (top-1) `generate`, ``steps`` free tokens; its ids after the prompt.

        open_clip 3.3's `CoCa.generate` cannot run beside transformers 5 (it asserts on an import of
        `BeamSearchScorer`, which transformers 5 removed), so while it refuses, the reference is its
        top-k loop transcribed (coca_model.py, `generate`, the non-beam branch): the full text
        through the public forward at every step, argmax, rows ended by end-of-text or pad."""
        text = torch.tensor(self.prompt, device=self.device).expand(len(pixels), -1)
        try:
            out = self.model.generate(
                pixels,
                text=text,
                seq_len=text.shape[1] + steps + 1,
                generation_type="top_k",
                top_k=1,
                min_seq_len=0,
                fixed_output_length=True,
            )
        except AssertionError:  # "Please install transformers for generate functionality"
            out = self._transcribed_generate(pixels, text, steps)
        return out[:, text.shape[1] : text.shape[1] + steps], None

    def _transcribed_generate(self, pixels: torch.Tensor, text: torch.Tensor, steps: int) -> torch.Tensor:
        image = self.model(pixels)
        latent, embs = image["image_features"], image["image_embs"]
        out = text
        stops = torch.tensor(self.eos_ids, device=self.device)
        for _ in range(steps):
            logits = self.model(None, out, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
            ended = torch.isin(out[:, -1], stops) & (out.shape[1] > text.shape[1])
            nxt = torch.where(ended, torch.full_like(ended, self.pad, dtype=torch.long), logits.argmax(dim=-1))
            out = torch.cat([out, nxt[:, None]], dim=1)
        return out
