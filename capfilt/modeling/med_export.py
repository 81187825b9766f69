"""MED <-> stock checkpoints, and the MED's own checkpoint directory.

Export writes a `BlipForConditionalGeneration` (captioner) or `BlipForImageTextRetrieval` (filter)
directory with `save_pretrained` + the processor: what capfilt's `Captioner`/`ItmFilter` and any
`transformers` user load. Import builds a MED from one or both. The MED names its modules as the
stock classes do, so a stock key *is* a MED key (possibly an alias of a shared weight); the key
checks below are there to fail loudly the day that stops being true.

Import rules (every source key is either loaded or reported as superseded, never dropped silently):
- shared weights (ViT, text embeddings, cross-attention, FFN) come from the filter when both are
  given (the captioner's copies are reported in `superseded`), else from the one given;
- a missing self-attention is copied from the other branch's (both start from the same BERT in
  BLIP), and heads with no source (ITC/ITM heads from a captioner, LM head transform from a
  filter) keep their fresh initialisation; `ImportReport.initialised` lists them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.modeling.loading import from_pretrained
from capfilt.modeling.med import KeyMismatch, Med, MedOptions
from capfilt.modeling.presets import blip_config, blip_processor, load_preset, resolve_blip

ROLES = {"captioner": BlipForConditionalGeneration, "filter": BlipForImageTextRetrieval}
_ROLE_PREFIXES = {
    "captioner": ("vision_model.", "text_decoder."),
    "filter": ("vision_model.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head."),
}
MED_WEIGHTS, MED_CONFIG = "med.safetensors", "med_config.json"


def stock_keys(role: str, config: BlipConfig) -> set[str]:
    """The state_dict keys of the stock class, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = ROLES[role](config)
    return set(model.state_dict())


def export_state(med: Med, role: str) -> dict[str, torch.Tensor]:
    """The stock model's full state_dict from the MED, checked key for key."""
    full = med.state_dict()
    state = {k: v for k, v in full.items() if k.startswith(_ROLE_PREFIXES[role])}
    expected = stock_keys(role, med.config)
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise KeyMismatch(f"MED -> {ROLES[role].__name__}: unmapped stock keys {missing}, leftover MED keys {extra}")
    return state


def export(med: Med, role: str, out_dir: str | Path, processor) -> Path:
    """Write a stock checkpoint directory; loads strictly with `from_pretrained`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one small file; a bar per export is noise
    out = Path(out_dir)
    model = ROLES[role](med.config)
    model.load_state_dict({k: v.detach().clone() for k, v in export_state(med, role).items()}, strict=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@dataclass
class ImportReport:
    loaded: dict[str, str] = field(default_factory=dict)  # MED canonical key -> "captioner:<key>" / "filter:<key>"
    superseded: list[str] = field(default_factory=list)  # source keys not used: a preferred source had them
    copied: dict[str, str] = field(default_factory=dict)  # MED key -> MED key it was initialised from
    initialised: list[str] = field(default_factory=list)  # MED keys left at fresh initialisation


def _self_attention_pairs(med: Med):
    """(encoder key, decoder key) for each self-attention weight."""
    dec_prefix = "text_decoder.bert."
    for key in med.canonical_state_dict():
        if key.startswith("text_encoder.encoder.layer.") and ".attention." in key:
            yield key, dec_prefix + key[len("text_encoder.") :]


@torch.no_grad()
def import_stock(med: Med, sources: dict[str, dict[str, torch.Tensor]]) -> ImportReport:
    """Load stock state dicts ({"captioner": sd, "filter": sd}, one or both) into the MED."""
    if not sources or set(sources) - set(ROLES):
        raise ValueError(f"sources must be some of {sorted(ROLES)}, got {sorted(sources)}")
    aliases, own = med.aliases(), med.canonical_state_dict()
    report = ImportReport()
    for role in [r for r in ("filter", "captioner") if r in sources]:  # filter first: it wins shared keys
        expected = stock_keys(role, med.config)
        state = sources[role]
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise KeyMismatch(
                f"{role} checkpoint is not a {ROLES[role].__name__}: missing {missing}, unexpected {extra}"
            )
        for key, value in state.items():
            if key not in aliases:
                raise KeyMismatch(f"{role} key {key!r} has no place in the MED")
            target = aliases[key]
            if target in report.loaded:
                if not report.loaded[target].startswith(role + ":"):
                    report.superseded.append(f"{role}:{key}")
                continue  # a tied alias within one checkpoint (e.g. LM output = word embeddings)
            if own[target].shape != value.shape:
                raise ValueError(f"{role}:{key}: shape {tuple(value.shape)} != MED {tuple(own[target].shape)}")
            own[target].copy_(value)
            report.loaded[target] = f"{role}:{key}"
    for enc, dec in _self_attention_pairs(med):
        for dst, src in ((enc, dec), (dec, enc)):
            if dst not in report.loaded and src in report.loaded:
                own[dst].copy_(own[src])
                report.copied[dst] = src
    report.initialised = sorted(k for k in own if k not in report.loaded and k not in report.copied)
    med.reset_momentum()
    return report


def import_med(
    captioner: str | None = None, filter: str | None = None, options: MedOptions = MedOptions(), seed: int = 0
) -> tuple[Med, object, ImportReport]:
    """A MED from stock checkpoints: presets, local directories or hub ids (resolved like the
    pipeline's models). Returns (med, processor, report)."""
    names = {r: n for r, n in (("captioner", captioner), ("filter", filter)) if n}
    if not names:
        raise ValueError("import_med needs a captioner and/or a filter checkpoint")
    models = {}
    for role, name in names.items():
        ref = resolve_blip(name, role)
        models[role] = (from_pretrained(ROLES[role], ref.location, ref.revision), ref)
    first_role = "filter" if "filter" in models else "captioner"
    config = models[first_role][0].config
    for model, _ in models.values():
        if model.config.to_dict()["text_config"]["hidden_size"] != config.text_config.hidden_size:
            raise ValueError("captioner and filter checkpoints have different text architectures")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        med = Med(config, options)
    report = import_stock(med, {role: m.state_dict() for role, (m, _) in models.items()})
    ref = models[first_role][1]
    processor = AutoProcessor.from_pretrained(ref.location, revision=ref.revision)
    return med, processor, report


def new_med(preset: str, options: MedOptions = MedOptions(), seed: int | None = None) -> tuple[Med, object]:
    """A randomly initialised MED with a preset's architecture and tokenizer."""
    spec = load_preset(preset)
    if spec is None or spec.get("kind") != "blip":
        raise ValueError(f"{preset!r} is not a BLIP preset in models/")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.get("init_seed", 0) if seed is None else seed)
        med = Med(blip_config(spec), options)
    return med, blip_processor(spec)


def save_med(med: Med, out_dir: str | Path, processor) -> Path:
    """The MED's own checkpoint: model weights (no momentum/queues), config, processor."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in med.canonical_state_dict().items()}, str(out / MED_WEIGHTS))
    meta = {"blip_config": med.config.to_dict(), "options": med.options.to_dict()}
    (out / MED_CONFIG).write_text(json.dumps(meta, indent=1))
    processor.save_pretrained(out)
    return out


def load_med(directory: str | Path, options: MedOptions | None = None) -> tuple[Med, object]:
    """A MED saved by `save_med`; `options` (momentum, queue, ...) may differ from the saved ones,
    since momentum copies and queues are rebuilt from the weights."""
    path = Path(directory)
    if not (path / MED_CONFIG).is_file():
        raise FileNotFoundError(f"{path}: no {MED_CONFIG}; not a MED checkpoint written by capfilt train")
    meta = json.loads((path / MED_CONFIG).read_text())
    config = BlipConfig.from_dict(meta["blip_config"])
    med = Med(config, options or MedOptions(**meta["options"]))
    med.load_canonical(load_file(str(path / MED_WEIGHTS)))
    return med, AutoProcessor.from_pretrained(str(path))
