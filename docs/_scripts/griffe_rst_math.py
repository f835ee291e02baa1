"""Griffe extension: RST math and roles in docstrings -> Markdown for mkdocstrings.

The library's docstrings follow the Google style with Sphinx-style math
(``.. math::`` blocks and ``:math:`` roles) and cross-reference roles
(``:func:``, ``:class:``, ``:meth:``), so they read well in ``help()`` and in
editors. mkdocstrings renders docstrings as Markdown, where those constructs
would show as plain text. This extension rewrites them, before griffe parses
the sections, into what ``pymdownx.arithmatex`` and mkdocs-autorefs understand:

* ``.. math:: expr`` (one line) or an indented ``.. math::`` block ->
  a ``$$ ... $$`` display block at the same indentation;
* ``:math:`expr``` -> ``$expr$``;
* ``:func:`name``` etc. -> a cross-reference when ``name``, looked up from
  the docstring's own class and module outwards (then as
  ``distrax_mixcdf.name``), is something the API pages (``docs/api/*.md``)
  render; otherwise a code span, so no link can dangle.

What a maintainer may change: the role list and the link rule. Keep the
rewrite purely textual and local to a docstring so line numbers in griffe's
warnings still point at the source.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import griffe

_PACKAGE = "distrax_mixcdf"
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:func|class|meth|attr|mod|obj|data):`(~?)([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\. math::\s*(?P<rest>.*)$")


def _math_blocks(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        body = [match["rest"]] if match["rest"].strip() else []
        i += 1
        # The block is every following line indented deeper than the directive
        # (blank lines inside it included).
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        trailing_blank = bool(out) and out[-1].strip() != ""
        if trailing_blank:
            out.append("")
        out.append(f"{indent}$$")
        out.extend(f"{indent}{line}" for line in body if line)
        out.append(f"{indent}$$")
        out.append("")
    return "\n".join(out)


def _rendered_paths(pkg: griffe.Module) -> set[str]:
    """Identifiers the API pages render (``::: target`` and public members)."""
    pages = pathlib.Path(__file__).resolve().parents[1] / "api"
    targets = set()
    for page in pages.glob("*.md"):
        targets |= set(re.findall(r"^::: *([\w.]+)", page.read_text(), re.M))
    paths: set[str] = set()

    def add(path: str, obj: Any, depth: int) -> None:
        paths.add(path)
        try:
            obj = obj.final_target if obj.is_alias else obj
            if obj.is_module:
                exports = obj.exports
                members = {
                    name: obj.members[name]
                    for name in (exports if exports is not None else obj.members)
                    if name in obj.members
                }
            elif obj.is_class:
                members = obj.all_members  # inherited ones are rendered too
            else:
                return
        except (griffe.AliasResolutionError, griffe.CyclicAliasError, KeyError):
            return  # an external object (e.g. distrax's): no anchor of ours
        for name, member in members.items():
            if str(name).startswith("_") or depth >= 3:
                continue
            try:
                documented = member.final_target if member.is_alias else member
                # mkdocstrings hides objects without a docstring: no anchor.
                if documented.docstring is None and not documented.is_module:
                    continue
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue
            add(f"{path}.{name}", member, depth + 1)

    for target in targets:
        relative = target.split(".", 1)[1] if "." in target else ""
        try:
            add(target, pkg[relative] if relative else pkg, 0)
        except KeyError:
            continue
    return paths


class RstMath(griffe.Extension):
    """Rewrites RST math and cross-reference roles in every docstring."""

    def __init__(self) -> None:
        """Starts with no package loaded."""
        super().__init__()
        self._objects: dict[str, Any] = {}
        self._rendered: set[str] = set()

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrites the docstrings of every object in the loaded package."""
        if pkg.name != _PACKAGE:
            return
        self._objects = {}
        self._collect(pkg)
        self._rendered = _rendered_paths(pkg)
        for obj in self._objects.values():
            if obj.docstring is not None:
                obj.docstring.value = self.rewrite(obj.docstring.value, obj)

    def _collect(self, obj: griffe.Object) -> None:
        self._objects[obj.path] = obj
        for member in obj.members.values():
            if not member.is_alias:
                self._collect(member)  # type: ignore[arg-type]

    def _resolve(self, name: str, context: griffe.Object | None) -> str | None:
        """The rendered identifier ``name`` refers to, seen from ``context``."""
        scopes = []
        scope = context
        while scope is not None:
            scopes.append(scope.path)
            scope = scope.parent
        candidates = [name] + [f"{path}.{name}" for path in scopes]
        # A name defined in a private module is rendered under its public
        # re-export (`distrax_mixcdf.fit`, not `distrax_mixcdf.training.fit`).
        candidates.append(f"{_PACKAGE}.{name}")
        candidates.append(f"{_PACKAGE}.{name.split('.')[-1]}")
        for candidate in candidates:
            if candidate in self._rendered:
                return candidate
        return None

    def rewrite(self, text: str, context: griffe.Object | None = None) -> str:
        """Returns ``text`` with RST math/roles replaced by Markdown."""
        text = _math_blocks(text)
        text = _MATH_ROLE.sub(lambda m: f"${m[1]}$", text)

        def xref(match: re.Match[str]) -> str:
            tilde, name = match[1], match[2]
            label = name.split(".")[-1] if tilde else name
            target = self._resolve(name, context)
            if target is None:
                return f"`{label}`"
            return f"[`{label}`][{target}]"

        return _XREF_ROLE.sub(xref, text)
