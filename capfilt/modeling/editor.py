"""The caption editor: a seq2seq model (T5 family) rewrites a caption, as LAION-COCO polished its
chosen captions with a grammar-fixing T0/T5.

A stock `transformers` model (``AutoModelForSeq2SeqLM`` + ``AutoTokenizer``), named like the other
models (`resolve_editor`): a capfilt preset (``models/tiny-t5.json``: T5's architecture with a small
config, seeded random weights and the shipped Unigram vocabulary ``models/tokenizers/tiny-t5``,
built offline into a directory that the very same ``from_pretrained`` loads), a local directory
written by ``save_pretrained``, or a hub id (``google/flan-t5-small``).

Decoding is the stock ``generate``: greedy (``num_beams`` 1) or beam search, never sampling, so an
edit is a function of the caption, the prompt and the model. There is no load-time self-check
(selfcheck.py) here: capfilt owns none of this compute (no fast path of its own to compare with
the stock model), it only calls the stock model's ``generate``.

Captions are encoded one by one, put in order of length and padded per chunk of ``batch_size``;
padding is masked, so a caption's edit does not depend on its batch-mates, beyond the last float
bits of kernels that block differently for other batch shapes (which could flip a greedy choice
only at an exact tie of two tokens' logits, as for the captioner).

Only the `resolve_editor` part runs before any model loads (the run's reference checks); torch and
transformers are imported when an `Editor` is made, so a refused reference stays quick.
"""

from __future__ import annotations

import copy
from pathlib import Path

from capfilt.modeling import presets
from capfilt.modeling.presets import ModelRef, ModelRefError, check_vocabulary, hub_ref, models_dir

__all__ = ["Editor", "resolve_editor"]

PRESET_KIND = "t5"
SAMPLING_ONLY = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def t5_vocabulary(preset: dict) -> list[tuple[str, float]]:
    """The preset's Unigram vocabulary: ``vocab.txt`` lines ``piece<TAB>log-probability``, ids in
    line order (T5's layout: <pad> 0, </s> 1, <unk> 2)."""
    lines = (models_dir() / preset["tokenizer"] / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return [(piece, float(score)) for piece, score in (line.split("\t") for line in lines if line)]


def t5_tokenizer(preset: dict):
    """transformers' own T5 tokenizer over the shipped vocabulary (a tokenizers Unigram model: no
    sentencepiece file needed), without T5's 100 sentinel tokens (an editor never writes them)."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_vocabulary(preset), extra_ids=0)


def t5_config(preset: dict, what: str = "preset"):
    from transformers import T5Config

    tok = t5_tokenizer(preset)
    cfg = dict(preset["config"])
    cfg.setdefault("vocab_size", len(tok))
    check_vocabulary(len(tok), cfg["vocab_size"], f"{what} (tokenizer {preset['tokenizer']})")
    return T5Config(
        **cfg, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id
    )


def _build_t5(preset: dict):
    def build(directory: Path) -> None:
        import torch
        from transformers import T5ForConditionalGeneration
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # as loading.from_pretrained does: no "Writing model shards" bar
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(preset.get("init_seed", 0))
            model = T5ForConditionalGeneration(t5_config(preset))
        model.save_pretrained(directory)
        t5_tokenizer(preset).save_pretrained(directory)

    return build


def resolve_editor(name: str, revision: str | None = None) -> ModelRef:
    """``edit.model``: a preset of kind t5, a local seq2seq directory, or a hub id (checked as the
    captioner's and the filter's are: before any model loads, one line naming what is wrong)."""
    what = f"edit.model {name}"
    presets.not_empty(name, what)
    preset = presets.preset_named(name, what)
    if preset is not None:
        if preset.get("kind") != PRESET_KIND:
            raise ModelRefError(f"{what}: the preset is a {preset.get('kind')} model, not a seq2seq (T5) one")
        t5_config(preset, f"{what}: preset")  # a tokenizer that does not fit refuses before anything is built
        directory = presets.materialise(name, preset, "edit", _build_t5(preset))
        return ModelRef(str(directory), {"preset": name, "sha256": presets.weights_sha256(directory)})
    local = presets.existing_path(name)
    if local is not None:
        if not local.is_dir():
            raise ModelRefError(
                f"{what}: {local} is a file; a seq2seq model is a directory written by "
                "save_pretrained (config.json, weights and its tokenizer)"
            )
        if not (local / "config.json").is_file():
            raise ModelRefError(
                f"{what}: {local} has no config.json; give a directory written by AutoModelForSeq2SeqLM.save_pretrained"
            )
        return ModelRef(str(local), {"path": str(local), "sha256": presets.local_weights(local, what)})
    return hub_ref(name, revision, what, "config.json")


class Editor:
    """``edit(texts) -> edited texts``, in order; an edit that comes out empty is ""."""

    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        device: str = "auto",
        precision: str = "fp32",
        prompt: str = "",
        max_new_tokens: int = 40,
        num_beams: int = 1,
        batch_size: int | None = None,
    ):
        from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

        from capfilt.modeling.loading import from_pretrained, pick_device

        self.ref = resolve_editor(model, revision)
        config = AutoConfig.from_pretrained(self.ref.location, revision=self.ref.revision)  # the commit recorded
        if not config.is_encoder_decoder:
            raise ModelRefError(
                f"edit.model {model}: a {config.model_type} model is not a seq2seq (encoder-decoder) "
                "one; give a T5-family model such as google/flan-t5-small"
            )
        self.device, self.precision = pick_device(device), precision
        self.tokenizer = AutoTokenizer.from_pretrained(self.ref.location, revision=self.ref.revision)
        self.model = from_pretrained(AutoModelForSeq2SeqLM, self.ref.location, self.ref.revision).to(self.device)
        check_vocabulary(len(self.tokenizer), self.model.config.vocab_size, f"edit.model {model}")
        self.prompt, self.batch_size = prompt, batch_size
        # The checkpoint's own generation settings (its generation_config.json), made deterministic:
        # no sampling, so its sampling-only settings are dropped (they would change nothing here);
        # max_new_tokens is the one length limit.
        self.generation = copy.deepcopy(self.model.generation_config)
        self.generation.update(
            do_sample=False,
            num_beams=num_beams,
            num_return_sequences=1,
            max_new_tokens=max_new_tokens,
            max_length=None,
            **dict.fromkeys(SAMPLING_ONLY),
        )

    @property
    def identity(self) -> dict:
        return self.ref.identity

    def edit(self, texts: list[str]) -> list[str]:
        import torch

        from capfilt.modeling.loading import autocast

        if not texts:
            return []
        ids = self.tokenizer([self.prompt + t for t in texts]).input_ids
        order = sorted(range(len(texts)), key=lambda j: (len(ids[j]), j))  # similar lengths share a chunk
        size = self.batch_size or len(order)
        out = [""] * len(texts)
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            enc = self.tokenizer.pad({"input_ids": [ids[j] for j in chunk]}, return_tensors="pt").to(self.device)
            with torch.inference_mode(), autocast(self.device, self.precision):
                tokens = self.model.generate(**enc, generation_config=self.generation)
            for j, text in zip(chunk, self.tokenizer.batch_decode(tokens, skip_special_tokens=True)):
                out[j] = " ".join(text.split())
        return out
