"""Benchmark routing, channel-slicing and token kernels against the dense op, in the same run.

    python -m benchmarks.bench_routing [--device cpu|cuda] [--dtype float32|float16|bfloat16] [--quick]
                                       [--threads N] [--out PATH] [--svg PATH]

Sections (every row times the dense op and the dynamic op interleaved, after warm-up; median):

- ``routed``: ``routed_linear`` over E routes (balanced or skewed routing) against one dense matmul
  ``x @ W0.T`` over the same rows. On CUDA also the Triton kernel alone (routing precomputed) and the
  torch grouped path. ``ratio = t_routed / t_dense`` (1.0 = as fast as dense; the MACs are equal).
- ``sliced``: ``sliced_conv2d`` / ``sliced_linear`` at width fractions against the full dense op, with
  one width for the whole batch and with a mixed batch; ``speedup`` against ``mac_reduction``.
- ``tokens``: gather K of N tokens then a linear C->4C, against the linear on all tokens; ragged
  pack -> linear -> unpack at the same keep ratio; ``packed_attention`` per sequence vs padded.

Writes JSON with ``catalog.env.environment`` provenance to ``catalog/results/kernels/routing-<device>.json``
and (with ``--svg``) a matplotlib plot. Needs only torch (+ Triton on CUDA) and matplotlib for the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._graphs import GRAPH_CALLS, capture
from catalog.env import REPO_ROOT, environment
from catalog.timing import steady_allocator
from kernels.routed import routed_linear
from kernels.sliced import sliced_conv2d, sliced_conv2d_macs, sliced_linear, sliced_linear_macs
from kernels.tokens import gather_tokens, pack_tokens, packed_attention

RESULTS = REPO_ROOT / "catalog" / "results" / "kernels"
WIDTHS = (0.25, 0.5, 0.75, 1.0)
KEEPS = (0.25, 0.5, 0.7, 0.9)


# ---------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inner_count(fn: Callable[[], object], device: torch.device, target_s: float) -> int:
    """Calls per sample so that one sample lasts about ``target_s`` (timer resolution, launch jitter)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, min(1000, int(target_s / once)))


def _sample(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    """Seconds per call over ``inner`` back-to-back calls (CUDA events on GPU)."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3 / inner
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def compare(fns: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int = 3) -> dict:
    """Median milliseconds per call of each function, timed interleaved after warm-up."""
    if device.type == "cpu":
        steady_allocator()  # as catalog.timing does: no fresh mappings of large tensors on every call
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    target = 2e-3 if device.type == "cuda" else 20e-3
    inner = {name: _inner_count(fn, device, target) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(_sample(fn, device, inner[name]))
    return {name: 1e3 * statistics.median(values) for name, values in samples.items()}


def graph_compare(fns: dict[str, Callable[[], object]], device: torch.device, reps: int) -> dict | None:
    """GPU time alone per call (CUDA graphs remove the Python/launch overhead); None where capture fails."""
    if device.type != "cuda":
        return None
    replays = capture(fns)
    if replays is None:
        return None
    times = compare(replays, device, reps, warmup=2)
    return {name: ms / GRAPH_CALLS for name, ms in times.items()}


# ---------------------------------------------------------------- workloads
def _routes(tokens: int, experts: int, kind: str, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(tokens * 31 + experts)
    if kind == "balanced":
        route = torch.randperm(tokens, generator=g) % experts
    else:  # skewed: expert e drawn with probability proportional to 1 / (e + 1)
        probs = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64)
        route = torch.multinomial(probs, tokens, replacement=True, generator=g)
    return route.to(device)


def bench_routed(device, dtype, quick: bool, reps: int) -> list[dict]:
    rows = []
    experts_list = (1, 8, 32) if quick else (1, 2, 8, 32)
    channels_list = (256,) if quick and device.type == "cpu" else (256, 1024)
    for tokens in (512, 4096):
        for channels in channels_list:
            g = torch.Generator().manual_seed(channels)
            x = torch.randn(tokens, channels, generator=g).to(device, dtype)
            for experts in experts_list:
                w = (torch.randn(experts, channels, channels, generator=g) / channels**0.5).to(device, dtype)
                for kind in ("balanced", "skewed") if experts > 1 else ("balanced",):
                    route = _routes(tokens, experts, kind, device)
                    fns = {
                        "dense": lambda x=x, w=w: F.linear(x, w[0]),
                        "routed": lambda x=x, r=route, w=w: routed_linear(x, r, w, check_values=False),
                    }
                    if device.type == "cuda":
                        from kernels import _triton_routed  # noqa: PLC0415

                        routing = _triton_routed.routing_offsets(route, experts)
                        fns["kernel"] = lambda x=x, r=route, w=w, rt=routing: _triton_routed.routed_linear(
                            x, r, w, None, routing=rt
                        )
                        fns["torch_grouped"] = lambda x=x, r=route, w=w: routed_linear(x, r, w, backend="cpu")
                    times = compare(fns, device, reps)
                    row = {"tokens": tokens, "channels": channels, "experts": experts, "routing": kind,
                           **{f"ms_{k}": v for k, v in times.items()}}
                    row["ratio"] = times["routed"] / times["dense"]
                    graphed = graph_compare({k: fns[k] for k in ("dense", "routed", "kernel") if k in fns}, device, reps)
                    if graphed:
                        row.update({f"graph_ms_{k}": v for k, v in graphed.items()})
                        row["graph_throughput_vs_dense"] = graphed["dense"] / graphed["kernel"]
                    rows.append(row)
                    print(_fmt("routed", row))
    return rows


SWEEP_CONFIGS = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
    (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 128, 32, 4, 5),
    (64, 128, 64, 4, 4), (64, 256, 64, 8, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 4),
]


def bench_sweep(device, dtype, quick: bool, reps: int) -> list[dict]:
    """GPU only: CUDA-graph time of the Triton kernel per tile config, against the dense matmul."""
    if device.type != "cuda":
        return []
    import triton  # noqa: PLC0415

    from kernels import _triton_routed as tr  # noqa: PLC0415

    rows = []
    for tokens, channels, experts, kind in ((4096, 1024, 8, "balanced"), (4096, 1024, 8, "skewed"),
                                             (4096, 1024, 32, "balanced"), (16384, 1024, 8, "skewed"),
                                             (16384, 2048, 32, "balanced")):
        g = torch.Generator().manual_seed(channels)
        x = torch.randn(tokens, channels, generator=g).to(device, dtype)
        w = (torch.randn(experts, channels, channels, generator=g) / channels**0.5).to(device, dtype)
        route = _routes(tokens, experts, kind, device)
        order, offsets = tr.routing_offsets(route, experts)
        y = x.new_empty(tokens, channels)
        fns = {"dense": lambda x=x, w=w: F.linear(x, w[0])}
        for bm, bn, bk, warps, stages in SWEEP_CONFIGS:
            grid = (triton.cdiv(tokens, bm) + experts, triton.cdiv(channels, bn))

            def launch(bm=bm, bn=bn, bk=bk, warps=warps, stages=stages, grid=grid, x=x, w=w, y=y, o=order,
                       off=offsets, c=channels, e=experts):
                tr._routed_kernel[grid](
                    x, w, w, y, o, off, c, c, e, x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
                    0, 0, y.stride(0), y.stride(1), HAS_BIAS=False, E_PAD=triton.next_power_of_2(e),
                    EVEN_K=c % bk == 0, PRECISION="ieee", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                    num_warps=warps, num_stages=stages)

            fns[f"{bm}x{bn}x{bk}_w{warps}_s{stages}"] = launch
        fns["heuristic"] = lambda x=x, r=route, w=w, rt=(order, offsets): tr.routed_linear(x, r, w, None, routing=rt)
        times = graph_compare(fns, device, reps) or {}
        row = {"tokens": tokens, "channels": channels, "experts": experts, "routing": kind,
               **{f"graph_ms_{k}": v for k, v in times.items()}}
        if times:
            best = min((k for k in times if k != "dense"), key=times.get)
            row["best"] = best
            row["best_throughput_vs_dense"] = times["dense"] / times[best]
            row["heuristic_throughput_vs_dense"] = times["dense"] / times["heuristic"]
        rows.append(row)
        print(_fmt("sweep", row))
    return rows


def bench_sliced(device, dtype, quick: bool, reps: int) -> list[dict]:
    rows = []
    gpu = device.type == "cuda"
    batch, channels, size = (64, 256, 28) if gpu else (16, 128, 14)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).to(device, dtype)
    w = (torch.randn(channels, channels, 3, 3, generator=g) / (9 * channels) ** 0.5).to(device, dtype)
    xl = torch.randn(batch * 16, 4 * channels, generator=g).to(device, dtype)
    wl = (torch.randn(4 * channels, 4 * channels, generator=g) / (4 * channels) ** 0.5).to(device, dtype)
    full_conv = batch * sliced_conv2d_macs([channels], [channels], (3, 3), (size, size))
    full_linear = xl.shape[0] * wl.shape[0] * wl.shape[1]
    mixes = {f"uniform_{f}": [f] * batch for f in WIDTHS}
    mixes["mixed"] = [WIDTHS[i % len(WIDTHS)] for i in range(batch)]
    for name, fractions in mixes.items():
        if quick and name in ("uniform_0.75",):
            continue
        cw = [max(1, round(f * channels)) for f in fractions]
        lw = [max(1, round(f * 4 * channels)) for f in fractions for _ in range(16)]
        for op, fns, macs in (
            ("conv3x3", {"dense": lambda: F.conv2d(x, w, padding=1),
                         "sliced": lambda cw=cw: sliced_conv2d(x, cw, cw, w, padding=1)},
             (full_conv, sliced_conv2d_macs(cw, cw, (3, 3), (size, size)))),
            ("linear", {"dense": lambda: F.linear(xl, wl),
                        "sliced": lambda lw=lw: sliced_linear(xl, lw, lw, wl)},
             (full_linear, sliced_linear_macs(lw, lw))),
        ):
            times = compare(fns, device, reps)
            row = {"op": op, "widths": name, "macs_dense": macs[0], "macs_sliced": macs[1],
                   "ms_dense": times["dense"], "ms_sliced": times["sliced"]}
            row["mac_reduction"] = macs[0] / macs[1]
            row["speedup"] = times["dense"] / times["sliced"]
            row["realization"] = row["speedup"] / row["mac_reduction"]
            rows.append(row)
            print(_fmt("sliced", row))
    return rows


def bench_tokens(device, dtype, quick: bool, reps: int) -> list[dict]:
    rows = []
    gpu = device.type == "cuda"
    batch, tokens, channels = (64, 197, 384) if gpu else (8, 197, 384)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, tokens, channels, generator=g).to(device, dtype)
    w = (torch.randn(4 * channels, channels, generator=g) / channels**0.5).to(device, dtype)
    for keep in KEEPS:
        k = max(1, round(keep * tokens))
        idx = torch.rand(batch, tokens, generator=g).argsort(1)[:, :k].sort(1).values.to(device)
        keep_mask = torch.rand(batch, tokens, generator=g) < keep
        keep_mask = keep_mask.to(device)
        fns = {
            "dense": lambda: F.linear(x, w),
            "gather": lambda idx=idx: F.linear(gather_tokens(x, idx), w),
            "ragged": lambda m=keep_mask: F.linear(pack_tokens(x, m)[0], w),
        }
        times = compare(fns, device, reps)
        row = {"keep": keep, "tokens": tokens, "batch": batch, "channels": channels,
               "ms_dense": times["dense"], "ms_gather": times["gather"], "ms_ragged": times["ragged"],
               "mac_reduction_gather": tokens / k, "mac_reduction_ragged": keep_mask.numel() / int(keep_mask.sum())}
        row["speedup_gather"] = times["dense"] / times["gather"]
        row["speedup_ragged"] = times["dense"] / times["ragged"]
        rows.append(row)
        print(_fmt("tokens", row))
    return rows


def bench_attention(device, dtype, quick: bool, reps: int) -> list[dict]:
    """Ragged attention: one SDPA per sequence vs padding to the longest, vs dense on all tokens."""
    rows = []
    batch, tokens, heads, dim = (64, 197, 6, 64) if device.type == "cuda" else (8, 197, 6, 64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, tokens, heads * dim, generator=g).to(device, dtype)
    for keep in KEEPS if not quick else (0.5, 0.9):
        # ragged keep: sample b keeps a fraction drawn around `keep` (A-ViT-style varying lengths)
        fractions = (keep + 0.3 * (torch.rand(batch, generator=g) - 0.5)).clamp(0.05, 1.0)
        mask = torch.rand(batch, tokens, generator=g) < fractions.unsqueeze(1)
        packed, cu = pack_tokens(x, mask.to(device))
        qkv = packed.view(-1, heads, dim)
        dense_q = x.view(batch, tokens, heads, dim).transpose(1, 2)
        fns = {
            "dense": lambda q=dense_q: F.scaled_dot_product_attention(q, q, q),
            "per_sequence": lambda qkv=qkv, cu=cu: packed_attention(qkv, qkv, qkv, cu, backend="cpu"),
            "padded": lambda qkv=qkv, cu=cu: packed_attention(qkv, qkv, qkv, cu, backend="reference"),
        }
        if device.type == "cuda":
            fns["varlen"] = lambda qkv=qkv, cu=cu: packed_attention(qkv, qkv, qkv, cu, backend="triton")
        times = compare(fns, device, reps)
        lens = mask.sum(1)
        row = {"keep": keep, **{f"ms_{k}": v for k, v in times.items()},
               "mac_reduction": batch * tokens**2 / float((lens.double() ** 2).sum()),
               "padded_mac_reduction": tokens**2 / float(lens.max()) ** 2}
        rows.append(row)
        print(_fmt("attention", row))
    return rows


def _fmt(section: str, row: dict) -> str:
    parts = [f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()]
    return f"[{section}] " + "  ".join(parts)


# ---------------------------------------------------------------- plot
def plot(json_path: str | Path, svg_path: str | Path) -> None:
    """Three panels: routed/dense time ratio per E, sliced speedup vs MAC reduction, token speedups."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    data = json.loads(Path(json_path).read_text())
    env = data["environment"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    graphed = all("graph_ms_routed" in r for r in data["routed"])  # GPU: CUDA-graph (GPU-only) times

    def ratio(r: dict) -> float:
        return r["graph_ms_routed"] / r["graph_ms_dense"] if graphed else r["ratio"]

    for key in ("routed", "sliced", "tokens"):
        data.setdefault(key, [])  # a --sections/--quick run may hold only some sections
    for (tokens, channels, kind), rows in _group(data["routed"], ("tokens", "channels", "routing")).items():
        ax.plot([r["experts"] for r in rows], [ratio(r) for r in rows], marker="o",
                label=f"T={tokens} C={channels} {kind}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(1.25, color="gray", lw=0.8, ls="--")
    what = "GPU time (CUDA graphs)" if graphed else "time"
    ax.set(xscale="log", yscale="log", xlabel="routes E", ylabel=f"{what}: routed / dense (same MACs)",
           title="routed_linear")
    ax.legend(fontsize=6)
    ax = axes[1]
    for op, rows in _group(data["sliced"], ("op",)).items():
        ax.scatter([r["mac_reduction"] for r in rows], [r["speedup"] for r in rows], label=op[0])
    top = max([r["mac_reduction"] for r in data["sliced"]] + [1.0])
    ax.plot([1, top], [1, top], color="gray", lw=0.8, label="ideal")
    ax.set(xlabel="MAC reduction", ylabel="measured speedup", title="sliced conv/linear")
    ax.legend(fontsize=7)
    if not data["sliced"]:
        ax.text(0.5, 0.5, "not measured in this run", ha="center", transform=ax.transAxes)
    ax = axes[2]
    keeps = [r["keep"] for r in data["tokens"]]
    ax.plot(keeps, [r["speedup_gather"] for r in data["tokens"]], marker="o", label="gather + linear")
    ax.plot(keeps, [r["speedup_ragged"] for r in data["tokens"]], marker="s", label="pack + linear")
    ax.plot(keeps, [1 / k for k in keeps], color="gray", lw=0.8, label="ideal 1/keep")
    ax.set(xlabel="keep ratio", ylabel="speedup over all tokens", title="token gather (linear C->4C)")
    ax.legend(fontsize=7)
    fig.suptitle(f"{env['device_name']} | {env['dtype']} | threads {env['threads']} | torch {env['torch']} | "
                 f"{env['date']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(svg_path, format=Path(svg_path).suffix.lstrip(".") or "svg")
    plt.close(fig)


def _group(rows: list[dict], keys: tuple[str, ...]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages: CPU timings are only trustworthy on an otherwise idle machine."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="default: float32 on cpu, float16 on cuda")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--sections", default="routed,sliced,tokens,attention")
    parser.add_argument("--out", default=None, help="JSON path (default catalog/results/kernels/routing-<device>.json)")
    parser.add_argument("--svg", default=None, help="also write a plot here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 7 if args.quick else 15
    result = {"benchmark": "routing", "quick": args.quick,
              "environment": {**environment(device, dtype, layout="contiguous"),
                              **({"allocator": steady_allocator()} if device.type == "cpu" else {})},
              "load_average_before": _load_average()}
    benches = {"sweep": bench_sweep, "routed": bench_routed, "sliced": bench_sliced, "tokens": bench_tokens, "attention": bench_attention}
    with torch.no_grad():  # not inference_mode: weights stay ordinary tensors, as a model's parameters are
        for name in args.sections.split(","):
            result[name] = benches[name](device, dtype, args.quick, reps)
    result["load_average_after"] = _load_average()
    out = Path(args.out) if args.out else RESULTS / f"routing-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    if args.svg and all(k in result for k in ("routed", "sliced", "tokens")):
        plot(out, args.svg)
        print(f"wrote {args.svg}")
    return result


if __name__ == "__main__":
    main()
