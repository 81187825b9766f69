# Adapted from transformers 5.24 models/blip/modeling_blip.py and models/blip/modeling_blip_text.py
"""capfilt's own BLIP compute: the ViT, the BERT text encoder/decoder with cross-attention, the heads.

Why capfilt owns this instead of calling `BlipForConditionalGeneration` / `BlipForImageTextRetrieval`:
CapFilt scores many texts per image and samples K captions per image, so it wants one vision pass
per image, cross-attention keys/values computed once per image and shared by all of its texts,
a KV-cached decoder whose finished rows can be dropped, and SDPA attention. The stock classes do
none of that, and reaching into them (replacing forwards, smuggling data through their cache)
broke silently the day transformers 5.24 renamed one argument. So, as serving engines (vLLM) do:

- the modules below are a compact reimplementation whose attribute names are the stock classes'
  (`vision_model.encoder.layers.3.self_attn.qkv.weight`, `text_encoder.encoder.layer.0.
  crossattention.self.key.bias`, ...), so `load_stock` takes the stock model's `state_dict()` with
  `strict=True`: a renamed, missing or extra weight is an error, never a silent default;
- the contract with transformers is only that checkpoint format and the config fields; its
  classes stay the reference: tests compare against them, and every model stage runs
  `capfilt.modeling.selfcheck` against them when it loads.

The cross-attention keys/values shared per image and the decoder's KV cache are attention.py's.

Inference only: there is no dropout (eval semantics) and no training path (the MED in med.py
trains with the stock modules).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from capfilt.modeling.attention import DecoderCache, ImageKeysValues


def _head_size(cfg) -> int:
    """Each head's width; a config whose heads do not divide its width is refused here, when the
    module is built, not left to a reshape that fails (or mixes heads) in the first forward."""
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
            f"hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads {cfg.num_attention_heads}"
        )
    return cfg.hidden_size // cfg.num_attention_heads


def _split_heads(x: torch.Tensor, head_size: int) -> torch.Tensor:
    """(rows, length, width) -> (rows, heads, length, head_size)."""
    return x.view(*x.shape[:-1], -1, head_size).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(rows, heads, length, head_size) -> (rows, length, width)."""
    return x.transpose(1, 2).flatten(2)


# ---------------------------------------------------------------------------------------- vision


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.image_size, self.patch_size = cfg.image_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.empty(1, positions, cfg.hidden_size))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values are {tuple(pixels.shape[-2:])}, the ViT takes {self.image_size}x"
                f"{self.image_size} (position embeddings are not interpolated)"
            )
        dtype = self.patch_embedding.weight.dtype
        # (B, 3, H, W) -> (B, width, H/p, W/p) -> (B, patches, width)
        patches = self.patch_embedding(pixels.to(dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(len(patches), 1, -1).to(dtype)  # (B, 1, width)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.to(dtype)  # (B, 1 + patches, width)


class VisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        _head_size(cfg)  # refuses heads that do not divide the width
        self.heads = cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.projection = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, length, width = x.shape
        # (rows, L, 3 * width) -> (rows, L, 3, heads, head_size) -> 3 x (rows, heads, L, head_size)
        q, k, v = self.qkv(x).view(rows, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        return self.projection(_merge_heads(F.scaled_dot_product_attention(q, k, v)))  # (rows, L, width)


class VisionMlp(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = ACT2FN[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg):
        super().__init__()
        self.self_attn = VisionAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMlp(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionLayers(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionModel(nn.Module):
    """BLIP's ViT: pixel_values (B, 3, S, S) -> image embeddings (B, 1 + patches, width)."""

    def __init__(self, cfg):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionLayers(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


# ------------------------------------------------------------------------------------------ text


class TextEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type {cfg.position_embedding_type!r}: capfilt's BLIP supports "
                "absolute position embeddings (every published BLIP checkpoint)"
            )
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions))


class QueryKeyValue(nn.Module):
    def __init__(self, cfg, key_width: int):
        super().__init__()
        self.head_size = _head_size(cfg)
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(key_width, cfg.hidden_size)
        self.value = nn.Linear(key_width, cfg.hidden_size)

    def keys_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _split_heads(self.key(states), self.head_size), _split_heads(self.value(states), self.head_size)


class DenseNorm(nn.Module):
    """BERT's post-norm residual: LayerNorm(dense(x) + residual)."""

    def __init__(self, cfg, width: int):
        super().__init__()
        self.dense = nn.Linear(width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class AttentionBlock(nn.Module):
    def __init__(self, cfg, key_width: int):
        super().__init__()
        self.self = QueryKeyValue(cfg, key_width)
        self.output = DenseNorm(cfg, cfg.hidden_size)


class Intermediate(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class TextLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = AttentionBlock(cfg, cfg.hidden_size)
        if cfg.is_decoder:  # the stock rule: cross-attention weights exist only then
            self.crossattention = AttentionBlock(cfg, cfg.encoder_hidden_size)
        self.intermediate = Intermediate(cfg)
        self.output = DenseNorm(cfg, cfg.intermediate_size)

    def forward(
        self, x, index: int, mask=None, images: ImageKeysValues | None = None, cache: DecoderCache | None = None
    ) -> torch.Tensor:
        qkv = self.attention.self
        query = _split_heads(qkv.query(x), qkv.head_size)
        key, value = qkv.keys_values(x)
        if cache is None:
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        else:  # causal decoding: the first call takes the prompt, later calls one token each
            if cache.length and x.shape[1] > 1:
                raise ValueError("a cached decoder step after the prompt takes one token per row")
            key, value = cache.append(index, key, value)
            context = F.scaled_dot_product_attention(query, key, value, is_causal=x.shape[1] > 1)
        x = self.attention.output(_merge_heads(context), x)
        if images is not None:
            cross = self.crossattention
            query = _split_heads(cross.self.query(x), cross.self.head_size)
            x = cross.output(_merge_heads(images.attend(index, query)), x)
        return self.output(self.intermediate(x), x)


class TextLayers(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer = nn.ModuleList(TextLayer(cfg) for _ in range(cfg.num_hidden_layers))


class TextModel(nn.Module):
    """BLIP's BERT: unimodal (no images), image-grounded (``images``) and causal (``cache``)."""

    def __init__(self, cfg):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = TextLayers(cfg)

    def image_keys_values(self, image_embeds: torch.Tensor, rows: list[int]) -> ImageKeysValues:
        """Cross-attention keys/values of the B images, once per image; text row t reads image rows[t]."""
        per_layer = [layer.crossattention.self.keys_values(image_embeds) for layer in self.encoder.layer]
        return ImageKeysValues(per_layer, rows)

    def forward(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: ImageKeysValues | None = None,
        cache: DecoderCache | None = None,
    ) -> torch.Tensor:
        x = self.embeddings(ids, cache.length if cache is not None else 0)
        mask = None
        if attention_mask is not None:  # padding: (rows, L) 1/0 -> boolean (rows, 1, 1, L), True = attend
            mask = attention_mask.bool()[:, None, None, :]
        for index, layer in enumerate(self.encoder.layer):
            x = layer(x, index, mask, images, cache)
        if cache is not None:
            cache.length += ids.shape[1]
        return x


class PredictionTransform(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = ACT2FN[cfg.hidden_act]
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class Predictions(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.bias = nn.Parameter(torch.empty(cfg.vocab_size))  # the stock checkpoint ties it to decoder.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform(x)
        if x.device.type != "cpu" or x.dim() != 2 or len(x) < _VOCAB_CHUNK_ROWS:
            return self.decoder(x)
        # (rows, width) -> (rows, vocab), a slice of the vocabulary at a time: one (30522 x 768)
        # fp32 product with a few dozen rows streams its weights past the CPU's caches, and slices
        # that stay in cache ran 15-25% faster at 40-128 rows (same bits: each logit is the same
        # dot product over the width). Only on a CPU and only for the decoder's one position.
        weight, bias = self.decoder.weight, self.decoder.bias
        step = _VOCAB_CHUNK
        return torch.cat(
            [F.linear(x, weight[s : s + step], bias[s : s + step]) for s in range(0, len(weight), step)], 1
        )


_VOCAB_CHUNK, _VOCAB_CHUNK_ROWS = 2048, 16  # measured on a 2-core AVX-512 EPYC (docs/benchmarks.md)


class LMHead(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.predictions = Predictions(cfg)


class TextDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.bert = TextModel(cfg)
        self.cls = LMHead(cfg)

    def next_token_logits(self, ids: torch.Tensor, images: ImageKeysValues, cache: DecoderCache) -> torch.Tensor:
        """Logits (rows, vocab) of the token after ``ids``; the cache grows by ids' length."""
        hidden = self.bert(ids, images=images, cache=cache)
        return self.cls.predictions(hidden[:, -1])  # (rows, L, width) -> last position (rows, width) -> (rows, vocab)


# ---------------------------------------------------------------------------------------- models


class _Stock(nn.Module):
    """Loading from the stock model: its state dict, strictly, sharing its tensors."""

    @classmethod
    def load_stock(cls, stock: nn.Module):
        """Built on the meta device and given the stock model's tensors (no copy; tied weights stay
        tied). Every key must match: a checkpoint format change fails here, loudly."""
        with torch.device("meta"):
            model = cls(stock.config)
        model.load_state_dict(stock.state_dict(), strict=True, assign=True)
        return model.eval().requires_grad_(False)


class BlipCaptioning(_Stock):
    """Same weights as `BlipForConditionalGeneration`: ViT + causal text decoder with LM head."""

    def __init__(self, config):
        super().__init__()
        self.vision_model = VisionModel(config.vision_config)
        self.text_decoder = TextDecoder(config.text_config)


class BlipRetrieval(_Stock):
    """Same weights as `BlipForImageTextRetrieval`: ViT + text encoder, ITC projections, ITM head."""

    def __init__(self, config):
        super().__init__()
        self.vision_model = VisionModel(config.vision_config)
        self.text_encoder = TextModel(config.text_config)
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, config.image_text_hidden_size)
        self.text_proj = nn.Linear(config.text_config.hidden_size, config.image_text_hidden_size)
        self.itm_head = nn.Linear(config.text_config.hidden_size, 2)

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """ITC image features (B, dim), unit length, in fp32."""
        return F.normalize(self.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)  # [CLS] (B, width) -> (B, dim)

    def text_feat(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITC text features from the unimodal encoder (no image), unit length, in fp32."""
        hidden = self.text_encoder(ids, attention_mask)
        return F.normalize(self.text_proj(hidden[:, 0, :]).float(), dim=-1)  # [CLS] (texts, width) -> (texts, dim)

    def itm_logits(self, ids: torch.Tensor, attention_mask: torch.Tensor, images: ImageKeysValues) -> torch.Tensor:
        """ITM (no match, match) logits of text row t with image ``images.rows[t]``, in fp32."""
        hidden = self.text_encoder(ids, attention_mask, images=images)
        return self.itm_head(hidden[:, 0, :]).float()  # grounded [CLS] (texts, width) -> (texts, 2)

    def itm(self, ids: torch.Tensor, attention_mask: torch.Tensor, images: ImageKeysValues) -> torch.Tensor:
        """Match probability of text row t with image ``images.rows[t]``."""
        return self.itm_logits(ids, attention_mask, images).softmax(dim=-1)[:, 1]
