"""Recipes as YAML: a mapping read with duplicate keys refused and YAML 1.2's numbers, and the
`--set key=value` overrides applied to it."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from capfilt.config.base import ConfigError, written
from capfilt.shipped import find_recipe


def set_dotted(data: dict, assignment: str) -> None:
    """Apply one `--set a.b.c=value` override (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if isinstance(node, list):  # a list in the config (the clip chain): `clip.0.keep_top=3`
            node = node[_index(key, part, node)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {key}: {part} is not a section")
    value = yaml.load(raw, Loader=_UniqueKeyLoader)  # the recipe's own rules: `--set optim.lr=1e-4` is a number
    if isinstance(node, list):
        node[_index(key, parts[-1], node)] = value
    else:
        node[parts[-1]] = value


def _index(key: str, part: str, items: list) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"--set {key}: {part!r} is not an index of that list (0..{len(items) - 1})")
    return int(part)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key written twice in one mapping is an error naming both lines
    (PyYAML keeps the last value silently: ``seed: 0`` then ``seed: 1`` would run seed 1)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if first != key_node.start_mark.line + 1:
                raise ConfigError(
                    f"{key_node.start_mark.name}: line {key_node.start_mark.line + 1}: duplicate key {key!r} "
                    f"(first set on line {first}); remove one of them"
                )
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads `1e-4` as a string because it has no dot; every user means a number, as
# YAML 1.2 says. Strict types refuse a string where a number belongs, so read it as YAML 1.2 does
# (a quoted "1e-4" stays a string and is refused).
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """A YAML mapping (empty when path is None) with `--set key=value` overrides applied."""
    data: dict = {}
    if path is not None:
        path = find_recipe(path)
        try:
            with open(path, encoding="utf-8") as f:  # a stream: YAML's marks name the file
                data = yaml.load(f, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if data is None:  # an empty file (or only comments): say so, not what its defaults lack
            raise ConfigError(f"{path}: the file is empty (no keys); a recipe needs at least its models' sections")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, not {written(data)}")
    for assignment in overrides:
        set_dotted(data, assignment)
    return data
