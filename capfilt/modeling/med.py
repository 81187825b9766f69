# Adapted from BLIP (github.com/salesforce/BLIP) models/blip_pretrain.py, on transformers 5.24's BLIP modules
"""The MED (BLIP's multimodal mixture of encoder-decoder), assembled from stock `transformers` modules.

    vision_model   BlipVisionModel                      (ViT)
    text_encoder   BlipTextModel with cross-attention   unimodal for ITC (no image), image-grounded for ITM
    text_decoder   BlipTextLMHeadModel                  image-grounded causal decoder for LM
    vision_proj / text_proj / temp                      ITC projections and learnable temperature
    itm_head                                            2-way match classifier on the grounded [CLS]

The decoder shares every weight with the encoder except self-attention (and its LM head): its
embeddings, cross-attention and feed-forward blocks *are* the encoder's modules (BLIP's
`tie_encoder_decoder_weights`). Attribute names equal the stock classes', so the decoder's
state_dict is a `BlipForConditionalGeneration.text_decoder` and the rest a
`BlipForImageTextRetrieval`: export is a key filter, not a rename table (see med_export).

ITM input starts with [CLS], not BLIP's [ENC]: capfilt's `ItmFilter` and stock transformers
feed tokenizer output unchanged, and the exported filter must score what it was trained on.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from transformers import BlipConfig, BlipTextLMHeadModel, BlipTextModel, BlipVisionModel

from capfilt.config import Strict

LOSSES = ("itc", "itm", "lm")


class KeyMismatch(ValueError):
    """A checkpoint's keys do not match the model's: never loaded partially, never silently."""


# What each loss trains; the rest is frozen, so DDP sees no unused parameters.
_ENCODER_ONLY = ("text_encoder.encoder.layer.{i}.attention.", "vision_proj.", "text_proj.", "itm_head.", "temp")
_DECODER_ONLY = ("text_decoder.bert.encoder.layer.{i}.attention.", "text_decoder.cls.")


class MedOptions(Strict):
    """The MED's training options; the `med:` section of a training config is this plus its schedule."""

    momentum: bool = Field(
        True, description="BLIP's momentum encoders + feature queues for ITC (off: in-batch ITC only)"
    )
    queue_size: int = Field(57600, ge=0, description="negatives kept from past batches (needs momentum)")
    momentum_coef: float = Field(0.995, ge=0, le=1)
    alpha: float = Field(0.4, ge=0, le=1, description="weight of the momentum model's soft ITC targets")
    temp: float = Field(0.07, gt=0, description="initial ITC temperature (learned, clamped to [0.001, 0.5])")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="LM loss, as BLIP")

    @model_validator(mode="after")
    def _queue_needs_momentum(self):
        if self.queue_size and not self.momentum:
            raise ValueError("queue_size > 0 needs momentum: true (or set queue_size: 0)")
        return self

    def to_dict(self) -> dict:
        return self.model_dump()


class Med(nn.Module):
    def __init__(self, config: BlipConfig, options: MedOptions = MedOptions()):
        super().__init__()
        if options.queue_size and not options.momentum:
            raise ValueError("queue_size > 0 needs momentum: queued features come from the momentum encoders")
        self.config = copy.deepcopy(config)
        self.config.text_config.is_decoder = True  # BlipTextLayer builds cross-attention only then
        self.options = options
        text_cfg, vision_cfg = self.config.text_config, self.config.vision_config
        embed = self.config.image_text_hidden_size
        self.vision_model = BlipVisionModel(vision_cfg)
        self.text_encoder = BlipTextModel(text_cfg, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(text_cfg)
        self.vision_proj = nn.Linear(vision_cfg.hidden_size, embed)
        self.text_proj = nn.Linear(text_cfg.hidden_size, embed)
        self.itm_head = nn.Linear(text_cfg.hidden_size, 2)
        for head in (self.vision_proj, self.text_proj, self.itm_head):
            nn.init.normal_(head.weight, std=text_cfg.initializer_range)
            nn.init.zeros_(head.bias)
        self.temp = nn.Parameter(torch.tensor(options.temp))
        self._tie_decoder()
        if options.momentum:
            self.vision_model_m = copy.deepcopy(self.vision_model)
            self.vision_proj_m = copy.deepcopy(self.vision_proj)
            self.text_encoder_m = copy.deepcopy(self.text_encoder)
            self.text_proj_m = copy.deepcopy(self.text_proj)
            for p in self._momentum_params():
                p[1].requires_grad_(False)
            q = options.queue_size
            self.register_buffer(
                "image_queue", F.normalize(torch.randn(embed, q), dim=0) if q else torch.zeros(embed, 0)
            )
            self.register_buffer(
                "text_queue", F.normalize(torch.randn(embed, q), dim=0) if q else torch.zeros(embed, 0)
            )
            self.register_buffer("idx_queue", torch.full((1, q), -100, dtype=torch.long))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def _tie_decoder(self) -> None:
        enc, dec = self.text_encoder, self.text_decoder.bert
        dec.embeddings = enc.embeddings
        for le, ld in zip(enc.encoder.layer, dec.encoder.layer):
            ld.crossattention, ld.intermediate, ld.output = le.crossattention, le.intermediate, le.output
        # The LM head's output matrix is the word embedding (stock tie); re-point it at the shared one.
        self.text_decoder.cls.predictions.decoder.weight = enc.embeddings.word_embeddings.weight
        self.text_decoder.cls.predictions.decoder.bias = self.text_decoder.cls.predictions.bias

    # ------------------------------------------------------------------ state and parameters

    def _momentum_params(self):
        pairs = [
            (self.vision_model, self.vision_model_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_encoder, self.text_encoder_m),
            (self.text_proj, self.text_proj_m),
        ]
        for online, momentum in pairs:
            yield from zip(online.parameters(), momentum.parameters())

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Momentum copies = online weights (after loading new weights, as BLIP's `copy_params`)."""
        if self.options.momentum:
            for p, p_m in self._momentum_params():
                p_m.copy_(p)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.options.momentum_coef
        for p, p_m in self._momentum_params():
            p_m.mul_(m).add_(p.detach(), alpha=1 - m)

    def is_training_state(self, key: str) -> bool:
        """Momentum copies and queues: training state, not model weights."""
        return key.split(".")[0].endswith("_m") or key.split(".")[0] in (
            "image_queue",
            "text_queue",
            "idx_queue",
            "queue_ptr",
        )

    def canonical_state_dict(self, training_state: bool = False) -> dict[str, torch.Tensor]:
        """One entry per distinct tensor, named by its first owner (shared decoder weights are
        stored under text_encoder.*); safetensors refuses aliased tensors."""
        seen, out = set(), {}
        for key, value in self.state_dict(keep_vars=True).items():
            if id(value) in seen or (not training_state and self.is_training_state(key)):
                continue
            seen.add(id(value))
            out[key] = value.detach()
        return out

    def aliases(self) -> dict[str, str]:
        """Every state_dict key -> the canonical key holding the same tensor."""
        first: dict[int, str] = {}
        out = {}
        for key, value in self.state_dict(keep_vars=True).items():
            out[key] = first.setdefault(id(value), key)
        return out

    @torch.no_grad()
    def load_canonical(self, state: dict[str, torch.Tensor], training_state: bool = False) -> None:
        """Strict: the keys must be exactly `canonical_state_dict(training_state)`'s."""
        own = self.canonical_state_dict(training_state)
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyMismatch(
                f"MED state does not match: missing {missing[:8]} ({len(missing)}), "
                f"unexpected {unexpected[:8]} ({len(unexpected)})"
            )
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} != model's {tuple(own[key].shape)}")
            own[key].copy_(value)
        if not training_state:
            self.reset_momentum()

    def set_trainable(self, losses: dict[str, float]) -> None:
        """requires_grad only for weights some active loss reaches (momentum copies never)."""
        active = {k for k, w in losses.items() if w}
        frozen = []
        if "itc" not in active and "itm" not in active:
            frozen += _ENCODER_ONLY
        if "lm" not in active:
            frozen += _DECODER_ONLY
        if not active & {"itm", "lm"}:
            frozen += ("text_encoder.encoder.layer.{i}.crossattention.",)
        if "itc" not in active:
            frozen += ("vision_proj.", "text_proj.", "temp")
        if "itm" not in active:
            frozen += ("itm_head.",)
        layers = range(self.config.text_config.num_hidden_layers)
        prefixes = tuple({f.format(i=i) for f in frozen for i in layers})
        for name, p in self.named_parameters():
            p.requires_grad_(not self.is_training_state(name) and not name.startswith(prefixes))

    # ------------------------------------------------------------------ inference pieces

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values).last_hidden_state

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def text_feat(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_proj(hidden[:, 0, :]), dim=-1)

    def itm_logits(self, image_embeds, input_ids, attention_mask) -> torch.Tensor:
        """(image i, text i) match logits, one row per pair."""
        hidden = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds
        ).last_hidden_state
        return self.itm_head(hidden[:, 0, :])

    def lm_logits(self, image_embeds, input_ids, attention_mask=None) -> torch.Tensor:
        return self.text_decoder(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds
        ).logits

    @torch.no_grad()
    def greedy(self, pixel_values, prompt_ids: list[int], eos: int, pad: int, max_new_tokens: int) -> torch.Tensor:
        """Greedy captions without a KV cache: the plain reference the exported captioner must match."""
        embeds = self.image_embeds(pixel_values)
        ids = torch.tensor(prompt_ids, device=embeds.device).expand(len(embeds), -1)
        done = torch.zeros(len(embeds), dtype=torch.bool, device=embeds.device)
        for _ in range(max_new_tokens):
            nxt = self.lm_logits(embeds, ids)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == eos
            if bool(done.all()):
                break
        return ids[:, len(prompt_ids) :]

    # ------------------------------------------------------------------ training losses

    def forward(self, batch: dict, losses: dict[str, float], alpha: float = 0.0) -> dict[str, torch.Tensor]:
        """Weighted losses for one batch; `loss` is their sum. batch: pixel_values, image_ids,
        input_ids/attention_mask (encoder text), dec_input_ids/dec_attention_mask/dec_labels."""
        embeds = self.image_embeds(batch["pixel_values"])
        out = {}
        if losses.get("itc") or losses.get("itm"):
            out.update(self._itc_itm(embeds, batch, losses, alpha))
        if losses.get("lm"):
            logits = self.lm_logits(embeds, batch["dec_input_ids"], batch["dec_attention_mask"])
            out["lm"] = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),  # (B, L-1, vocab) -> (B*(L-1), vocab)
                batch["dec_labels"][:, 1:].reshape(-1),  # next-token targets (B, L-1) -> (B*(L-1),)
                ignore_index=-100,
                label_smoothing=self.options.label_smoothing,
            )
        out["loss"] = sum(losses[k] * out[k] for k in LOSSES if k in out)
        return out

    def _itc_itm(self, embeds, batch, losses, alpha) -> dict[str, torch.Tensor]:
        ids, mask, idx = batch["input_ids"], batch["attention_mask"], batch["image_ids"].view(-1, 1)  # (B,) -> (B, 1)
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_feat = self.image_feat(embeds).float()
        text_feat = self.text_feat(ids, mask).float()
        out = {}
        if losses.get("itc"):
            out["itc"] = self._itc(batch, image_feat, text_feat, idx, alpha)
        if losses.get("itm"):
            out["itm"] = self._itm(embeds, ids, mask, idx, image_feat, text_feat)
        return out

    def _itc(self, batch, image_feat, text_feat, idx, alpha) -> torch.Tensor:
        temp = self.temp.float()
        if not self.options.momentum:
            targets = (idx == idx.t()).float()
            targets = targets / targets.sum(1, keepdim=True)
            i2t, t2i = image_feat @ text_feat.t() / temp, text_feat @ image_feat.t() / temp
            return (_soft_ce(i2t, targets) + _soft_ce(t2i, targets)) / 2
        idx_all = torch.cat([idx.t(), self.idx_queue.clone()], dim=1)
        pos = (idx == idx_all).float()
        targets = pos / pos.sum(1, keepdim=True)
        with torch.no_grad():
            self._momentum_update()
            image_feat_m = F.normalize(
                self.vision_proj_m(self.vision_model_m(pixel_values=batch["pixel_values"]).last_hidden_state[:, 0, :]),
                dim=-1,
            ).float()
            hidden_m = self.text_encoder_m(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
            text_feat_m = F.normalize(self.text_proj_m(hidden_m[:, 0, :]), dim=-1).float()
            image_all = torch.cat([image_feat_m.t(), self.image_queue.clone().float()], dim=1)
            text_all = torch.cat([text_feat_m.t(), self.text_queue.clone().float()], dim=1)
            i2t_targets = alpha * F.softmax(image_feat_m @ text_all / temp, dim=1) + (1 - alpha) * targets
            t2i_targets = alpha * F.softmax(text_feat_m @ image_all / temp, dim=1) + (1 - alpha) * targets
        loss = (
            _soft_ce(image_feat @ text_all / temp, i2t_targets) + _soft_ce(text_feat @ image_all / temp, t2i_targets)
        ) / 2
        self._enqueue(image_feat_m, text_feat_m, idx)
        return loss

    @torch.no_grad()
    def _enqueue(self, image_feat, text_feat, idx) -> None:
        size = self.options.queue_size
        if not size:
            return
        n = min(len(idx), size)
        slots = (int(self.queue_ptr) + torch.arange(n, device=idx.device)) % size
        self.image_queue[:, slots] = image_feat[:n].t().to(self.image_queue.dtype)
        self.text_queue[:, slots] = text_feat[:n].t().to(self.text_queue.dtype)
        self.idx_queue[:, slots] = idx[:n].t()
        self.queue_ptr[0] = (int(self.queue_ptr) + n) % size

    def _itm(self, embeds, ids, mask, idx, image_feat, text_feat) -> torch.Tensor:
        """BLIP's hard negatives: for each text an image, for each image a text, drawn with
        probability softmax(ITC similarity), never one of the same image id."""
        bs = len(ids)
        with torch.no_grad():
            sim = image_feat @ text_feat.t() / self.temp.float()
            same = idx == idx.t()
            neg_image = _sample_negatives(sim.t(), same)  # per text
            neg_text = _sample_negatives(sim, same)  # per image
        all_embeds = torch.cat([embeds, embeds[neg_image], embeds], dim=0)
        all_ids = torch.cat([ids, ids, ids[neg_text]], dim=0)
        all_mask = torch.cat([mask, mask, mask[neg_text]], dim=0)
        logits = self.itm_logits(all_embeds, all_ids, all_mask).float()
        labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)]).to(ids.device)
        return F.cross_entropy(logits, labels)


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def _sample_negatives(sim: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    weights = F.softmax(sim, dim=1) + 1e-4
    weights = weights.masked_fill(same, 0.0)
    # A row whose every candidate shares its image id has no negative: draw uniformly, a rare
    # mislabelled pair is better than a crash (a batch of one image's captions).
    empty = weights.sum(1) == 0
    weights[empty] = 1.0
    return torch.multinomial(weights, 1).squeeze(1)
