"""A griffe extension for the API reference: the docstrings' reST markup rendered as Markdown.

attnpool's docstrings follow the Google style with reST inline markup (``:func:`~attnpool.x.y```, ``.. math::``,
``.. code-block:: python``), which mkdocstrings would show verbatim. This rewrites, before the docstring is parsed:

* ``:func:`~a.b.c``` (also ``:class:``, ``:meth:``, ``:mod:``, ``:attr:``, ``:data:``, ``:exc:``, ``:obj:``) into
  an *optional* cross-reference: a link where ``a.b.c`` is on the site, plain code otherwise (``~`` shows ``c``);
* ``:math:`x``` into ``$x$`` and a ``.. math::`` block into a ``$$ ... $$`` block (pymdownx.arithmatex);
* a ``.. code-block:: LANG`` block into a fenced code block;
* a reST simple table (columns framed by ``=====  =====`` lines) into a Markdown table;
* an argument line naming several arguments (``qkv_bias, out_bias: biases of ...``), which the Google style does
  not allow, into one entry per argument with the same description.

The sources are not changed. Used from mkdocs.yml (``extensions:`` of the python handler).
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj):`(~?)([^`<>]+?)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. (?P<name>math|code-block|code)::[ \t]*(?P<arg>\S*)[ \t]*$")


def _role(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2).strip()
    text = target.rsplit(".", 1)[-1] if short else target
    return f'<autoref identifier="{target}" optional><code>{text}</code></autoref>'


def _blocks(text: str) -> str:
    """``.. math::`` and ``.. code-block::`` directives (with their indented bodies) as Markdown blocks."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group("indent")
        j = i + 1
        body: list[str] = []
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > len(indent)):
            body.append(lines[j])
            j += 1
        while body and not body[-1].strip():
            body.pop()
        code = textwrap.dedent("\n".join(body)).strip("\n")
        if m.group("name") == "math":
            block = ["$$", code, "$$"]
        else:
            block = [f"```{m.group('arg') or 'text'}", code, "```"]
        out.extend(["", *(indent + line if line else line for line in "\n".join(block).split("\n")), ""])
        i = j
    return "\n".join(out)


_SECTION = re.compile(r"^(?P<indent>[ \t]*)(?:Args|Arguments|Parameters|Keyword Args|Other Parameters):[ \t]*$")
_SHARED = re.compile(r"^(?P<indent>[ \t]+)(?P<names>\*{0,2}\w+(?:[ \t]*,[ \t]*\*{0,2}\w+)+)(?P<type>[ \t]*\([^)]*\))?:"
                     r"(?P<rest>(?:[ \t].*)?)$")


def _split_shared_args(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    in_args, item_indent = False, None
    i = 0
    while i < len(lines):
        line = lines[i]
        section = _SECTION.match(line)
        if section:
            in_args, item_indent = True, None
            out.append(line)
            i += 1
            continue
        if in_args and line.strip() and len(line) - len(line.lstrip()) == 0:
            in_args = False
        m = _SHARED.match(line) if in_args else None
        if m and item_indent in (None, len(m.group("indent"))):
            item_indent = len(m.group("indent"))
            j = i + 1
            while j < len(lines) and lines[j].strip() and len(lines[j]) - len(lines[j].lstrip()) > item_indent:
                j += 1
            for name in re.split(r"[ \t]*,[ \t]*", m.group("names")):
                out.append(f"{m.group('indent')}{name}{m.group('type') or ''}:{m.group('rest')}")
                out.extend(lines[i + 1:j])
            i = j
            continue
        if m is None and in_args and line.strip() and item_indent is None:
            item_indent = len(line) - len(line.lstrip())
        out.append(line)
        i += 1
    return "\n".join(out)


_BORDER = re.compile(r"^(?P<indent>[ \t]*)=+(?:[ \t]+=+)+[ \t]*$")


def _simple_tables(text: str) -> str:
    """reST simple tables (a border, header rows, a border, body rows, a border) as Markdown tables. A body row
    whose first cell is empty continues the row above it."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _BORDER.match(lines[i])
        borders = [j for j in range(i, len(lines)) if lines[j] == lines[i]][:3] if m else []
        if len(borders) < 3 or any(not lines[j].strip() for j in range(borders[0], borders[2])):
            out.append(lines[i])
            i += 1
            continue
        spans = [(c.start(), c.end()) for c in re.finditer(r"=+", lines[i])]

        def cells(line: str, spans: list[tuple[int, int]] = spans) -> list[str]:
            return [line[a:(spans[k + 1][0] if k + 1 < len(spans) else len(line))].strip()
                    for k, (a, _) in enumerate(spans)]

        def rows(first: int, last: int) -> list[list[str]]:
            result: list[list[str]] = []
            for line in lines[first:last]:
                row = cells(line)
                if result and not row[0]:
                    result[-1] = [f"{a} {b}".strip() for a, b in zip(result[-1], row)]
                else:
                    result.append(row)
            return result

        header, body = rows(borders[0] + 1, borders[1]), rows(borders[1] + 1, borders[2])
        head = [" ".join(col).strip() for col in zip(*header)] if header else [""] * len(spans)
        indent = m.group("indent") if m else ""

        def cell(c: str) -> str:  # a pipe would end the cell: \vert inside formulas, escaped elsewhere
            c = _MATH_ROLE.sub(lambda f: "$" + f.group(1).replace("|", "\\vert ") + "$", c)
            return c.replace("|", "\\|")

        def fmt(row: list[str], indent: str = indent) -> str:
            return indent + "| " + " | ".join(cell(c) for c in row) + " |"

        out.extend(["", fmt(head), indent + "|" + " --- |" * len(spans), *(fmt(r) for r in body), ""])
        i = borders[2] + 1
    return "\n".join(out)


def rst_to_markdown(text: str) -> str:
    text = _simple_tables(_blocks(text))  # first: its columns are found by character positions
    text = _split_shared_args(_MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text))
    return _ROLE.sub(_role, text)


class RstToMarkdown(griffe.Extension):
    """Rewrite each docstring once, when its object is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
