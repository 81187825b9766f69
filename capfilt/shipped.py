"""capfilt's shipped data folders (model presets, recipes) and recipe discovery: where this
installation keeps them, a recipe named by path or by its shipped name, and the list of recipes."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


# capfilt's data folders: in a source checkout at the repository's top level (`models/` presets and
# tokenizer vocabulary, `pipelines/` recipes), in an installed wheel inside the package under these
# names (setup.py copies them there at build time). One home each; `shipped_dir` finds it.
SHIPPED = {"models": "presets", "pipelines": "recipes"}


def shipped_dir(folder: str) -> Path:
    """The folder ``models`` or ``pipelines`` as this installation has it: ``capfilt/presets`` /
    ``capfilt/recipes`` inside an installed wheel, else the checkout's top-level folder."""
    package = Path(__file__).resolve().parent
    packaged = package / SHIPPED[folder]
    checkout = package.parent / folder
    # (a checkout is recognised by its pyproject.toml: never a stray `models/` in site-packages)
    return checkout if not packaged.is_dir() and (package.parent / "pyproject.toml").is_file() else packaged


def recipes_dir() -> Path:
    return shipped_dir("pipelines")


def find_recipe(path: str | Path) -> Path:
    """A YAML file here, or else one of the recipes shipped with capfilt (`capfilt recipes`).

    A path that names no file here is looked up among the shipped recipes, with or without a
    leading ``pipelines/`` and a ``.yaml`` suffix: ``demo/tiny.yaml``, ``pipelines/demo/tiny.yaml``
    and ``demo/tiny`` all name the shipped demo recipe wherever capfilt runs. A file here wins.
    """
    from capfilt.config import ConfigError  # config reads recipes through this module

    given = Path(path).expanduser()
    if given.is_file():
        return given
    if given.exists():
        raise ConfigError(f"config {path} is a directory, not a YAML recipe")
    if not given.is_absolute():
        parts = given.parts[1:] if given.parts[:1] == ("pipelines",) and len(given.parts) > 1 else given.parts
        rel = Path(*parts)
        for candidate in (rel, rel.with_name(rel.name + ".yaml")):
            shipped = recipes_dir() / candidate
            if shipped.is_file():
                log.info("%s is not a file here: using the shipped recipe %s", path, shipped)
                return shipped
    raise ConfigError(
        f"config file not found: {path} (not a file here, nor a recipe shipped with capfilt; "
        "`capfilt recipes` lists those)"
    )


def list_recipes() -> list[tuple[str, str]]:
    """(name, first comment line) of every shipped recipe; the name is what `find_recipe` takes."""
    root = recipes_dir()
    out = []
    for path in sorted(root.rglob("*.yaml")):
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        out.append((path.relative_to(root).as_posix(), first))
    return out
