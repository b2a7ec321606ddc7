"""BibTeX generated from entry fields; the key is the entry id (unique and stable)."""

from __future__ import annotations

import re

from catalog.schema import Entry

_JOURNALS = ("TPAMI", "TIP", "IJCV", "Pattern Recognition", "Journal", "Transactions", "JSTSP")
_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}
_SPECIAL_RE = re.compile("|".join(re.escape(c) for c in _LATEX_SPECIAL))


def latex_escape(text: str) -> str:
    """Escape characters that are special in BibTeX/LaTeX field values."""
    return _SPECIAL_RE.sub(lambda m: _LATEX_SPECIAL[m.group(0)], " ".join(text.split()))


def entry_type(venue: str) -> str:
    """Pick the BibTeX type from the venue string (pure function)."""
    lowered = venue.lower()
    if lowered.startswith("arxiv"):
        return "misc"
    if "thesis" in lowered:
        return "mastersthesis" if "msc" in lowered or "master" in lowered else "phdthesis"
    if any(j.lower() in lowered for j in _JOURNALS):
        return "article"
    return "inproceedings"


def _venue_name(venue: str) -> str:
    """The venue without its year and parenthetical remarks: 'CVPR 2018 (oral)' -> 'CVPR'."""
    name = re.sub(r"\(.*?\)", "", venue)
    name = re.sub(r"\b(19|20)\d{2}\b", "", name)
    return " ".join(name.split()) or venue


def to_bibtex(entry: Entry) -> str:
    """One BibTeX record for the entry."""
    kind = entry_type(entry.venue)
    fields: list[tuple[str, str]] = [
        ("title", "{" + latex_escape(entry.title) + "}"),
        ("author", " and ".join(latex_escape(a) for a in entry.authors)),
        ("year", str(entry.year)),
    ]
    venue = latex_escape(_venue_name(entry.venue))
    if kind == "inproceedings":
        fields.append(("booktitle", venue))
    elif kind == "article":
        fields.append(("journal", venue))
    elif kind.endswith("thesis"):
        fields.append(("school", latex_escape(entry.venue)))
    if entry.paper.arxiv:
        fields += [("eprint", entry.paper.arxiv), ("archivePrefix", "arXiv")]
    if entry.paper.doi:
        fields.append(("doi", latex_escape(entry.paper.doi)))
    fields.append(("url", entry.paper.link))
    body = ",\n".join(f"  {name} = {{{value}}}" for name, value in fields)
    return f"@{kind}{{{entry.id},\n{body}\n}}\n"


def bibliography(entries: list[Entry]) -> str:
    return "\n".join(to_bibtex(e) for e in entries)
