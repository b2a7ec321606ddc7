"""Speed of sparse_conv2d / block_conv2d against the dense ``F.conv2d``, measured in the same run.

    python -m benchmarks.bench_conv [--device cpu|cuda] [--dtype float32] [--channels-last] [--quick]
                                    [--threads N] [--out PATH] [--svg PATH]

For every row (op, 3x3 conv C->C with padding 1, H=W, batch, mask kind, density) three functions are
timed interleaved (``catalog.timing.time_interleaved``: warm-up, round-robin, median; CUDA events on
GPU): the dense conv, the op's sparse path forced (``cpu`` on CPU, ``triton`` on CUDA) and the op with
``backend="auto"`` (which falls back to dense above the op's break-even density). Masks have an exact
density per sample: ``random`` (uniform noise) or ``clustered`` (a smooth random field, so activity
comes in blobs); block masks are drawn at block resolution (8x8 blocks). ``speedup = dense / sparse``.
On CUDA, dense and forced-sparse are also timed as CUDA-graph replays (``graph_*`` keys, see
``benchmarks._graphs``): the GPU time alone, without Python, dispatch and launch overhead, which dominate
eager calls of these small layers on a fast GPU. The plot shows the graph speedups when every row has one.

``--stat min`` bases the speedups on the fastest call instead of the median (for a machine shared with
other load, where medians measure the other load); ``--threads 1 --clock thread`` times CPU time of
the calling thread, which other processes cannot inflate. ``--quick`` runs only the target rows (C=64, 56x56, random masks; batch 1 on CPU, 8 on CUDA). The JSON
(rows + ``catalog.env.environment`` provenance) goes to ``catalog/results/kernels/conv-<device>.json``
unless ``--out`` says otherwise; ``plot(json_path, svg_path)`` draws speedup against density.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._graphs import GRAPH_CALLS, capture
from catalog.env import environment
from catalog.timing import physical_cores, steady_allocator, time_interleaved
from kernels import _backend, _native
from kernels.block_conv import (
    BLOCK_CONV2D_BREAK_EVEN,
    block_break_even,
    block_conv2d,
    block_conv2d_macs,
    block_positions,
)
from kernels.sparse_conv import (
    FUSED_BREAK_EVEN,
    FUSED_LARGE_BREAK_EVEN,
    FUSED_LARGE_MACS,
    SPARSE_CONV2D_BREAK_EVEN,
    conv2d_macs,
    cpu_break_even,
    sparse_conv2d,
    sparse_conv2d_macs,
)

REPO = Path(__file__).resolve().parent.parent
DENSITIES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9)
QUICK_DENSITIES = (0.25, 0.5, 0.75, 0.9)
BLOCK_SIZE = 8


def exact_density_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Bool mask marking the ``round(density * H * W)`` highest scores of each sample ``(N, H, W)``."""
    n, h, w = scores.shape
    k = min(h * w, max(0, round(density * h * w)))
    mask = torch.zeros(n, h * w, dtype=torch.bool, device=scores.device)
    if k:
        mask.scatter_(1, scores.reshape(n, -1).topk(k, dim=1).indices, True)
    return mask.view(n, h, w)


def make_mask(kind: str, shape: tuple[int, int, int], density: float, gen: torch.Generator) -> torch.Tensor:
    """A ``random`` or ``clustered`` bool mask of ``shape`` with an exact per-sample density (on CPU)."""
    n, h, w = shape
    if kind == "random":
        scores = torch.rand(n, h, w, generator=gen)
    elif kind == "clustered":
        coarse = torch.rand(n, 1, max(2, h // 6), max(2, w // 6), generator=gen)
        scores = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[:, 0]
    else:
        raise ValueError(f"kind: expected 'random' or 'clustered', got {kind!r}")
    return exact_density_mask(scores, density)


def bench_row(
    op: str, kind: str, density: float, channels: int, size: int, batch: int, device: torch.device,
    dtype: torch.dtype, channels_last: bool, threads: int | None, repeats: int, min_time_s: float = 0.2,
    stat: str = "median", clock: str = "wall",
) -> dict:
    """Time dense, forced-sparse and auto for one configuration; return the row."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(channels, channels, 3, 3, generator=gen) / math.sqrt(9 * channels)).to(device, dtype)
    bias = torch.randn(channels, generator=gen).to(device, dtype)
    sparse_path = "triton" if device.type == "cuda" else "cpu"
    if op == "sparse_conv2d":
        mask = make_mask(kind, (batch, size, size), density, gen).to(device)
        executed = float(mask.float().mean())
        macs = sparse_conv2d_macs(mask, weight.shape)
        dense_macs = conv2d_macs(batch, size, size, weight.shape)
        break_even = cpu_break_even(x, weight, 1, SPARSE_CONV2D_BREAK_EVEN, dense_macs=dense_macs)  # auto's value

        def run(backend: str) -> torch.Tensor:
            return sparse_conv2d(x, mask, weight, bias, padding=1, backend=backend)
    else:
        blocks = -(-size // BLOCK_SIZE)
        mask = make_mask(kind, (batch, blocks, blocks), density, gen).to(device)
        executed = float(block_positions(mask, size, size, BLOCK_SIZE).sum()) / (batch * size * size)
        macs = block_conv2d_macs(mask, (size, size), BLOCK_SIZE, weight.shape)
        break_even = block_break_even(x, weight, 1, dense_macs=conv2d_macs(batch, size, size, weight.shape))  # auto's

        def run(backend: str) -> torch.Tensor:
            return block_conv2d(x, mask, weight, bias, padding=1, block_size=BLOCK_SIZE, backend=backend)

    stats = time_interleaved(
        {
            "dense": lambda: F.conv2d(x, weight, bias, padding=1),
            "sparse": lambda: run(sparse_path),
            "auto": lambda: run("auto"),
        },
        device=device, warmup=3, repeats=repeats, min_time_s=min_time_s, max_repeats=max(repeats, 200), threads=threads,
        clock=time.thread_time if clock == "thread" else None,
    )
    dense_macs = conv2d_macs(batch, size, size, weight.shape)
    auto_path = _backend.resolve("auto", device, executed, break_even)
    ms = {name: getattr(st, f"{stat}_ms") for name, st in stats.items()}
    speedup = ms["dense"] / ms["sparse"]
    graphed = graph_row(
        {"dense": lambda: F.conv2d(x, weight, bias, padding=1), "sparse": lambda: run(sparse_path)},
        device, repeats, min_time_s, stat, macs / dense_macs if dense_macs else 0.0,
    )
    return {
        "op": op, "mask": kind, "density_target": density, "density": round(executed, 6),
        "channels": channels, "size": size, "batch": batch, "kernel": 3, "block_size": BLOCK_SIZE if op == "block_conv2d" else None,
        "dtype": str(dtype).replace("torch.", ""), "layout": "channels_last" if channels_last else "contiguous",
        "sparse_path": sparse_path, "auto_path": auto_path,
        "stat": stat, "dense_ms": ms["dense"], "sparse_ms": ms["sparse"], "auto_ms": ms["auto"],
        "dense_median_ms": stats["dense"].median_ms, "sparse_median_ms": stats["sparse"].median_ms,
        "dense_rel_spread": stats["dense"].rel_spread, "sparse_rel_spread": stats["sparse"].rel_spread,
        "speedup": speedup, "auto_speedup": ms["dense"] / ms["auto"],
        "macs_dense": dense_macs, "macs_sparse": macs, "mac_reduction": dense_macs / macs if macs else math.inf,
        "realization": speedup * macs / dense_macs if macs else None,
        **graphed,
    }


def graph_row(
    fns: dict, device: torch.device, repeats: int, min_time_s: float, stat: str, density: float
) -> dict:
    """CUDA only: dense and forced-sparse timed as CUDA-graph replays (GPU time without host overhead).

    Keys ``graph_dense_ms``, ``graph_sparse_ms``, ``graph_speedup``, ``graph_realization``; empty on CPU
    or where the capture fails.
    """
    if device.type != "cuda":
        return {}
    replays = capture(fns)
    if replays is None:
        return {}
    stats = time_interleaved(replays, device=device, warmup=2, repeats=repeats, min_time_s=min_time_s,
                             max_repeats=max(repeats, 200))
    ms = {name: getattr(st, f"{stat}_ms") / GRAPH_CALLS for name, st in stats.items()}
    speedup = ms["dense"] / ms["sparse"]
    return {"graph_dense_ms": ms["dense"], "graph_sparse_ms": ms["sparse"], "graph_speedup": speedup,
            "graph_realization": speedup * density if density else None}


def configurations(quick: bool, device: torch.device) -> list[tuple]:
    """(op, kind, density, channels, size, batch) of every row, in run order."""
    if quick:
        batch = 8 if device.type == "cuda" else 1
        return [(op, "random", d, 64, 56, batch) for op in ("sparse_conv2d", "block_conv2d") for d in QUICK_DENSITIES]
    return [
        (op, kind, d, c, s, b)
        for b in (1, 8) for c in (64, 256) for s in (56, 28)
        for op in ("sparse_conv2d", "block_conv2d") for kind in ("random", "clustered") for d in DENSITIES
    ]


def break_even_estimate(rows: Sequence[dict], op: str) -> float | None:
    """Density where the forced sparse path's speedup crosses 1 (linear interpolation), target rows only."""
    pts = sorted((r["density"], r["speedup"]) for r in rows if r["op"] == op and r["mask"] == "random"
                 and r["channels"] == 64 and r["size"] == 56)
    for (d0, s0), (d1, s1) in zip(pts, pts[1:], strict=False):
        if s0 >= 1.0 > s1:
            return d0 + (s0 - 1.0) * (d1 - d0) / (s0 - s1)
    if pts and all(s >= 1.0 for _, s in pts):
        return 1.0
    return pts[0][0] if pts else None


def print_table(rows: Sequence[dict]) -> None:
    header = ["op", "mask", "C", "HxW", "N", "density", "dense ms", "sparse ms", "speedup", "auto", "auto x",
              "graph x", "ideal"]
    lines = [[r["op"], r["mask"], str(r["channels"]), f"{r['size']}", str(r["batch"]), f"{r['density']:.3f}",
              f"{r['dense_ms']:.3f}", f"{r['sparse_ms']:.3f}", f"{r['speedup']:.2f}", r["auto_path"],
              f"{r['auto_speedup']:.2f}", f"{r['graph_speedup']:.2f}" if "graph_speedup" in r else "-",
              f"{r['mac_reduction']:.2f}"] for r in rows]
    try:
        from rich.console import Console  # noqa: PLC0415 - optional pretty printing
        from rich.table import Table  # noqa: PLC0415

        table = Table(*header)
        for line in lines:
            table.add_row(*line)
        Console(width=180).print(table)
    except ImportError:
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
        for line in lines:
            print("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))


def plot(json_path: str | Path, svg_path: str | Path) -> Path:
    """Speedup against density per op (one line per shape/mask/batch), with the ideal 1/d curve; SVG."""
    import matplotlib  # noqa: PLC0415 - only for plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    data = json.loads(Path(json_path).read_text())
    rows = data["rows"]
    ops = sorted({r["op"] for r in rows})
    key = "graph_speedup" if rows and all("graph_speedup" in r for r in rows) else "speedup"
    fig, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 4.5), squeeze=False)
    for ax, op in zip(axes[0], ops, strict=True):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r["op"] == op:
                label = f"C={r['channels']} {r['size']}x{r['size']} N={r['batch']} {r['mask']}"
                series.setdefault(label, []).append((r["density"], r[key]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1, label=label)
        grid = [0.04 + i * 0.01 for i in range(97)]
        ax.plot(grid, [1 / d for d in grid], "k--", lw=1, label="ideal 1/d")
        ax.axhline(1.0, color="grey", lw=0.8)
        what = "GPU-time speedup (CUDA graphs)" if key == "graph_speedup" else "speedup"
        ax.set(xlabel="executed density", ylabel=f"{what} vs dense conv", title=op, yscale="log", xlim=(0, 1))
        ax.legend(fontsize=6)
    env = data.get("environment", {})
    fig.suptitle(f"{env.get('device_name', '')} | {env.get('dtype', '')} {env.get('layout', '')} | "
                 f"threads {env.get('threads', '')} | torch {env.get('torch', '')}", fontsize=8)
    fig.tight_layout()
    svg_path = Path(svg_path)
    svg_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(svg_path, format="svg")
    plt.close(fig)
    return svg_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--quick", action="store_true", help="only the target rows")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    parser.add_argument("--repeats", type=int, default=30, help="minimum timed calls per function")
    parser.add_argument("--min-time", type=float, default=0.2, help="minimum measured seconds per function")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="statistic behind the speedups (min: for a machine shared with other load)")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="CPU only: 'thread' times the calling thread's CPU time (needs --threads 1); "
                             "immune to other processes' load, which wall-clock time is not")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--svg", type=Path, default=None, help="also draw the plot here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    if args.clock == "thread" and (device.type != "cpu" or args.threads != 1):
        print("--clock thread: needs --device cpu and --threads 1", file=sys.stderr)
        return 2
    configs = configurations(args.quick, device)
    threads = args.threads if args.threads is not None else physical_cores()
    rows = []
    for i, (op, kind, density, channels, size, batch) in enumerate(configs, 1):
        row = bench_row(op, kind, density, channels, size, batch, device, dtype, args.channels_last,
                        threads, args.repeats, args.min_time, args.stat, args.clock)
        rows.append(row)
        print(f"[{i}/{len(configs)}] {op} {kind} C={channels} {size}x{size} N={batch} d={density}: "
              f"speedup {row['speedup']:.2f} (auto {row['auto_speedup']:.2f}"
              + (f", CUDA graphs {row['graph_speedup']:.2f}" if "graph_speedup" in row else "") + ")",
              file=sys.stderr, flush=True)
    print_table(rows)
    env = environment(device, dtype, "channels_last" if args.channels_last else "contiguous", None)
    if device.type == "cpu":
        env["allocator"] = steady_allocator()
    env["threads"] = threads
    env["clock"] = args.clock
    env["stat"] = args.stat
    result = {
        "benchmark": "benchmarks.bench_conv",
        "command": " ".join(["python -m benchmarks.bench_conv", *(argv if argv is not None else sys.argv[1:])]),
        "environment": env,
        "break_even_constants": {"sparse_conv2d": SPARSE_CONV2D_BREAK_EVEN, "block_conv2d": BLOCK_CONV2D_BREAK_EVEN,
                                 "fused_cpu_kernel": FUSED_BREAK_EVEN,
                                 "fused_cpu_kernel_large": {"dense_macs_from": FUSED_LARGE_MACS,
                                                            "break_even": FUSED_LARGE_BREAK_EVEN}},
        "native_cpu_kernel": _native.usable(torch.zeros(1), torch.zeros(1)),
        "break_even_measured": {op: break_even_estimate(rows, op) for op in ("sparse_conv2d", "block_conv2d")},
        "rows": rows,
    }
    out = args.out or REPO / "catalog" / "results" / "kernels" / f"conv-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}; break-even (target rows): {result['break_even_measured']}")
    if args.svg:
        print(f"wrote {plot(out, args.svg)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
