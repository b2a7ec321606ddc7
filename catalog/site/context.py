"""Data -> page context: pure functions from entries and result documents to what templates print.

Nothing here reads files or runs code: the generator gathers docstrings, sources, results and failures
and passes them in. Entry text stays plain ``str`` (templates escape it by default); links and
our own Markdown are ``Markup`` built with ``catalog.site.escape``.
"""

from __future__ import annotations

import posixpath
import re
from collections import Counter
from typing import Any

from markupsafe import Markup

from catalog import vocab
from catalog.site import fmt
from catalog.site.escape import fence, link, md_text, our_markdown

ORDER = list(vocab.CATEGORIES)
_TITLE_UNSAFE = re.compile(r"[^\w\s,.:;()/+'-]")


# ---------------------------------------------------------------- paths
def method_page(entry: Any) -> str:
    return f"{entry.taxonomy.category}/{entry.id}.md"


def category_page(category: str) -> str:
    return f"{category}/index.md"


def rel(from_page: str, to_page: str) -> str:
    """Relative link from one docs page to another (mkdocs checks these in strict mode)."""
    return posixpath.relpath(to_page, posixpath.dirname(from_page) or ".")


def nav_title(text: str, limit: int = 90) -> str:
    """A page title for navigation and <title>: the theme prints it unescaped, so keep only safe chars."""
    clean = " ".join(_TITLE_UNSAFE.sub("", text.replace("&", "and")).split())
    return clean if len(clean) <= limit else clean[: limit - 3].rstrip() + "..."


def tags(entry: Any) -> list[str]:
    """Site tags: granularity, decision, training and the list's tags (vocabulary words only)."""
    tax = entry.taxonomy
    out = []
    if tax.granularity in vocab.GRANULARITIES:
        out.append(f"granularity/{tax.granularity}")
    if tax.decision in vocab.DECISIONS:
        out.append(f"decision/{tax.decision}")
    out += [f"training/{t}" for t in tax.training if t in vocab.TRAININGS]
    out += [t for t in tax.tags if t in vocab.TAGS]
    return out


# ---------------------------------------------------------------- results
def device_label(env: dict[str, Any]) -> str:
    device, name = env.get("device") or "?", env.get("device_name")
    return f"{device} ({name})" if name else str(device)


def speedup_range(spread: Any) -> str:
    """``'1.20x-1.60x'``: p10-p90 of the per-round speedups (``measure``'s ``speedup_spread``), or '-'."""
    if not isinstance(spread, dict) or "p10" not in spread or "p90" not in spread:
        return fmt.MISSING
    return f"{fmt.ratio(spread['p10'])}-{fmt.ratio(spread['p90'])}"


def result_context(doc: dict[str, Any], current_hash: str | None) -> dict[str, Any]:
    """One stored result document (one device, one bench run) ready for a table."""
    env = doc.get("environment") or {}
    rows = []
    for m in doc.get("measurements") or []:
        config = m.get("config") or {}
        rows.append({
            "point": m.get("operating_point") or "-",
            "point_source": m.get("operating_point_source") or "",
            "config": ", ".join(f"{k}={v}" for k, v in config.items()) if isinstance(config, dict) else "",
            "batch": m.get("batch_size"),
            "macs_dense": fmt.macs(m.get("macs_dense")),
            "macs_dynamic": fmt.macs(m.get("macs_dynamic")),
            "reduction": fmt.ratio(m.get("mac_reduction")),
            "latency_dense": fmt.ms(m.get("latency_ms_dense")),
            "latency_dynamic": fmt.ms(m.get("latency_ms_dynamic")),
            "speedup": fmt.ratio(m.get("speedup")),
            "speedup_range": speedup_range(m.get("speedup_spread")),
            "realization": fmt.plain(m.get("realization")),
            "params_dense": fmt.count(m.get("params_dense")),
            "params_dynamic": fmt.count(m.get("params_dynamic")),
            "dtype": m.get("dtype") or "",
        })
    stored = doc.get("code_hash")
    return {
        "device": device_label(env),
        "date": env.get("date") or "unknown date",
        "commit": str(env.get("commit") or "unknown")[:12],
        "torch": env.get("torch") or "?",
        "threads": env.get("threads"),
        "cpu_model": env.get("cpu_model") or "",
        "path": doc.get("_path") or "",
        "code_hash": stored or "none",
        "current_hash": current_hash or "",
        "stale": current_hash is not None and stored != current_hash,
        "rows": rows,
    }


def headline(docs: list[dict[str, Any]]) -> str:
    """Measured speedup per device at the first operating point and smallest batch, or '-'."""
    parts = []
    for doc in docs:
        rows = doc.get("measurements") or []
        if not rows:
            continue
        first_point = rows[0].get("operating_point")
        same = [r for r in rows if r.get("operating_point") == first_point] or rows
        best = min(same, key=lambda r: r.get("batch_size") or 0)
        env = doc.get("environment") or {}
        device = env.get("device") or "?"
        parts.append(f"{fmt.ratio(best.get('speedup'))} ({device}, batch {best.get('batch_size')})")
    return "; ".join(parts) or fmt.MISSING


def chart_points(entries: list[Any], docs_by_id: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """Every stored measurement as a point: MAC reduction (x) against measured speedup (y)."""
    points = []
    for entry in entries:
        for doc in docs_by_id.get(entry.id, []):
            env = doc.get("environment") or {}
            for m in doc.get("measurements") or []:
                x, y = m.get("mac_reduction"), m.get("speedup")
                if not all(isinstance(v, (int, float)) and v > 0 for v in (x, y)):
                    continue
                points.append({
                    "id": entry.id, "page": method_page(entry), "device": env.get("device") or "?",
                    "device_label": device_label(env), "batch": m.get("batch_size"),
                    "point": m.get("operating_point") or "-", "mac_reduction": float(x), "speedup": float(y),
                    "realization": m.get("realization"),
                })
    return points


# ---------------------------------------------------------------- method page
def _word(words: dict[str, str], word: str) -> dict[str, str]:
    return {"word": word, "meaning": words.get(word, "")}


def _paper_links(entry: Any) -> list[Markup]:
    paper = entry.paper
    links = []
    if paper.url:
        links.append(link("paper", paper.url))
    if paper.arxiv:
        links.append(link(f"arXiv {paper.arxiv}", f"https://arxiv.org/abs/{paper.arxiv}"))
    if paper.doi:
        links.append(link(f"DOI {paper.doi}", f"https://doi.org/{paper.doi}"))
    return links


def method_context(entry: Any, docs: list[dict[str, Any]], *, current_hash: str | None = None,
                   failure: str | None = None, docstring: str | None = None, source: str | None = None,
                   bibtex: str = "", latency_plots: list[str | None] | None = None,
                   decision_plot: tuple[str, str] | None = None) -> dict[str, Any]:
    """Everything a method page shows; `docs` are the entry's stored result documents."""
    tax, impl = entry.taxonomy, entry.implementation
    page = method_page(entry)
    implemented = impl.status != "planned"
    return {
        "id": entry.id,
        "title": entry.title,
        "nav_title": nav_title(entry.title),
        "tags": tags(entry),
        "authors": ", ".join(entry.authors),
        "year": entry.year,
        "venue": entry.venue,
        "category": link_internal(vocab.CATEGORIES.get(tax.category, tax.category), "index.md"),
        "subcategory": tax.subcategory,
        "also_in": [link_internal(vocab.CATEGORIES[c], rel(page, category_page(c)))
                    for c in tax.also_in if c in vocab.CATEGORIES],
        "granularity": _word(vocab.GRANULARITIES, tax.granularity),
        "decision": _word(vocab.DECISIONS, tax.decision),
        "training": [_word(vocab.TRAININGS, t) for t in tax.training],
        "list_tags": [_word(vocab.TAGS, t) for t in tax.tags],
        "paper_links": _paper_links(entry),
        "code": [{"link": link(c.url.split("://", 1)[-1], c.url), "official": c.official,
                  "framework": c.framework} for c in entry.code],
        "summary": entry.summary,
        "speedup_claim": {**_word(vocab.SPEEDUP_CLAIMS, entry.real_speedup_reported.status),
                          "note": entry.real_speedup_reported.note},
        "reported": [{
            "claim": r.claim, "source": r.source, "dataset": r.dataset or "-", "backbone": r.backbone or "-",
            "metric": r.metric, "value": f"{r.value} {r.unit}", "interpreted_as": r.interpreted_as,
        } for r in entry.reported],
        "corrections": [{"field": c.field, "listed": c.listed, "corrected": c.corrected,
                         "source": link(c.source.split("://", 1)[-1], c.source)} for c in entry.corrections],
        "verification": {
            "confidence": entry.verification.confidence,
            "sources": [link(s.split("://", 1)[-1], s) for s in entry.verification.sources],
            "unconfirmed": list(entry.verification.unconfirmed),
        },
        "status": _word(vocab.IMPLEMENTATION_STATUSES, impl.status),
        "implemented": implemented,
        "module": impl.module,
        "kernels": list(impl.kernels),
        "operating_points": [{"name": p.name, "source": p.source,
                              "knobs": ", ".join(f"{k}={v}" for k, v in p.knobs.items())}
                             for p in impl.operating_points],
        "deviations": list(impl.deviations),
        "run_command": fence(f"python -m catalog run {entry.id}", "bash") if implemented else None,
        "how_it_works": our_markdown(docstring) if docstring else None,
        "source": fence(source, "python") if source is not None else None,
        "results": [{**result_context(d, current_hash), "plot": Markup(plot) if plot else None}
                    for d, plot in zip(docs, latency_plots or [None] * len(docs), strict=True)],
        "decision_plot": {"href": Markup(decision_plot[0]), "caption": md_text(decision_plot[1])}
        if decision_plot else None,
        "failure": fence(failure, "text") if failure else None,
        "bibtex": fence(bibtex, "bibtex"),
    }


# ---------------------------------------------------------------- tables, category and home pages
def table_row(entry: Any, docs: list[dict[str, Any]], from_page: str,
              failing: bool = False) -> dict[str, Any]:
    """One row of a category (or all-methods) table; a failing method says so in its status."""
    tax = entry.taxonomy
    return {
        "method": link_internal(entry.title, rel(from_page, method_page(entry))),
        "id": entry.id, "year": entry.year, "venue": entry.venue,
        "category": tax.category,
        "granularity": tax.granularity, "decision": tax.decision, "training": ", ".join(tax.training),
        "speedup_reported": entry.real_speedup_reported.status,
        "speedup_measured": headline(docs),
        "status": entry.implementation.status + (" (failing)" if failing else ""),
    }


def link_internal(text: str, href: str) -> Markup:
    """A link to another docs page (href is ours: a relative .md path)."""
    return Markup(f"[{md_text(text)}]({href})")


def _sorted(entries: list[Any]) -> list[Any]:
    return sorted(entries, key=lambda e: (e.year, e.id))


def facets(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, list[str]]:
    """The distinct values of each facet column (training is a comma-separated list)."""
    out: dict[str, list[str]] = {}
    for col in columns:
        values: set[str] = set()
        for row in rows:
            values.update(v.strip() for v in str(row[col]).split(",") if v.strip())
        out[col] = sorted(values)
    return out


FACETS = ["granularity", "decision", "training", "status"]


def category_context(category: str, entries: list[Any], docs_by_id: dict[str, list[dict]],
                     failing: frozenset[str] = frozenset()) -> dict[str, Any]:
    page = category_page(category)
    primary = _sorted([e for e in entries if e.taxonomy.category == category])
    secondary = _sorted([e for e in entries if category in e.taxonomy.also_in])
    rows = [table_row(e, docs_by_id.get(e.id, []), page, e.id in failing) for e in primary + secondary]
    for row, entry in zip(rows, primary + secondary, strict=True):
        row["also"] = entry.taxonomy.category != category
    return {
        "category": category, "label": vocab.CATEGORIES[category],
        "subcategories": list(vocab.SUBCATEGORIES.get(category, ())),
        "rows": rows, "facets": facets(rows, FACETS), "table_id": f"table-{category}",
        "n_primary": len(primary), "n_secondary": len(secondary),
    }


def all_methods_context(entries: list[Any], docs_by_id: dict[str, list[dict]],
                        failing: frozenset[str] = frozenset()) -> dict[str, Any]:
    page = "all-methods.md"
    ordered = sorted(entries, key=lambda e: (ORDER.index(e.taxonomy.category), e.year, e.id))
    rows = [table_row(e, docs_by_id.get(e.id, []), page, e.id in failing) for e in ordered]
    for row in rows:
        row["also"] = False
    return {"rows": rows, "facets": facets(rows, ["category", *FACETS]), "table_id": "table-all"}


def coverage(entries: list[Any]) -> dict[str, Any]:
    """Counts by category (entries, implemented) and by implementation status."""
    by_cat = []
    for cat in ORDER:
        members = [e for e in entries if e.taxonomy.category == cat]
        by_cat.append({
            "category": cat, "link": link_internal(vocab.CATEGORIES[cat], category_page(cat)),
            "entries": len(members),
            "also": sum(cat in e.taxonomy.also_in for e in entries),
            "implemented": sum(e.implementation.status != "planned" for e in members),
        })
    statuses = Counter(e.implementation.status for e in entries)
    return {
        "total": len(entries),
        "by_category": by_cat,
        "by_status": [{"status": s, "meaning": m, "count": statuses.get(s, 0)}
                      for s, m in vocab.IMPLEMENTATION_STATUSES.items()],
        "speedup_claims": [{"status": s, "meaning": m,
                            "count": sum(e.real_speedup_reported.status == s for e in entries)}
                           for s, m in vocab.SPEEDUP_CLAIMS.items()],
    }


def home_context(entries: list[Any], docs_by_id: dict[str, list[dict]], chart: str | None,
                 failing: frozenset[str] = frozenset()) -> dict[str, Any]:
    points = chart_points(entries, docs_by_id)
    return {
        "failing": [link_internal(e.title, method_page(e)) for e in entries if e.id in failing],
        "coverage": coverage(entries),
        "chart": Markup(chart) if chart else None,
        "points": [{**p, "link": link_internal(p["id"], p["page"]),
                    "x": fmt.ratio(p["mac_reduction"]), "y": fmt.ratio(p["speedup"]),
                    "realization": fmt.plain(p["realization"])} for p in points],
    }
