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


def render(template: str, **values) -> str:
    """``templates/<template>`` rendered with ``values``."""
    return _environment().get_template(template).render(**values)
