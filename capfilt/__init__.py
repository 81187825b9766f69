"""capfilt: BLIP CapFilt data bootstrapping (caption, filter, rerank) at cluster scale."""

__version__ = "0.1.0"
