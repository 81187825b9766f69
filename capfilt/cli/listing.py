"""`capfilt models` and `capfilt recipes`: what capfilt ships."""

from __future__ import annotations

import os


def cmd_models(args) -> int:
    from capfilt.modeling.presets import list_presets, load_preset, models_dir

    names = list_presets()
    if not names:
        where = "CAPFILT_MODELS_DIR" if os.environ.get("CAPFILT_MODELS_DIR") else "this installation"
        raise FileNotFoundError(
            f"no model presets (*.json) in {models_dir()} ({where}); point CAPFILT_MODELS_DIR "
            "at a folder of presets, or unset it to use the ones shipped with capfilt"
        )
    print(f"# presets in {models_dir()}")
    for name in names:
        print(f"{name:16s} {load_preset(name).get('description', '')}")
    return 0


def cmd_recipes(args) -> int:
    from capfilt.shipped import list_recipes, recipes_dir

    recipes = list_recipes()
    if not recipes:
        raise FileNotFoundError(f"no recipes (*.yaml) in {recipes_dir()}")
    print(
        f"# recipes in {recipes_dir()}; name one as CONFIG (e.g. `capfilt run demo/tiny.yaml ...`), or copy it and edit"
    )
    for name, description in recipes:
        print(f"{name:36s} {description}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "models",
        help="list the model presets (CAPFILT_MODELS_DIR, or the shipped ones)",
        description="The model presets a config can name as captioner.model, filter.model or "
        "clip.model: JSON architectures built once with seeded random weights. capfilt ships them "
        "(models/ in a checkout, capfilt/presets in an installed package); CAPFILT_MODELS_DIR "
        "points at a folder of your own instead.",
    )
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "recipes",
        help="list the recipes shipped with capfilt",
        description="Recipes (YAML configs) shipped with capfilt. A CONFIG that is not a file here "
        "names one of them: `capfilt run demo/tiny.yaml` (or pipelines/demo/tiny.yaml) works from "
        "any directory; a file here wins.",
    )
    p.set_defaults(func=cmd_recipes)
