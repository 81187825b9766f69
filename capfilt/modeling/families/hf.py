"""The transformers captioner families: ``git`` (`GitForCausalLM`) and ``image-text-to-text`` (any
checkpoint `AutoModelForImageTextToText` loads: BLIP-2, SmolVLM / Idefics3, LLaVA, ...).

Decoding goes through the stock model's public forward and the cache it returns (loop.py), never
a copy of its layers, so any architecture transformers supports decodes as its own `generate`
would -- which the load-time check verifies (check.py). The forward that decodes is the one stock
`generate` uses: the model's own, or -- for a model whose forward needs the image at every call,
as BLIP-2's does -- its ``language_model``, which BLIP-2's `generate` hands the decoding to.

Each image is processed on its own (an image processor's output for an image never depends on the
others), and images whose inputs have the same shapes form one prefill: no row is ever padded.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from capfilt.modeling.loading import autocast, from_pretrained
from capfilt.modeling.presets import ModelRefError


def refuse_unsupported(model, what: str) -> None:
    """Architectures the decode loop cannot run as their own `generate` does, refused in one line
    (rather than left to the load-time check's less telling mismatch)."""
    name = type(model).__name__
    if model.config.is_encoder_decoder or model.config.get_text_config().is_encoder_decoder:
        raise ModelRefError(
            f"{what}: a {name} decodes with an encoder-decoder language model; capfilt's caption loop runs "
            "decoder-only ones (BLIP-2 OPT, SmolVLM, LLaVA, ...), not yet Florence-2 or BLIP-2 Flan-T5"
        )


class HFFamily:
    def __init__(
        self,
        family: str,
        location: str,
        revision: str | None,
        *,
        prompt: str,
        instruction,
        what: str,
        device,
        precision,
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor, GitForCausalLM

        self.family, self.device, self.precision = family, device, precision
        model_cls = GitForCausalLM if family == "git" else AutoModelForImageTextToText
        self.model = from_pretrained(model_cls, location, revision).to(device)
        refuse_unsupported(self.model, what)
        self.processor = AutoProcessor.from_pretrained(location, revision=revision)
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None:
            raise ModelRefError(f"{what}: its processor has no tokenizer, so its captions cannot be spelled")
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
        if not self.eos_ids:
            raise ModelRefError(
                f"{what}: neither its generation config nor its tokenizer names an end-of-sequence token"
            )
        pad = gen.pad_token_id if gen.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad = int(pad) if pad is not None else self.eos_ids[0]
        vocab = self.model.config.get_text_config().vocab_size
        if len(self.tokenizer) > vocab:
            raise ModelRefError(
                f"{what}: its tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary has only "
                f"{vocab} ids; use the tokenizer the model was trained with"
            )
        params = inspect.signature(self.model.forward).parameters
        pixels = params.get("pixel_values")
        needs_image = pixels is not None and pixels.default is inspect.Parameter.empty
        self.stepper = self.model.language_model if needs_image else self.model
        self.positions = "position_ids" in inspect.signature(self.stepper.forward).parameters
        # Qwen2-VL-style multimodal rotary positions: computed by the model's public get_rope_index
        # and passed explicitly at every step (never left to the state the model keeps between calls)
        self.rope_index = getattr(getattr(self.model, "model", None), "get_rope_index", None)
        self.text = self._prompt_text(prompt, instruction, what)

    def _prompt_text(self, prompt: str, instruction, what: str):
        if self.family == "git":
            if instruction:
                raise ModelRefError(f"{what}: a GIT model has no chat template; drop captioner.instruction")
            # GIT starts from [CLS] and continues the prompt's tokens (no trailing [SEP])
            ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
            return torch.tensor([[self.model.config.bos_token_id, *ids]])
        if instruction is None:
            return prompt  # the processor adds the image tokens (BLIP-2's queries) and BOS
        if not getattr(self.processor, "chat_template", None):
            raise ModelRefError(
                f"{what}: captioner.instruction needs a chat template and its processor has none; "
                "write the whole prompt as captioner.prompt instead"
            )
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True) + prompt

    # --------------------------------------------------------------------------- the family calls

    def _inputs(self, image: np.ndarray) -> dict:
        if self.family == "git":
            pixels = self.processor.image_processor(images=[image], return_tensors="pt").pixel_values
            return {"input_ids": self.text, "pixel_values": pixels}
        out = self.processor(images=[image], text=[self.text], return_tensors="pt")
        return {k: v for k, v in out.items() if k not in ("attention_mask", "token_type_ids")}

    def groups(self, images: list[np.ndarray]):
        """(image indices, batched inputs) per group of images whose inputs have equal shapes."""
        groups: dict = {}
        for i, image in enumerate(images):
            inputs = self._inputs(image)
            shape = tuple((k, tuple(v.shape)) for k, v in sorted(inputs.items()))
            groups.setdefault(shape, []).append((i, inputs))
        for members in groups.values():
            keys = members[0][1].keys()
            batch = {k: torch.cat([m[1][k] for m in members]).to(self.device) for k in keys}
            yield [m[0] for m in members], batch

    def _positions(self, rows: int, start: int, length: int, deltas=None) -> dict:
        """Positions as stock `generate` passes them: ``start ..`` (no row is padded); for M-RoPE, the
        text positions over the three rotary ones, which run ``delta`` (per row) ahead after the image."""
        if not self.positions:
            return {}
        text = torch.arange(start, start + length, device=self.device).expand(rows, -1)
        if deltas is None:
            return {"position_ids": text}
        return {"position_ids": torch.cat([text[None], (text + deltas[:, None])[None].expand(3, -1, -1)])}

    def prefill(self, inputs: dict, k: int):
        """One forward over each image's prompt; its cache (and M-RoPE offsets) repeated for the K samples."""
        ids = inputs["input_ids"]
        deltas = None
        if self.rope_index is not None:  # M-RoPE (Qwen2-VL): the model's own 3-D positions for the prompt
            params = inspect.signature(self.rope_index).parameters
            vision, deltas = self.rope_index(
                ids, **{n: v for n, v in inputs.items() if n in params and n != "input_ids"}
            )
            deltas = deltas.flatten().to(self.device)
            text = torch.arange(ids.shape[1], device=self.device).expand(1, ids.shape[0], -1)
            positions = {"position_ids": torch.cat([text, vision.to(self.device)])}
        else:
            positions = self._positions(ids.shape[0], 0, ids.shape[1])
        with autocast(self.device, self.precision):
            out = self.model(**inputs, **positions, use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.language_model_outputs.cache
        cache.batch_repeat_interleave(k)  # the K samples of an image share its prompt's cache
        if deltas is not None:
            deltas = deltas.repeat_interleave(k)
        state = {"cache": cache, "deltas": deltas}
        return ids.repeat_interleave(k, dim=0), out.logits[:, -1].repeat_interleave(k, dim=0), state

    def step(self, tokens: torch.Tensor, state: dict, position: int) -> torch.Tensor:
        positions = self._positions(len(tokens), position, 1, state["deltas"])
        with autocast(self.device, self.precision):
            out = self.stepper(input_ids=tokens[:, None], cache=state["cache"], use_cache=True, **positions)
        return out.logits[:, -1]

    def keep(self, state: dict, index: torch.Tensor) -> dict:
        state["cache"].batch_select_indices(index)
        deltas = state["deltas"]
        return {"cache": state["cache"], "deltas": None if deltas is None else deltas.index_select(0, index)}

    def decode_tokens(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --------------------------------------------------------------------------- the stock reference

    def stock_greedy(self, inputs: dict, steps: int) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Stock `generate`'s greedy ids (rows, steps; padded after EOS) and raw logits per step."""
        from transformers import GenerationConfig

        gen = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=steps,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad,
            bos_token_id=self.model.generation_config.bos_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        out = self.model.generate(**inputs, generation_config=gen)
        n = len(out.logits)
        return out.sequences[:, -n:], list(out.logits)
