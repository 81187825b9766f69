"""capfilt: BLIP CapFilt data bootstrapping (caption, filter, rerank) at cluster scale.

    capfilt.run(recipe, input=..., output=...)   -> summary    (`capfilt run`)
    capfilt.bootstrap(loop_recipe, output=...)    -> state      (`capfilt loop`)

See capfilt.api for the arguments.
"""

from capfilt.api import bootstrap, run

__version__ = "0.1.0"

__all__ = ["__version__", "bootstrap", "run"]
