"""The captioner section, and with it capfilt's one declaration of the decoding settings.

Each decoding setting is a field of `DecodingConfig`, declared once with its default, type, bounds
and checks; those a schedule group may set for its own samples are declared with `per_sample`.
Everything else is derived from here: `PER_SAMPLE` (their names), `DecodingGroup` (a schedule
group: ``n`` and each per-sample setting, unset = the captioner's), `CaptionerConfig` (the model,
then these settings), `capfilt.modeling.decoding.Decoding` (what the decode loop runs: this
class with its methods) and the settings the report lists for a captioner (`DECODING_SETTINGS`).
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field, create_model, model_serializer, model_validator

from capfilt.config.base import Strict

DEFAULT_PROMPT = "a picture of "  # BLIP's captioning prompt: the start of every caption, stripped from it


def per_sample(default, **field):
    """A decoding setting that a schedule group may give its own samples (`PER_SAMPLE`)."""
    return Field(default, json_schema_extra={"per_sample": True}, **field)


class DecodingConfig(Strict):
    """How the captioner decodes: K samples per image and the settings each is drawn with."""

    num_captions: int = Field(5, ge=1, le=256, description="K samples per image (default with a schedule: its sum)")
    sample: bool = Field(True, description="nucleus sampling (BLIP); false = greedy, one caption")
    top_p: float = per_sample(0.9, gt=0, le=1)
    top_k: int = per_sample(0, ge=0, description="0 = off")
    temperature: float = per_sample(1.0, gt=0)
    repetition_penalty: float = per_sample(1.0, gt=0)
    min_new_tokens: int = per_sample(5, ge=0)
    max_new_tokens: int = per_sample(30, ge=1)
    prompt: str = DEFAULT_PROMPT
    force_eos_prob: float | None = per_sample(
        None,
        gt=0,
        le=1,
        description="LAION-COCO: a caption ends at the first step where the model's unfiltered "
        "end-of-sequence probability exceeds this (checked at every step, before min_new_tokens too)",
    )
    schedule: list[DecodingGroup] | None = Field(
        None,
        min_length=1,
        description="groups of the K samples with their own settings, e.g. LAION-COCO's "
        "[{n: 8, max_new_tokens: 20}, {n: 8, max_new_tokens: 30}, ...]; the n must sum to num_captions",
    )

    @model_validator(mode="before")
    @classmethod
    def _k_from_schedule(cls, data):
        if isinstance(data, dict) and data.get("num_captions") is None and isinstance(data.get("schedule"), list):
            counts = [g.get("n") for g in data["schedule"] if isinstance(g, dict)]
            if counts and all(isinstance(c, int) for c in counts):
                data = {**data, "num_captions": sum(counts)}
        return data

    @model_validator(mode="after")
    def _lengths(self):
        if self.min_new_tokens > self.max_new_tokens and not self.schedule:
            raise ValueError("min_new_tokens must not exceed max_new_tokens")
        if self.schedule:
            if not self.sample:
                raise ValueError("schedule needs sample: true (greedy decoding writes one caption)")
            total = sum(g.n for g in self.schedule)
            if total != self.num_captions:
                raise ValueError(f"schedule: its groups' n sum to {total}, num_captions is {self.num_captions}")
            for i, g in enumerate(self.schedule):
                lo = self.min_new_tokens if g.min_new_tokens is None else g.min_new_tokens
                hi = self.max_new_tokens if g.max_new_tokens is None else g.max_new_tokens
                if lo > hi:
                    raise ValueError(f"schedule[{i}]: min_new_tokens {lo} exceeds max_new_tokens {hi}")
        return self


PER_SAMPLE = tuple(
    name for name, f in DecodingConfig.model_fields.items() if (f.json_schema_extra or {}).get("per_sample")
)
DECODING_SETTINGS = tuple(DecodingConfig.model_fields)  # every decoding setting, in declaration order


class _Group(Strict):
    n: int = Field(..., ge=1, description="samples in this group")

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}  # only what the group sets


def _optional(name: str):
    """A per-sample setting as a group holds it: its type and bounds, unset (None) by default."""
    f = DecodingConfig.model_fields[name]
    kind = next(a for a in (get_args(f.annotation) or (f.annotation,)) if a is not type(None))
    return Annotated[(kind, *f.metadata)] | None, Field(None, description=f.description)


DecodingGroup = create_model(
    "DecodingGroup",
    __base__=_Group,
    __doc__="``n`` of an image's samples with their own decoding settings; an unset one is the captioner's.",
    __module__=__name__,
    **{name: _optional(name) for name in PER_SAMPLE},
)
DecodingConfig.model_rebuild()


class _CaptionerModel(Strict):
    model: str = Field(..., description="preset in models/, local directory, hub id or open_clip CoCa name")
    revision: str | None = None
    family: Literal["blip", "coca", "git", "image-text-to-text"] | None = Field(
        None,
        description="captioner family (capfilt/modeling/families); default: read from the checkpoint, "
        "refused when ambiguous",
    )
    pretrained: str | None = Field(None, description="coca: open_clip pretrained tag or checkpoint file")
    instruction: str | None = Field(
        None,
        description="image-text-to-text: the user message, rendered with the processor's chat template; "
        "prompt then starts the answer",
    )


class CaptionerConfig(DecodingConfig, _CaptionerModel):
    """The `captioner` section: which model (`_CaptionerModel`'s keys, first), how it decodes
    (`DecodingConfig`'s), and its batch size; dumped in that order, as before the split."""

    batch_size: int | None = Field(None, ge=1, description="images per captioner batch (default: run batch_size)")

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """force_eos_prob and schedule appear only when set: a config without them dumps, and so
        fingerprints, as before they existed (resuming an older run does not refuse)."""
        optional = ("force_eos_prob", "schedule", "family", "pretrained", "instruction")
        return {k: v for k, v in handler(self).items() if k not in optional or v is not None}
