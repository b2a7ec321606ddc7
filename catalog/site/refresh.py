"""Refreshing results before a build: re-run ``catalog bench`` (CPU) where results are missing or stale.

A result is stale when its stored ``code_hash`` differs from ``catalog.measure.code_hash(entry)`` (the
implementation file or the shared code changed since it was measured). Failures are collected, never
hidden: the generator shows them on the method's page and the command exits non-zero.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

BenchRunner = Callable[[Any, Path], Path]


def needs_bench(entry: Any, docs: list[dict[str, Any]], current_hash: str | None,
                device: str = "cpu") -> bool:
    """Implemented, and no result on `device` or one whose code hash differs from the current code."""
    if entry.implementation.status == "planned":
        return False
    on_device = [d for d in docs if (d.get("environment") or {}).get("device") == device]
    return not on_device or any(d.get("code_hash") != current_hash for d in on_device)


def bench_defaults() -> dict[str, Any]:
    """`catalog bench`'s own defaults (batch sizes, seed, timing), read from its parser."""
    from catalog.cli import build_parser  # noqa: PLC0415

    args = build_parser().parse_args(["bench", "placeholder"])
    return {"batch_sizes": list(args.batch_sizes), "seed": args.seed, "min_time": args.min_time}


def bench_entry(entry: Any, results_root: Path, device: str = "cpu",
                settings: dict[str, Any] | None = None) -> Path:
    """What ``python -m catalog bench <id>`` does for one entry, writing under `results_root`."""
    from catalog.measure import bench_entry as run_bench  # noqa: PLC0415

    settings = settings or bench_defaults()
    return run_bench(entry, results_root, device, tuple(settings["batch_sizes"]), settings["seed"],
                     settings["min_time"])


def refresh(entries: list[Any], hashes: dict[str, str | None], docs_by_id: dict[str, list[dict]],
            results_root: Path, runner: BenchRunner | None = None, console: Any = None) -> dict[str, str]:
    """Bench every stale entry with a progress bar; return ``{id: error}`` for the ones that failed."""
    from rich.progress import Progress  # noqa: PLC0415

    stale = [e for e in entries if needs_bench(e, docs_by_id.get(e.id, []), hashes.get(e.id))]
    failures: dict[str, str] = {}
    if not stale:
        return failures
    if runner is None:
        settings = bench_defaults()
        runner = lambda entry, root: bench_entry(entry, root, "cpu", settings)  # noqa: E731
    with Progress(console=console, transient=False) as progress:
        task = progress.add_task("bench", total=len(stale))
        for entry in stale:
            progress.update(task, description=f"bench {entry.id} (cpu)")
            try:
                path = runner(entry, results_root)
                progress.console.print(f"measured {entry.id}: {path}", markup=False)
            except Exception as exc:  # noqa: BLE001 - one failing method must not stop the others
                failures[entry.id] = f"{type(exc).__name__}: {exc}"
                progress.console.print(f"FAILED {entry.id}: {type(exc).__name__}: {exc}", markup=False)
            progress.advance(task)
    return failures
