"""Fixtures shared by the site tests: a fixture method with a stored result, a malicious entry, a
broken implementation, and one session-wide build of the real catalog with them (mkdocs --strict).

Entries are built in memory from a real, validated entry with ``model_copy(update=...)``, which skips
validation on purpose: the generator must make even an entry that validation would reject inert.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from catalog import results
from catalog.entries import REPO_ROOT, load_all
from catalog.schema import Code, Entry, Implementation, Paper, Reported

FIXTURE_ID = "fixture_method"
FIXTURE_TITLE = "Fixture Method With Stored Results"
FIXTURE_DEVICE = "Fixture CPU 9000"
MALICIOUS_ID = "malicious_entry"
BROKEN_ID = "broken_method"
PWNED = "window.__pwned"
FIGURE_ID = "sbnet"  # the one real decision figure drawn by the session build (a fast one)

FIXTURE_ROWS = [
    {"operating_point": "paper_point", "batch_size": 1, "macs_dense": 4_089_000_000.0,
     "macs_dynamic": 2_044_500_000.0, "mac_reduction": 2.0, "latency_ms_dense": 12.3456,
     "latency_ms_dynamic": 8.2304, "speedup": 1.5, "speedup_spread": {"p10": 1.25, "p90": 1.75, "n": 30},
     "realization": 0.75},
    {"operating_point": "paper_point", "batch_size": 8, "macs_dense": 4_089_000_000.0,
     "macs_dynamic": 1_022_250_000.0, "mac_reduction": 4.0, "latency_ms_dense": 90.5,
     "latency_ms_dynamic": 45.25, "speedup": 2.0, "realization": 0.5},
]


def real_entries() -> list[Entry]:
    entries, problems = load_all()
    assert not problems, problems
    return entries


def some_module() -> str:
    """An implementation file that exists (the fixture method borrows its docstring and source)."""
    files = sorted(p for p in (REPO_ROOT / "implementations").glob("*/*.py")
                   if p.parent.name != "common" and p.name != "__init__.py")
    assert files, "no implementation file to borrow"
    return files[0].relative_to(REPO_ROOT).as_posix()


def _base(entries: list[Entry]) -> Entry:
    return next(e for e in entries if e.taxonomy.category == "depth" and e.reported)


def _implementation(module: str) -> Implementation:
    return Implementation.model_validate({
        "status": "runs", "module": module,
        "operating_points": [{"name": "paper_point", "knobs": {}, "source": "ours: a test fixture"}]})


def fixture_entry(entries: list[Entry]) -> Entry:
    return _base(entries).model_copy(update={
        "id": FIXTURE_ID, "title": FIXTURE_TITLE, "implementation": _implementation(some_module())})


def broken_entry(entries: list[Entry]) -> Entry:
    impl = Implementation.model_construct(
        status="runs", module="implementations/depth/no_such_module_fixture.py", kernels=[],
        operating_points=_implementation(some_module()).operating_points, deviations=[])
    return _base(entries).model_copy(update={"id": BROKEN_ID, "title": "Broken Fixture",
                                             "implementation": impl})


def malicious_entry(entries: list[Entry]) -> Entry:
    base = _base(entries)
    claim = Reported.model_construct(
        claim="<script>window.__pwned=3</script> claim | with pipe", source="Table 9 | <b>bold</b>",
        dataset="D`x`", backbone="[b](javascript:alert(1))", metric="m", value="<i>1</i>", unit="%",
        interpreted_as="ops")
    return base.model_copy(update={
        "id": MALICIOUS_ID,
        "title": "</title><script>window.__pwned=1</script> Evil | Title",
        "venue": "Venue | with | pipes",
        "authors": ["<img src=x onerror=\"window.__pwned=2\">", "`code` *em* [x](javascript:alert(2))"],
        "summary": "<script>window.__pwned=4</script> [click](javascript:alert(4)) | a | b |\n# heading\n"
                   "!!! note\n<iframe src=\"javascript:alert(5)\"></iframe> {: onclick=\"alert(6)\" }",
        "paper": Paper.model_construct(arxiv=None, url="javascript:alert(7)", doi=None),
        "code": [Code.model_construct(url="javascript:alert(8)", official=True, framework="pytorch")],
        "reported": [claim],
    })


def write_fixture_result(entry: Entry, root: Path, code_hash: str | None = None) -> Path:
    """A stored result for `entry` under `root`, fresh (its code hash is the current one) by default."""
    from catalog.measure import code_hash as current_hash  # noqa: PLC0415

    env = {"device": "cpu", "device_name": FIXTURE_DEVICE, "cpu_model": FIXTURE_DEVICE, "threads": 2,
           "python": "3.11", "torch": "2.13.0", "triton": None, "cuda": None, "platform": "linux",
           "commit": "0123456789abcdef", "date": "2026-01-02T03:04:05+00:00", "dtype": "float32",
           "layout": "contiguous"}
    rows = [{**row, "config": {"knob": 1}, "operating_point_source": "ours: a test fixture",
             "environment": env} for row in FIXTURE_ROWS]
    document = results.record(entry.id, code_hash or current_hash(entry), rows)
    return results.write(document, root)


_BUILT: dict[str, Any] = {}


def build_once(tmp_root: Path) -> dict[str, Any]:
    """Build the real catalog plus the fixtures once per test session (mkdocs build --strict)."""
    if "report" in _BUILT:
        return _BUILT
    from catalog.site.build import Options, generate  # noqa: PLC0415

    entries = real_entries()
    fixture, evil = fixture_entry(entries), malicious_entry(entries)
    results_root = tmp_root / "results"  # fixture results only: the stored ones belong to other tests
    write_fixture_result(fixture, results_root)
    opts = Options(docs_dir=tmp_root / "docs", site_dir=tmp_root / "site", results_root=results_root,
                   bench=False, figures=frozenset({FIGURE_ID}), figures_cache=None)
    report = generate([*entries, fixture, evil], opts)
    _BUILT.update(report=report, entries=entries, fixture=fixture, evil=evil, site=opts.site_dir,
                  docs=opts.docs_dir)
    return _BUILT
