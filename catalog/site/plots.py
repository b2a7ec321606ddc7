"""Plots generated from stored results at build time (matplotlib, SVG); never drawn by hand or committed."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
_COLORS = {"cpu": "#1f77b4", "cuda": "#d62728"}


def _pyplot():
    import matplotlib  # noqa: PLC0415 - heavy; only when a plot is drawn

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "catalog"  # stable ids: the same data gives the same file
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg", metadata={"Date": None}, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def decision_png(draw: Callable[[], Any], path: Path) -> Path:
    """Run a method's `decision_figure()` (a model on a real photo) and save it as PNG (photos make
    large SVGs). The RNG is seeded so that the same code draws the same picture."""
    import torch  # noqa: PLC0415

    _pyplot()  # Agg before the method imports pyplot
    torch.manual_seed(0)
    fig = draw()
    if not hasattr(fig, "savefig"):
        raise TypeError(f"decision_figure() returned {type(fig).__name__}, not a matplotlib Figure")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, format="png", dpi=80, metadata={"Software": None}, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return path


def speedup_chart(points: list[dict[str, Any]], path: Path) -> Path:
    """MAC reduction (x) against measured speedup (y), log-log, with y = x (perfect realization).

    One marker per measurement: colour = device, shape = batch size; labels name the method.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    values = [p["mac_reduction"] for p in points] + [p["speedup"] for p in points] + [1.0]
    lo, hi = min(values + [0.5]) / 1.3, max(values + [4.0]) * 1.3
    ax.plot([lo, hi], [lo, hi], color="0.3", linestyle="--", linewidth=1,
            label="y = x: MAC saving fully realized")
    ax.axhline(1.0, color="0.6", linewidth=0.8, linestyle=":", label="y = 1: no speedup")
    batches = sorted({p["batch"] for p in points if isinstance(p["batch"], int)})
    seen = set()
    for p in points:
        marker = _MARKERS[batches.index(p["batch"]) % len(_MARKERS)] if p["batch"] in batches else "o"
        color = _COLORS.get(p["device"], "#2ca02c")
        key = (p["device"], p["batch"])
        label = f"{p['device']}, batch {p['batch']}" if key not in seen else None
        seen.add(key)
        ax.scatter(p["mac_reduction"], p["speedup"], marker=marker, color=color, s=42, alpha=0.85,
                   edgecolors="black", linewidths=0.4, label=label, zorder=3)
        ax.annotate(p["id"], (p["mac_reduction"], p["speedup"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=7, color="0.25")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("MAC reduction (dense MACs / executed MACs)")
    ax.set_ylabel("measured speedup (dense latency / dynamic latency)")
    ax.grid(True, which="both", alpha=0.25)
    if not points:
        ax.text(1.0, 1.0, "no measurements stored yet", ha="center", va="center", fontsize=11)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def latency_bars(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Dense vs dynamic median latency per measurement (operating point, batch) of one result file."""
    plt = _pyplot()
    labels = [f"{r['operating_point']}\nbatch {r['batch_size']}" for r in rows]
    dense = [float(r.get("latency_ms_dense") or 0.0) for r in rows]
    dynamic = [float(r.get("latency_ms_dynamic") or 0.0) for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(rows) + 2), 3.2))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], dense, width=0.4, label="dense (baseline)", color="0.6")
    ax.bar([x + 0.2 for x in xs], dynamic, width=0.4, label="dynamic", color="#1f77b4")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("median latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.25)
    return _save(fig, path)


def benchmark_plotter(bench: str) -> Callable[[Path, Path], Any]:
    """``plot(json_path, svg_path)`` of ``benchmarks/bench_<bench>.py`` (imported when needed)."""
    module = importlib.import_module(f"benchmarks.bench_{bench}")
    return module.plot
