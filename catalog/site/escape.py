"""Escaping for generated Markdown: entry text is inert, links are http(s) only.

Entry text (titles, summaries, claims, ...) is untrusted: the schema already rejects HTML and script
URLs, and everything is escaped again here at render time. ``md_text`` turns every character that
Markdown, its extensions or HTML could interpret into a numeric character reference, so the text
renders literally wherever it is placed (paragraph, table cell, link text, HTML attribute).
Our own Markdown (module docstrings, templates) is marked safe with ``Markup`` and left alone.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from markupsafe import Markup

from catalog.schema import URL_RE

# Markdown syntax (emphasis, code, links, tables, attr lists, admonitions, abbreviations, extensions'
# inline syntax) plus HTML's own specials; numeric references are valid in Markdown and in HTML.
_SPECIAL = set("\\`*_{}[]()<>&|#!~^=:\"'$")
_LEADING = set("-+")
_ORDERED_RE = re.compile(r"^(\d+)([.)])(?=\s|$)")


def md_text(value: Any) -> Markup:
    """One line of inert text: whitespace collapsed, every Markdown/HTML special as ``&#N;``."""
    text = " ".join(str(value).split())
    out = "".join(f"&#{ord(c)};" if c in _SPECIAL else c for c in text)
    if out[:1] in _LEADING:  # a line starting with '-' or '+' would become a list item
        out = f"&#{ord(out[0])};{out[1:]}"
    out = _ORDERED_RE.sub(lambda m: f"{m.group(1)}&#{ord(m.group(2))};", out)  # '1.' ordered list
    return Markup(out)


def finalize(value: Any) -> Any:
    """Jinja2 ``finalize`` hook: escape by default, pass ``Markup`` (our own Markdown) through."""
    if value is None:
        return ""
    if isinstance(value, Markup):
        return value
    if isinstance(value, bool):
        return md_text("yes" if value else "no")
    if isinstance(value, (int, float)):
        return md_text(value)
    return md_text(value)


def safe_url(url: Any) -> str | None:
    """The URL if it is http(s) without spaces or quotes (checked again at render time), else None.

    Characters that Markdown could read as the end of a link or a table cell are percent-encoded.
    """
    if not isinstance(url, str) or not URL_RE.match(url):
        return None
    return quote(url, safe="/:?#@!$&+,;=%-._~")


def link(text: Any, url: Any) -> Markup:
    """A Markdown link with escaped text, or the text alone with a note when the URL is not safe."""
    target = safe_url(url)
    if target is None:
        return Markup(f"{md_text(text)} (link removed: not an http(s) URL)")
    return Markup(f"[{md_text(text)}]({target})")


def fence(code: str, lang: str = "") -> Markup:
    """A fenced code block whose fence is longer than any backtick run inside ``code``."""
    longest = max((len(m) for m in re.findall(r"`+", code)), default=0)
    marks = "`" * max(3, longest + 1)
    body = code if code.endswith("\n") else code + "\n"
    return Markup(f"{marks}{lang}\n{body}{marks}")


_FENCE_RE = re.compile(r"^\s*(`{3,}|~{3,})")
_LIST_RE = re.compile(r"^\s*([-*+]|\d+[.)])\s")


def our_markdown(text: str, shift: int = 2) -> Markup:
    """Our own Markdown (a module docstring), normalized for Python-Markdown and marked safe.

    Outside code fences: headings move down ``shift`` levels (the page has its own title), nested
    list indentation is doubled (Python-Markdown wants 4 spaces where CommonMark takes 2) and a blank
    line is put before a list that directly follows a paragraph line.
    """
    lines: list[str] = []
    fence_mark: str | None = None
    previous = ""
    for line in text.splitlines():
        match = _FENCE_RE.match(line)
        if fence_mark is not None:
            if match and match.group(1)[0] == fence_mark[0] and len(match.group(1)) >= len(fence_mark):
                fence_mark = None
            lines.append(line)
            previous = ""
            continue
        if match:
            fence_mark = match.group(1)
            lines.append(line)
            continue
        if line.startswith("#"):
            line = "#" * shift + line
        stripped = line.lstrip(" ")
        indent = len(line) - len(stripped)
        if indent and stripped:
            line = " " * (2 * indent) + stripped
        if _LIST_RE.match(line) and previous.strip() and not _LIST_RE.match(previous) and indent == 0 \
                and not previous.startswith((" ", "#")):
            lines.append("")
        lines.append(line)
        previous = line
    return Markup("\n".join(lines).strip("\n") + "\n")
