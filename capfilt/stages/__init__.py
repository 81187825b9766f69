"""Pipeline stages: callable classes over a batch (a dict of equal-length column lists).

decode -> caption -> score (ITM/ITC) -> rerank (CLIP) -> decide. Each `__init__` loads what it
needs once; each `__call__(batch) -> batch` adds columns. Ray Data runs the same classes.
"""

from capfilt.stages.decide import Decide
from capfilt.stages.decode import Decode
from capfilt.stages.models import Caption, Rerank, Score

__all__ = ["Decode", "Caption", "Score", "Rerank", "Decide"]
