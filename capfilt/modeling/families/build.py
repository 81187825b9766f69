"""Tiny captioner presets of the non-BLIP families, built offline from ``models/tiny-*.json``.

Each is the family's real architecture with a small config, seeded random weights and a shipped
vocabulary, written by the stock ``save_pretrained`` so that it loads through the very same
``from_pretrained(directory)`` / ``AutoProcessor`` calls a hub checkpoint takes:

- kind ``git``: `GitForCausalLM` + `GitProcessor` (CLIP image processor, BERT WordPiece tokenizer,
  as microsoft/git-base);
- kind ``image-text-to-text``: the architecture named in the preset (``Blip2ForConditionalGeneration``
  with `Blip2Processor`, ``Idefics3ForConditionalGeneration`` -- SmolVLM's architecture -- with
  `Idefics3Processor` and SmolVLM's chat template; ``Qwen2VLForConditionalGeneration`` with
  `Qwen2VLProcessor`, Qwen's chat template and its multimodal rotary positions). Their language
  models are causal LMs, so their
  tokenizer is the shipped WordPiece vocabulary behind a decoder-style template (BOS, no trailing
  separator), as a GPT-2 / Llama tokenizer behaves;
- CoCa presets are open_clip presets (kind ``open_clip`` with a ``multimodal_cfg``), built by
  capfilt.modeling.presets with open_clip's own `CoCa` class.
"""

from __future__ import annotations

import json
from pathlib import Path

from capfilt.modeling import presets

ARCHITECTURES = ("Blip2ForConditionalGeneration", "Idefics3ForConditionalGeneration", "Qwen2VLForConditionalGeneration")


def causal_tokenizer(preset: dict):
    """The shipped WordPiece vocabulary as a causal LM's tokenizer: ``[CLS]`` is BOS, ``[SEP]`` EOS,
    and encoding adds BOS only (a prompt must not end in end-of-sequence)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    vocab_path = presets.models_dir() / preset["tokenizer"] / "vocab.txt"
    vocab = {tok: i for i, tok in enumerate(vocab_path.read_text().splitlines())}
    core = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A", pair="[CLS] $A $B", special_tokens=[("[CLS]", vocab["[CLS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]"
    )


def _image_kwargs(preset: dict) -> dict:
    return presets.openai_image_stats()


def _git(preset: dict):
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tok = presets.blip_tokenizer(preset)
    size = preset["image_size"]
    images = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **_image_kwargs(preset)
    )
    processor = GitProcessor(image_processor=images, tokenizer=tok)
    cfg = {**preset["config"], "vocab_size": len(tok)}
    cfg.update(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    return GitForCausalLM, GitConfig(**cfg), processor


def _blip2(preset: dict):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    size = preset["image_size"]
    cfg = json.loads(json.dumps(preset["config"]))
    images = BlipImageProcessor(size={"height": size, "width": size}, **_image_kwargs(preset))
    processor = Blip2Processor(
        image_processor=images, tokenizer=causal_tokenizer(preset), num_query_tokens=cfg["num_query_tokens"]
    )
    tok = processor.tokenizer  # the processor added its <image> token
    cfg["image_token_id"] = tok.convert_tokens_to_ids("<image>")
    cfg["text_config"].update(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    return Blip2ForConditionalGeneration, Blip2Config(**cfg), processor


def _idefics3(preset: dict):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    cfg = json.loads(json.dumps(preset["config"]))
    vision = cfg["vision_config"]
    images = Idefics3ImageProcessor(
        size={"longest_edge": preset["image_size"]},
        max_image_size={"longest_edge": vision["image_size"]},
        **_image_kwargs(preset),
    )
    seq_len = (vision["image_size"] // vision["patch_size"]) ** 2 // cfg.get("scale_factor", 2) ** 2
    processor = Idefics3Processor(
        image_processor=images,
        tokenizer=causal_tokenizer(preset),
        image_seq_len=seq_len,
        chat_template=preset["chat_template"],
    )
    tok = processor.tokenizer  # the processor added its image and end-of-utterance tokens
    eos = [tok.convert_tokens_to_ids("<end_of_utterance>"), tok.eos_token_id]
    cfg["image_token_id"] = tok.convert_tokens_to_ids("<image>")
    cfg["text_config"].update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=eos)
    cfg["pad_token_id"] = tok.pad_token_id
    cfg["text_config"]["pad_token_id"] = tok.pad_token_id
    return Idefics3ForConditionalGeneration, Idefics3Config(**cfg), processor


QWEN_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen2vl(preset: dict):
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    cfg = json.loads(json.dumps(preset["config"]))
    tok = causal_tokenizer(preset)
    tok.add_special_tokens({"additional_special_tokens": QWEN_TOKENS})
    vision = cfg["vision_config"]
    side = vision["patch_size"] * vision["spatial_merge_size"]
    images = Qwen2VLImageProcessor(
        min_pixels=side * side,
        max_pixels=preset["image_size"] ** 2,
        patch_size=vision["patch_size"],
        merge_size=vision["spatial_merge_size"],
        temporal_patch_size=vision["temporal_patch_size"],
        **_image_kwargs(preset),
    )
    processor = Qwen2VLProcessor(
        image_processor=images,
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=preset["chat_template"],
    )
    ids = tok.convert_tokens_to_ids
    cfg.update(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    eos = [ids("<|im_end|>"), tok.eos_token_id]
    cfg["text_config"].update(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=tok.pad_token_id
    )
    return Qwen2VLForConditionalGeneration, Qwen2VLConfig(**cfg), processor


def builder(preset: dict):
    """The ``build(directory)`` of a git / image-text-to-text preset (for presets.materialise)."""
    kind = preset["kind"]
    if kind == "git":
        make = _git
    elif preset.get("architecture") == "Blip2ForConditionalGeneration":
        make = _blip2
    elif preset.get("architecture") == "Idefics3ForConditionalGeneration":
        make = _idefics3
    elif preset.get("architecture") == "Qwen2VLForConditionalGeneration":
        make = _qwen2vl
    else:
        raise presets.ModelRefError(
            f"preset of kind {kind}: architecture {preset.get('architecture')!r} has no builder here "
            f"(presets can build {', '.join(ARCHITECTURES)})"
        )

    def build(directory: Path) -> None:
        import torch
        from transformers import GenerationConfig

        model_cls, config, processor = make(preset)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(preset.get("init_seed", 0))
            model = model_cls(config)
        text = config.get_text_config()
        model.generation_config = GenerationConfig(
            bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
        )
        model.save_pretrained(directory)
        processor.save_pretrained(directory)

    return build
