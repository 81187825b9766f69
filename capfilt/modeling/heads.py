"""LAION's small per-image scorers, with their published architectures, loaded strictly.

* ``laion_aesthetic``: the improved aesthetic predictor (christophschuhmann/improved-aesthetic-
  predictor ``MLP``): an MLP on the L2-normalised CLIP ViT-L/14 image embedding, score about 1..10.
  State-dict keys ``layers.{0,2,4,6,7}.{weight,bias}`` as its ``sac+logos+ava1-l14-linearMSE.pth``.
* ``laion_nsfw``: the CLIP-based NSFW detector (LAION-AI/CLIP-based-NSFW-Detector, an autokeras
  model on the same embeddings) in its PyTorch port's layout: input normalisation buffers
  (``category_mapper``, ``mean``, ``std``), ``linear_1..3`` with ReLU, a sigmoid: punsafe in 0..1.
* ``laion_watermark``: LAION-AI/watermark-detection: a timm classifier (``efficientnet_b3a``, the
  ``efficientnet_b3`` architecture in timm >= 0.9) whose ``classifier`` is replaced by
  Linear(F, 625) ReLU Dropout(0.3) Linear(625, 256) ReLU Linear(256, 2), on 256x256 ImageNet-
  normalised pixels; pwatermark = softmax class 0. Its checkpoint is the whole model's state dict:
  the backbone's keys as timm names them plus ``classifier.{0,3,5}.*``. capfilt builds the stock
  timm backbone (``num_classes=0``: pooled features) and the published head beside it, and loads
  the two halves of that one state dict, each strictly — no timm module is replaced.

A model is named like every other: a preset in ``models/`` (built once with seeded random weights),
a local directory, or a hub id; a directory holds ``config.json`` (the preset's fields: kind,
sizes, the embedding model it was trained on) and ``model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from capfilt.modeling.loading import pick_device

KINDS = ("laion_aesthetic", "laion_nsfw", "laion_watermark")
WEIGHTS = "model.safetensors"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class AestheticMLP(nn.Module):
    """The improved aesthetic predictor's MLP (its Lightning module without the training code)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


class NsfwMLP(nn.Module):
    """The CLIP-based NSFW detector (autokeras: normalisation, two dense ReLU layers, a sigmoid)."""

    def __init__(self, embed_dim: int = 768, inner: int = 32):
        super().__init__()
        self.register_buffer("category_mapper", torch.ones(1, embed_dim))
        self.register_buffer("mean", torch.zeros(1, embed_dim))
        self.register_buffer("std", torch.ones(1, embed_dim))
        self.linear_1 = nn.Linear(embed_dim, inner)
        self.linear_2 = nn.Linear(inner, inner)
        self.linear_3 = nn.Linear(inner, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x * self.category_mapper - self.mean) / self.std
        x = torch.relu(self.linear_2(torch.relu(self.linear_1(x))))
        return torch.sigmoid(self.linear_3(x)).squeeze(-1)


class WatermarkDetector(nn.Module):
    """A stock timm backbone (pooled features) and LAION's watermark head."""

    def __init__(self, timm_model: str = "efficientnet_b3", **timm_kwargs):
        super().__init__()
        import timm

        self.backbone = timm.create_model(timm_model, pretrained=False, num_classes=0, **timm_kwargs)
        features = self.backbone.num_features
        self.classifier = nn.Sequential(
            nn.Linear(features, 625), nn.ReLU(), nn.Dropout(0.3), nn.Linear(625, 256), nn.ReLU(), nn.Linear(256, 2)
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pwatermark: the probability of class 0 (LAION's "watermark" class)."""
        return torch.softmax(self.classifier(self.backbone(pixels)), dim=-1)[:, 0]

    def checkpoint_state(self) -> dict:
        """The state dict in LAION's checkpoint layout (one timm model, its classifier replaced)."""
        return {**self.backbone.state_dict(), **{f"classifier.{k}": v for k, v in self.classifier.state_dict().items()}}

    def load_checkpoint_state(self, state: dict) -> None:
        head = {k.removeprefix("classifier."): v for k, v in state.items() if k.startswith("classifier.")}
        self.backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")}, strict=True)
        self.classifier.load_state_dict(head, strict=True)


def build(config: dict) -> nn.Module:
    """The module a ``config.json`` describes (random weights)."""
    kind = config.get("kind")
    if kind == "laion_aesthetic":
        return AestheticMLP(config["embed_dim"])
    if kind == "laion_nsfw":
        return NsfwMLP(config["embed_dim"], config.get("inner", 32))
    if kind == "laion_watermark":
        return WatermarkDetector(config["timm_model"], **config.get("timm_kwargs", {}))
    raise ValueError(f"not a capfilt head kind: {kind!r} (one of {', '.join(KINDS)})")


def state_of(module: nn.Module) -> dict:
    return module.checkpoint_state() if isinstance(module, WatermarkDetector) else module.state_dict()


def _build_preset(preset: dict):
    def write(directory: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(preset.get("init_seed", 0))
            module = build(preset)
        save_head(directory, preset, state_of(module))

    return write


def save_head(directory: str | Path, config: dict, state: dict) -> Path:
    """Write a head directory (config.json + model.safetensors) from a published checkpoint's state
    dict, checked first by loading it strictly into the architecture ``config`` names. E.g. LAION's
    aesthetic predictor::

        save_head("heads/laion-aesthetic-vit-l-14",
                  {"kind": "laion_aesthetic", "embed_dim": 768, "clip_model": "ViT-L-14", "clip_pretrained": "openai"},
                  torch.load("sac+logos+ava1-l14-linearMSE.pth", weights_only=True))
    """
    from safetensors.torch import save_file

    module = build(config)
    if isinstance(module, WatermarkDetector):
        module.load_checkpoint_state(state)
    else:
        module.load_state_dict(state, strict=True)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_of(module).items()}, str(directory / WEIGHTS))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def resolve_head(name: str, what: str, revision: str | None = None) -> tuple[Path, dict]:
    """(directory with config.json and model.safetensors, identity for run.json)."""
    from capfilt.modeling import presets as p

    p.not_empty(name, what)
    preset = p.preset_named(name, what)
    if preset is not None:
        if preset.get("kind") not in KINDS:
            raise p.ModelRefError(f"{what}: the preset is a {preset.get('kind')} model, not a LAION head")
        directory = p.materialise(name, preset, "head", _build_preset(preset))
        return directory, {"preset": name, "sha256": p.weights_sha256(directory)}
    local = p.existing_path(name)
    if local is not None:
        if not (local.is_dir() and (local / "config.json").is_file() and (local / WEIGHTS).is_file()):
            raise p.ModelRefError(f"{what}: {local} is not a directory with config.json and {WEIGHTS}")
        return local, {"path": str(local), "sha256": p.weights_sha256(local)}
    ref = p.hub_ref(name, revision, what, "config.json")
    from huggingface_hub import snapshot_download

    directory = Path(snapshot_download(ref.location, revision=ref.revision, allow_patterns=["config.json", WEIGHTS]))
    return directory, ref.identity


class Head:
    """One loaded head: its module (eval mode, on ``device``), config and identity."""

    def __init__(self, name: str, what: str, *, revision: str | None = None, device: str = "auto", kind: str):
        from safetensors.torch import load_file

        directory, self.identity = resolve_head(name, what, revision)
        self.config = json.loads((directory / "config.json").read_text())
        if self.config.get("kind") != kind:
            raise ValueError(f"{what}: {name} is a {self.config.get('kind')} model, not a {kind} one")
        self.name, self.what = name, what
        self.device = pick_device(device)
        self.module = build(self.config)
        state = load_file(str(directory / WEIGHTS))
        if isinstance(self.module, WatermarkDetector):
            self.module.load_checkpoint_state(state)
        else:
            self.module.load_state_dict(state, strict=True)
        self.module.to(self.device).eval()

    def check_embedder(self, model: str, pretrained: str | None, dim: int) -> None:
        """Refuse, in one line, embeddings from another model than the one this head was trained on."""
        want = (self.config.get("clip_model"), self.config.get("clip_pretrained"))
        if want != (model, pretrained) or self.config.get("embed_dim") != dim:
            raise ValueError(
                f"{self.what} {self.name} scores {want[0]}{'/' + want[1] if want[1] else ''} image embeddings "
                f"(dim {self.config.get('embed_dim')}), but the clip chain's embedding model is "
                f"{model}{'/' + pretrained if pretrained else ''} (dim {dim}); use a head trained on that model"
            )

    @torch.inference_mode()
    def score_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        """One score per L2-normalised embedding row (float32)."""
        x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32), device=self.device)
        return self.module(x).float().cpu().numpy()

    @torch.inference_mode()
    def score_images(self, images: list[np.ndarray]) -> np.ndarray:
        """pwatermark per RGB image (uint8 HxWx3): LAION's 256x256 resize and ImageNet normalisation."""
        size = self.config.get("image_size", 256)
        x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in _resized(images, size)])
        x = x.float().div(255.0)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return self.module(((x - mean) / std).to(self.device)).float().cpu().numpy()


def _resized(images: list[np.ndarray], size: int) -> list[np.ndarray]:
    from PIL import Image

    # torchvision's Resize((256, 256)) on a PIL image is a bilinear resize to that exact size
    return [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images]
