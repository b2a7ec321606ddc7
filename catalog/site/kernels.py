"""The kernel pages: which ops there are, their semantics (Contract 3), and their benchmark results.

Benchmarks write ``catalog/results/kernels/<bench>-<device>.json`` (``conv`` from
``benchmarks/bench_conv.py``, ``routing`` from ``benchmarks/bench_routing.py``) and expose
``plot(json_path, svg_path)``; one JSON covers several ops, so its plot is shown on each of their pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from markupsafe import Markup

from catalog.site.context import link_internal, method_page, rel
from catalog.site.escape import our_markdown


@dataclass(frozen=True)
class Kernel:
    slug: str  # page name: kernels/<slug>.md
    title: str
    source: str  # the module whose docstring documents it
    ops: tuple[str, ...]  # names as in an entry's implementation.kernels
    bench: str  # kernel results stem: <bench>-<device>.json
    semantics: str  # our Markdown (Contract 3)


KERNELS: tuple[Kernel, ...] = (
    Kernel("sparse_conv2d", "sparse_conv2d", "kernels/sparse_conv.py", ("sparse_conv2d",), "conv",
           "`sparse_conv2d(x, mask, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, "
           "residual=None)`: `mask` is bool `(N, Hout, Wout)` over output positions; the result equals "
           "`F.conv2d(x, weight, bias, stride, padding, dilation, groups)` where `mask` is true and 0 "
           "elsewhere, plus `residual` (same shape as the output, not modified) when given: a residual "
           "block's add, which the CPU kernel does in its own pass by accumulating into a copy of "
           "`residual`. Executed MACs: active positions x Cout x Cin/groups x kh x kw."),
    Kernel("block_conv2d", "block_conv2d", "kernels/block_conv.py", ("block_conv2d",), "conv",
           "`block_conv2d(x, block_mask, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, "
           "block_size=8)`: `block_mask` is bool `(N, ceil(Hout/B), ceil(Wout/B))`; the result equals the "
           "dense conv inside active `B x B` blocks and 0 elsewhere. Executed MACs: the output positions "
           "inside active blocks (clipped at the border) x Cout x Cin/groups x kh x kw."),
    Kernel("routed_linear", "routed_linear", "kernels/routed.py", ("routed_linear",), "routing",
           "`routed_linear(x, route, weight, bias=None)`: `x (T, Cin)`, `route (T,)` int in `[0, E)`, "
           "`weight (E, Cout, Cin)`; row `t` is `weight[route[t]] @ x[t]` (+ bias). The grouped GEMM behind "
           "mixtures of experts, branch selection and per-sample routing. Executed MACs: T x Cout x Cin."),
    Kernel("tokens", "token gather/scatter", "kernels/tokens.py",
           ("gather_tokens", "scatter_tokens", "pack_tokens", "unpack_tokens"), "routing",
           "Rectangular: `gather_tokens` keeps the same number `K` of tokens per sample, `(B, N, C) -> "
           "(B, K, C)`, and `scatter_tokens` writes them back. Ragged: `pack_tokens` packs each sample's "
           "kept tokens into `(T_active, C)` with `cu_seqlens (B+1,)`, `unpack_tokens` restores `(B, N, C)`. "
           "Memory moves only: 0 MACs."),
    Kernel("sliced", "channel-sliced conv/linear", "kernels/sliced.py", ("sliced_conv2d", "sliced_linear"),
           "routing",
           "`sliced_conv2d` / `sliced_linear`: sample `n` uses the input channels `[:in_width[n]]` and the "
           "weight prefix `weight[:out_width[n], :in_width[n]]`; its outputs past `out_width[n]` are 0. "
           "Samples of equal widths are grouped into one call on a weight view. Executed MACs: the sliced "
           "op's MACs per sample."),
)


def kernel_page(kernel: Kernel) -> str:
    return f"kernels/{kernel.slug}.md"


def result_files(results_root: Path, bench: str) -> list[tuple[str, Path]]:
    """(device, path) of every stored ``<bench>-<device>.json``, sorted (cpu before cuda)."""
    folder = results_root / "kernels"
    if not folder.is_dir():
        return []
    return [(p.stem[len(bench) + 1:], p) for p in sorted(folder.glob(f"{bench}-*.json"))]


def plot_context(device: str, document: dict[str, Any] | None, svg_href: str | None,
                 error: str | None) -> dict[str, Any]:
    """One device's measurement of a kernel benchmark: its plot or its failure, and its provenance."""
    env = (document or {}).get("environment") or {}
    return {
        "device": device,
        "device_name": env.get("device_name") or "",
        "date": env.get("date") or "",
        "commit": str(env.get("commit") or "")[:12],
        "torch": env.get("torch") or "",
        "svg": Markup(svg_href) if svg_href else None,
        "error": error,
    }


def kernel_context(kernel: Kernel, docstring: str | None, entries: list[Any],
                   plots: list[dict[str, Any]]) -> dict[str, Any]:
    page = kernel_page(kernel)
    users = sorted((e for e in entries if set(kernel.ops) & set(e.implementation.kernels)),
                   key=lambda e: e.id)
    measured = {p["device"].split("-", 1)[0] for p in plots}  # "cuda-float32" measures cuda
    return {
        "slug": kernel.slug,
        "link": link_internal(kernel.title, f"{kernel.slug}.md"),
        "title": kernel.title,
        "ops": list(kernel.ops),
        "source": kernel.source,
        "bench": kernel.bench,
        "semantics": Markup(kernel.semantics),
        "docstring": our_markdown(docstring) if docstring else None,
        "users": [link_internal(e.title, rel(page, method_page(e))) for e in users],
        "plots": plots,
        "missing": [d for d in ("cpu", "cuda") if d not in measured],
    }
