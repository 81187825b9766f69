"""The report's markup lives in templates (package data next to this module), rendered by one
jinja2 environment that escapes every value it is given: web texts are hostile input, and no
hand-written escape call can be forgotten. Markup built elsewhere is passed in as `Markup`."""

from __future__ import annotations

from functools import cache

from markupsafe import Markup

__all__ = ["Markup", "render"]


@cache
def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("capfilt.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a name the template uses but was not given fails loudly
    )


@cache
def _variables(template: str) -> frozenset[str]:
    """The names ``templates/<template>`` reads from what it is given."""
    from jinja2 import meta

    env = _environment()
    return frozenset(meta.find_undeclared_variables(env.parse(env.loader.get_source(env, template)[0])))


def render(template: str, **values) -> str:
    """``templates/<template>`` rendered with ``values``: a value it does not use (a misspelt name,
    whose template variable would then be missing) is refused, as is one it uses and is not given."""
    unused = set(values) - _variables(template)
    if unused:
        raise TypeError(f"templates/{template} uses no {', '.join(sorted(unused))}")
    return _environment().get_template(template).render(**values)
