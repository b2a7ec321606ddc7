"""The site generator: pages per entry, category and kernel; stored numbers on method pages; reported
claims with sources; escaping of hostile entry text; failures shown and reported; mkdocs --strict."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import markdown
import pytest
from _site_build import (
    BROKEN_ID,
    FIGURE_ID,
    FIXTURE_DEVICE,
    FIXTURE_ID,
    FIXTURE_ROWS,
    MALICIOUS_ID,
    broken_entry,
    build_once,
    fixture_entry,
    malicious_entry,
    real_entries,
    write_fixture_result,
)

from catalog import vocab
from catalog.site import context, escape, fmt, kernels, refresh
from catalog.site.build import Options, generate

MD_EXTENSIONS = ["tables", "admonition", "md_in_html", "pymdownx.superfences"]


@pytest.fixture(scope="module")
def entries():
    return real_entries()


def _generate(tmp_path: Path, entries, **kw) -> tuple[Path, object]:
    opts = Options(docs_dir=tmp_path / "docs", site_dir=tmp_path / "site",
                   results_root=kw.pop("results_root", tmp_path / "results"), mkdocs=kw.pop("mkdocs", False),
                   bench=kw.pop("bench", False), **kw)
    return opts.docs_dir, generate(entries, opts)


def _plain(html_text: str) -> str:
    """The text a reader sees: tags dropped, character references decoded."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", html_text)).split())


def _html(md_text: str) -> str:
    body = re.sub(r"\A---\n.*?\n---\n", "", md_text, flags=re.S)  # front matter
    return markdown.markdown(body, extensions=MD_EXTENSIONS)


# ---------------------------------------------------------------- escaping (pure)
def test_md_text_makes_markdown_and_html_inert():
    out = escape.md_text("<script>x</script> | `c` [a](javascript:b) *e* _u_ # h {: .c}")
    bare = re.sub(r"&#\d+;", "", out)
    for raw in ("<", ">", "|", "`", "[", "]", "*", "_", "#", "{", "&"):
        assert raw not in bare
    html = markdown.markdown(f"| a |\n|---|\n| {out} |", extensions=MD_EXTENSIONS)
    assert "<script" not in html and "href" not in html and html.count("<td>") == 1
    assert escape.md_text("- item").startswith("&#45;") and escape.md_text("1. x").startswith("1&#46;")


@pytest.mark.parametrize("url", ["javascript:alert(1)", "data:text/html,x", "http://a b", "ftp://x.org/",
                                 "//x.org", 'https://x.org/"onmouseover', "https://x.org/<script>", 42, None])
def test_safe_url_rejects_non_http(url):
    assert escape.safe_url(url) is None
    assert "](" not in escape.link("text", url)


def test_safe_url_keeps_http_and_encodes_markdown_specials():
    assert escape.safe_url("https://arxiv.org/abs/1711.11503") == "https://arxiv.org/abs/1711.11503"
    assert escape.safe_url("https://x.org/a_(b)|c") == "https://x.org/a_%28b%29%7Cc"


def test_fence_is_longer_than_any_backtick_run_inside():
    block = escape.fence("a ```` b", "python")
    assert block.startswith("`````python\n") and block.endswith("\n`````")


def test_our_markdown_demotes_headings_outside_fences_and_opens_lists():
    text = "# T\n\nPaths:\n- a\n  - b\n\n```\n# not a heading\n```"
    out = escape.our_markdown(text)
    assert "### T" in out and "\n# not a heading\n" in out
    assert "Paths:\n\n- a\n    - b" in out


def test_number_formats():
    assert fmt.macs(4_089_000_000) == "4.089 G" and fmt.macs(312_500) == "312.500 K" and fmt.macs(None) == "-"
    assert fmt.ratio(1.5) == "1.50x" and fmt.ratio(float("inf")) == "inf" and fmt.ratio("x") == "-"
    assert fmt.ms(12.3456) == "12.346" and fmt.plain(0.75) == "0.75"


# ---------------------------------------------------------------- stale detection (pure)
def test_needs_bench_on_missing_or_stale_cpu_results(entries):
    fixture = fixture_entry(entries)
    cpu = {"environment": {"device": "cpu"}, "code_hash": "abc"}
    gpu = {"environment": {"device": "cuda"}, "code_hash": "old"}
    assert refresh.needs_bench(fixture, [], "abc")
    assert not refresh.needs_bench(fixture, [cpu, gpu], "abc")
    assert refresh.needs_bench(fixture, [cpu], "new")
    assert refresh.needs_bench(fixture, [gpu], "old")  # no CPU result yet
    planned = next(e for e in entries if e.implementation.status == "planned")
    assert not refresh.needs_bench(planned, [], None)


# ---------------------------------------------------------------- pages
def test_a_page_per_entry_category_and_kernel(tmp_path, entries):
    docs, report = _generate(tmp_path, entries)
    assert report.ok, report.failures
    for entry in entries:
        assert (docs / context.method_page(entry)).is_file(), entry.id
    for category in vocab.CATEGORIES:
        text = (docs / context.category_page(category)).read_text()
        primary = [e for e in entries if e.taxonomy.category == category]
        assert all(f"]({e.id}.md)" in text for e in primary), category
    for kernel in kernels.KERNELS:
        text = (docs / kernels.kernel_page(kernel)).read_text()
        assert "Not measured yet on cpu" in text and "Not measured yet on cuda" in text
    for page in ("index.md", "all-methods.md", "methodology.md", "contributing.md", "tags.md",
                 "kernels/index.md"):
        assert (docs / page).is_file(), page
    assert (docs / "plots" / "home.svg").read_text().lstrip().startswith("<?xml")
    assert "FLOPs = 2 x MACs" in (docs / "methodology.md").read_text()
    assert "Add an implementation" in (docs / "contributing.md").read_text()


def test_method_page_numbers_equal_the_stored_result(tmp_path, entries):
    fixture = fixture_entry(entries)
    results_root = tmp_path / "results"
    stored = write_fixture_result(fixture, results_root)
    docs, report = _generate(tmp_path, [*entries, fixture], results_root=results_root)
    assert report.ok, report.failures
    text = (docs / context.method_page(fixture)).read_text()
    document = json.loads(stored.read_text())
    html = _html(text)
    shown = _plain(html)
    assert f"Device: cpu ({FIXTURE_DEVICE}); measured 2026-01-02T03:04:05+00:00; commit 0123456789ab" in shown
    assert "Stale" not in text and "python -m catalog run fixture_method\n" in text
    for row in document["measurements"]:
        cells = [f"{row['batch_size']}", fmt.macs(row["macs_dense"]), fmt.macs(row["macs_dynamic"]),
                 fmt.ratio(row["mac_reduction"]), fmt.ms(row["latency_ms_dense"]),
                 fmt.ms(row["latency_ms_dynamic"]),
                 fmt.ratio(row["speedup"]), context.speedup_range(row.get("speedup_spread")),
                 fmt.plain(row["realization"])]
        assert re.search(r"<tr>\s*<td><code>paper&#95;point</code></td>\s*" +
                         r"\s*".join(f"<td>{re.escape(c) if c != '-' else '&#45;'}</td>" for c in cells), html), cells
    assert fmt.macs(FIXTURE_ROWS[0]["macs_dense"]) == "4.089 G" and "12.346" in html
    assert "<td>1.25x-1.75x</td>" in html and "<td>&#45;</td>" in html  # the second row has no paired spread
    home = _plain(_html((docs / "index.md").read_text()))
    assert f"{FIXTURE_ID} cpu ({FIXTURE_DEVICE}) 1 paper_point 2.00x 1.50x 0.75" in home  # the chart's table
    assert "1.50x (cpu, batch 1)" in _plain(_html((docs / "depth" / "index.md").read_text()))


def test_refresh_benches_missing_or_stale_results_only(tmp_path, entries):
    fixture = fixture_entry(entries)
    planned = next(e for e in entries if e.implementation.status == "planned")
    calls = []

    def runner(entry, root):
        calls.append(entry.id)
        return write_fixture_result(entry, root)

    results_root = tmp_path / "results"
    write_fixture_result(fixture, results_root, code_hash="0000000000000000")  # stale
    docs, report = _generate(tmp_path / "first", [fixture, planned], results_root=results_root, bench=True,
                             runner=runner)
    assert calls == [FIXTURE_ID] and report.ok
    text = (docs / context.method_page(fixture)).read_text()
    assert FIXTURE_DEVICE in _plain(_html(text)) and "Stale" not in text
    _generate(tmp_path / "second", [fixture, planned], results_root=results_root, bench=True, runner=runner)
    assert calls == [FIXTURE_ID]  # now fresh: not measured again


def test_stale_result_is_marked(tmp_path, entries):
    fixture = fixture_entry(entries)
    write_fixture_result(fixture, tmp_path / "results", code_hash="0000000000000000")
    docs, _ = _generate(tmp_path, [fixture])
    assert '!!! warning "Stale"' in (docs / context.method_page(fixture)).read_text()


def test_reported_claims_carry_their_sources(tmp_path, entries):
    docs, _ = _generate(tmp_path, entries)
    with_claims = [e for e in entries if e.reported]
    assert with_claims
    for entry in with_claims:
        text = (docs / context.method_page(entry)).read_text()
        assert "## Reported by the paper" in text and "reported by the paper, not measured here" in text
        rows = [line for line in text.splitlines() if line.startswith("| ") and line.endswith(" |")]
        for claim in entry.reported:
            row = next(r for r in rows if r.startswith(f"| {escape.md_text(claim.claim)} |"))
            assert row.endswith(f"| {escape.md_text(claim.source)} |"), (entry.id, row)


def test_malicious_entry_renders_inert(tmp_path, entries):
    evil = malicious_entry(entries)
    docs, report = _generate(tmp_path, [evil])
    text = (docs / context.method_page(evil)).read_text()
    html = _html(text)
    assert "<script" not in html and "<img" not in html and "<iframe" not in html and "onclick=" not in html
    assert "javascript:" not in " ".join(re.findall(r'href="([^"]*)"', html))
    assert "link removed: not an http(s) URL" in html
    assert "</title><script>window.__pwned=1</script> Evil | Title" in _plain(html)  # shown, as text
    claims = next(t for t in re.findall(r"<table>.*?</table>", html, re.S) if "Interpreted as" in t)
    assert [len(re.findall(r"<t[dh]>", r)) for r in re.findall(r"<tr>.*?</tr>", claims, re.S)] == [7, 7]
    front = text.split("---", 2)[1]
    assert "<" not in front and ">" not in front and "|" not in front
    assert not report.failures


def test_output_folders_holding_sources_are_refused(tmp_path, entries):
    from catalog.site.build import REPO_ROOT, SITE_SRC

    for docs_dir, site_dir in ((SITE_SRC, tmp_path / "site"), (tmp_path / "docs", SITE_SRC),
                               (tmp_path / "docs", REPO_ROOT)):
        with pytest.raises(ValueError, match="refusing"):
            generate(entries[:1], Options(docs_dir=docs_dir, site_dir=site_dir, bench=False))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not written by the generator"):
        generate(entries[:1], Options(docs_dir=tmp_path / "mine", mkdocs=False, bench=False))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_invalid_id_is_refused(tmp_path, entries):
    bad = entries[0].model_copy(update={"id": "../../escape"})
    docs, report = _generate(tmp_path, [bad, entries[1]])
    assert "../../escape" in report.failures and (docs / context.method_page(entries[1])).is_file()
    assert not (tmp_path / "escape.md").exists()


def test_failing_implementation_is_shown_and_the_command_exits_non_zero(tmp_path, entries, monkeypatch,
                                                                        capsys):
    from catalog import cli
    from catalog.site import cli as site_cli

    planned = next(e for e in entries if e.implementation.status == "planned")
    broken = broken_entry(entries)
    monkeypatch.setattr(site_cli, "_load", lambda: [planned, broken])
    code = cli.main(["site", "--docs-dir", str(tmp_path / "docs"), "--site-dir", str(tmp_path / "site"),
                     "--results-dir", str(tmp_path / "results")])
    assert code == 1
    err = capsys.readouterr().err
    assert BROKEN_ID in err and "cannot import" in err
    page = (tmp_path / "docs" / context.method_page(broken)).read_text()
    failure = page.split('!!! failure "Failing', 1)[1].split("## Summary", 1)[0]
    assert "Broken Fixture" in (tmp_path / "docs" / "index.md").read_text().split("## Coverage")[0]
    assert "runs &#40;failing&#41;" in (tmp_path / "docs" / "all-methods.md").read_text()
    assert "ImplementationError" in failure
    assert "cannot import implementations.depth.no_such_module_fixture" in failure
    assert (tmp_path / "site" / planned.taxonomy.category / planned.id / "index.html").is_file()
    assert (tmp_path / "site" / "index.html").is_file()


def test_kernel_device_variants_count_as_measured():
    kernel = kernels.KERNELS[0]
    plot = kernels.plot_context("cuda-float16", {"environment": {"device_name": "GPU"}}, "x.svg", None)
    assert kernels.kernel_context(kernel, None, [], [plot])["missing"] == ["cpu"]


def test_kernel_plots_from_results_and_plot_failures(tmp_path, entries):
    results_root = tmp_path / "results"
    (results_root / "kernels").mkdir(parents=True)
    env = {"device_name": "Fixture GPU", "date": "2026-02-03", "commit": "fedcba9876543210"}
    (results_root / "kernels" / "conv-cuda.json").write_text(json.dumps({"environment": env, "rows": []}))
    (results_root / "kernels" / "routing-cpu.json").write_text(json.dumps({"rows": []}))
    calls = []

    def plotter(bench):
        def plot(json_path, svg_path):
            calls.append(Path(json_path).name)
            if bench == "routing":
                raise ValueError("no rows to plot")
            Path(svg_path).write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
        return plot

    docs, report = _generate(tmp_path, entries[:3], results_root=results_root, plotter=plotter)
    assert sorted(calls) == ["conv-cuda.json", "routing-cpu.json"]
    sparse = (docs / "kernels" / "sparse_conv2d.md").read_text()
    assert "](../plots/kernels/conv-cuda.svg)" in sparse and "Fixture GPU" in sparse
    assert "Not measured yet on cpu" in sparse and "Not measured yet on cuda" not in sparse
    routed = (docs / "kernels" / "routed_linear.md").read_text()
    assert "could not be drawn" in routed and "no rows to plot" in routed
    assert list(report.failures) == ["kernels/routing-cpu.json"]


# ---------------------------------------------------------------- the real build (mkdocs --strict)
@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return build_once(tmp_path_factory.mktemp("site"))


def test_mkdocs_strict_build_of_the_real_catalog(built):
    assert built["report"].ok, built["report"].failures
    site: Path = built["site"]
    for entry in built["entries"]:
        assert (site / entry.taxonomy.category / entry.id / "index.html").is_file(), entry.id
    index = json.loads((site / "search" / "search_index.json").read_text())
    assert any(FIXTURE_ID in doc["location"] for doc in index["docs"])
    evil_html = (site / built["evil"].taxonomy.category / MALICIOUS_ID / "index.html").read_text()
    assert "__pwned" in evil_html and not re.search(r"<script>\s*window\.__pwned", evil_html)
    title = re.search(r"<title>(.*?)</title>", evil_html, re.S).group(1)
    assert "<" not in title and ">" not in title
    assert "granularity/layer" in (site / "tags" / "index.html").read_text()


def test_decision_figure_is_drawn_into_the_method_page(built):
    entry = next(e for e in built["entries"] if e.id == FIGURE_ID)
    page = (built["site"] / entry.taxonomy.category / entry.id / "index.html").read_text()
    assert "Decisions on a real image" in page and f"{FIGURE_ID}-decisions.png" in page
    png = built["site"] / "plots" / "methods" / f"{FIGURE_ID}-decisions.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_decision_figures_are_cached_by_code_hash_and_failures_shown(tmp_path, entries, monkeypatch):
    from types import SimpleNamespace

    from catalog import measure
    from catalog.site.plots import _pyplot

    entry = next(e for e in entries if e.id == FIGURE_ID)
    calls = []

    def draw():
        """A square."""
        calls.append(1)
        fig, ax = _pyplot().subplots(figsize=(1, 1))
        ax.imshow([[0, 1], [1, 0]])
        return fig

    monkeypatch.setattr(measure, "load_module", lambda e: SimpleNamespace(decision_figure=draw))
    cache = tmp_path / "cache"
    for run in ("first", "second"):
        docs, report = _generate(tmp_path / run, [entry], figures=True, figures_cache=cache)
        assert report.ok, report.failures
        assert "A square." in (docs / context.method_page(entry)).read_text()
        assert (docs / "plots" / "methods" / f"{FIGURE_ID}-decisions.png").is_file()
    assert len(calls) == 1 and len(list(cache.glob(f"{FIGURE_ID}-*.png"))) == 1

    def broken():
        raise RuntimeError("no photo today")

    monkeypatch.setattr(measure, "load_module", lambda e: SimpleNamespace(decision_figure=broken))
    docs, report = _generate(tmp_path / "broken", [entry], figures=True, figures_cache=None)
    assert "cannot draw the decision figure" in report.failures[FIGURE_ID]
    page = (docs / context.method_page(entry)).read_text()
    assert "no photo today" in page and "Decisions on a real image" not in page
