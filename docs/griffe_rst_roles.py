"""Griffe extension for the API page: reST roles and math blocks in docstrings to Markdown.

``:func:`~pkg.name``` (any role) becomes ```pkg.name```, as the plain-text page did, and a
``.. math::`` block (up to the next blank line) becomes a ``$$ ... $$`` block for arithmatex, and
a paragraph opening with ``Note:`` becomes a numpy ``Notes`` section (so the numpy parser does not
read it as more parameters of a ``Parameters`` section above it).
Loaded by mkdocstrings (``extensions`` in ``mkdocs.yml``); the package itself is not changed.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]+)`")
_NOTE = re.compile(r"\n\n([ \t]*)Note:[ \t]*")
_MATH = re.compile(r"^([ \t]*)\.\. math::[ \t]*(.*(?:\n[ \t]*\S.*)*)", re.MULTILINE)


def _math(m: re.Match) -> str:
    ind = m.group(1)
    body = "\n".join(line.strip() for line in m.group(2).splitlines() if line.strip())
    return "\n".join([ind + "$$", *(ind + line for line in body.splitlines()), ind + "$$"])


class RstRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:  # noqa: ARG002
        if obj.docstring is not None:
            text = _MATH.sub(_math, obj.docstring.value)
            text = _NOTE.sub(lambda m: f"\n\n{m[1]}Notes\n{m[1]}-----\n{m[1]}", text)
            obj.docstring.value = _ROLE.sub(r"`\1`", text)
