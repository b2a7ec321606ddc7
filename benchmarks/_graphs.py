"""CUDA-graph capture for the GPU benchmarks: time the GPU work alone, without Python and launch overhead.

A small dynamic op issues several kernels from Python; on a fast GPU the host side (dispatch, argument
checks, kernel launches) can take longer than the kernels themselves, and eager timing then measures the
host. Replaying a captured graph removes the host work for both the dense op and the sparse one, so the
ratio compares what the GPU executes. Only ops without host synchronisation can be captured (the
Triton paths are written without any); ``auto`` paths that read a density on the host cannot.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GRAPH_CALLS = 10  # calls captured per graph (one replay = GRAPH_CALLS calls)


def capture(
    fns: dict[str, Callable[[], object]], calls: int = GRAPH_CALLS
) -> dict[str, Callable[[], object]] | None:
    """One graph per function, each replaying ``calls`` back-to-back calls; None where a capture fails.

    Every function is called a few times first on a side stream (autotuning and lazy allocations happen
    outside the capture), as ``torch.cuda.graphs`` recommends.
    """
    graphs: dict[str, torch.cuda.CUDAGraph] = {}
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for fn in fns.values():
                for _ in range(3):
                    fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        for name, fn in fns.items():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
            graphs[name] = graph
    except Exception as error:  # noqa: BLE001 - report it, the eager numbers still stand
        print(f"  (cuda graph capture failed: {error!r:.160})", flush=True)
        torch.cuda.synchronize()
        return None
    return {name: graph.replay for name, graph in graphs.items()}
