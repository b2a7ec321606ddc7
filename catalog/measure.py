"""Measuring one implementation at one operating point: executed MACs, params, latency, decisions.

Dense numbers come from ``build_baseline``, dynamic ones from ``build`` in eval mode, both on the same
``example_input`` under a fixed seed, timed interleaved in one process (``catalog.timing``).
``mac_reduction = macs_dense / macs_dynamic``, ``speedup = latency_dense / latency_dynamic``,
``realization = speedup / mac_reduction``.

On CUDA, float32 is measured exactly (TF32 off for cuDNN convolutions and cuBLAS matmuls, restored
afterwards): the sparse Triton kernels compute fp32 in exact ("ieee") arithmetic, so a dense baseline
allowed TF32 would be timed doing cheaper arithmetic than the dynamic model.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from catalog import knobs
from catalog.env import REPO_ROOT, environment

REQUIRED = ("Config", "build", "build_baseline", "example_input")
SHARED_CODE = ("implementations/common", "kernels")


class ImplementationError(RuntimeError):
    """An implementation that cannot be loaded or does not follow Contract 2."""


def load_module(entry: Any) -> ModuleType:
    """Import the entry's implementation module and check it follows Contract 2."""
    if entry.implementation.status == "planned" or not entry.implementation.module:
        raise ImplementationError(
            f"{entry.id}: no implementation yet (status 'planned'); see CONTRIBUTING.md to add one"
        )
    name = entry.implementation.module.removesuffix(".py").replace("/", ".")
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - report any import failure as the implementation's
        raise ImplementationError(f"{entry.id}: cannot import {name}: {type(exc).__name__}: {exc}") from exc
    missing = [attr for attr in REQUIRED if not hasattr(module, attr)]
    if missing:
        raise ImplementationError(f"{entry.id}: {name} lacks {', '.join(missing)} (Contract 2)")
    return module


def code_hash(entry: Any) -> str:
    """sha256 over the implementation file and the shared code it may use (to detect stale results)."""
    digest = hashlib.sha256()
    files = [REPO_ROOT / entry.implementation.module]
    for folder in SHARED_CODE:
        files += sorted((REPO_ROOT / folder).rglob("*.py")) + sorted((REPO_ROOT / folder).rglob("*.c"))
    for path in files:
        digest.update(str(path.relative_to(REPO_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """No TF32 on CUDA while inside (cuDNN convolutions and cuBLAS matmuls); a no-op on CPU."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def operating_point_config(module: ModuleType, knob_values: Mapping[str, Any]) -> Any:
    return knobs.apply(module.Config, knob_values)


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output


def build_pair(module: ModuleType, cfg: Any, device: torch.device, seed: int) -> tuple[Any, Any]:
    """Dense baseline and dynamic model, in eval mode, on `device`, deterministic in `seed`."""
    torch.manual_seed(seed)
    dense = module.build_baseline(cfg)
    torch.manual_seed(seed)
    dynamic = module.build(cfg)
    return dense.to(device).eval(), dynamic.to(device).eval()


def example(module: ModuleType, cfg: Any, batch_size: int, device: torch.device, seed: int) -> torch.Tensor:
    torch.manual_seed(seed + 1)
    return module.example_input(cfg, batch_size).to(device)


def count_pair(dense: Any, dynamic: Any, x: torch.Tensor, module: ModuleType) -> dict[str, Any]:
    """MACs per sample and parameters of dense and dynamic on `x (N, ...)`, plus the decisions taken."""
    from catalog.costs import count_macs, count_params  # noqa: PLC0415

    n = len(x)
    with torch.inference_mode():
        macs_dense = count_macs(dense, x) / n
        macs_dynamic = count_macs(dynamic, x) / n
        _, info = dynamic(x)
    decisions = module.summarize(info) if hasattr(module, "summarize") else {}
    return {
        "macs_dense": macs_dense,
        "macs_dynamic": macs_dynamic,
        "mac_reduction": macs_dense / macs_dynamic if macs_dynamic else float("inf"),
        "params_dense": count_params(dense),
        "params_dynamic": count_params(dynamic),
        "decisions": _jsonable(decisions),
    }


def counts(module: ModuleType, cfg: Any, batch_size: int, device: str | torch.device = "cpu",
           seed: int = 0) -> dict[str, Any]:
    """The deterministic part of a measurement (what CI recomputes for every stored result)."""
    device = torch.device(device)
    dense, dynamic = build_pair(module, cfg, device, seed)
    return count_pair(dense, dynamic, example(module, cfg, batch_size, device, seed), module)


def measure(module: ModuleType, cfg: Any, batch_size: int, device: str | torch.device = "cpu",
            seed: int = 0, min_time_s: float = 1.0, models: tuple[Any, Any] | None = None,
            count_inputs: torch.Tensor | None = None) -> dict[str, Any]:
    """Counts plus interleaved latency of dense and dynamic on the same input.

    By default both models are built untrained under `seed` and measured on `example_input`. With
    `models` (e.g. after `--train`) those are measured instead: MACs averaged over `count_inputs`
    (e.g. the whole test set), latency on its first `batch_size` samples.
    """
    from catalog import timing  # noqa: PLC0415

    device = torch.device(device)
    if models is None:
        dense, dynamic = build_pair(module, cfg, device, seed)
        x = example(module, cfg, batch_size, device, seed)
        count_x = x
    else:
        dense, dynamic = (m.to(device).eval() for m in models)
        count_x = count_inputs.to(device)
        x = count_x[:batch_size]
    with exact_fp32(device):
        result = count_pair(dense, dynamic, count_x, module)
        with torch.inference_mode():
            timed = timing.compare(lambda: _first(dense(x)), lambda: _first(dynamic(x)), device=device,
                                   min_time_s=min_time_s)
    dense_stats, dynamic_stats = timed["dense"], timed["dynamic"]
    speedup = timed["speedup"]
    return {
        "config": knobs.as_dict(cfg),
        "batch_size": batch_size,
        "seed": seed,
        **result,
        "latency_ms_dense": dense_stats.median_ms,
        "latency_ms_dynamic": dynamic_stats.median_ms,
        "latency_spread": {
            "dense": {"p10_ms": dense_stats.p10_ms, "p90_ms": dense_stats.p90_ms, "n": dense_stats.n},
            "dynamic": {"p10_ms": dynamic_stats.p10_ms, "p90_ms": dynamic_stats.p90_ms, "n": dynamic_stats.n},
        },
        "speedup": speedup,
        "speedup_spread": timed["speedup_spread"],
        "realization": speedup / result["mac_reduction"] if result["mac_reduction"] else float("nan"),
        "environment": {**environment(device, next(dense.parameters()).dtype, "contiguous", batch_size),
                        **({"allocator": timing.steady_allocator()} if device.type == "cpu" else {})},
    }


def bench_entry(entry: Any, results_root: Path | None = None, device: str | torch.device = "cpu",
                batch_sizes: tuple[int, ...] = (1, 8), seed: int = 0, min_time_s: float = 2.0) -> Path:
    """What ``python -m catalog bench <id>`` does for one entry: every operating point x batch size,
    written as one result document (atomically) under `results_root`. Returns the file written."""
    from catalog import results  # noqa: PLC0415

    module = load_module(entry)
    rows = []
    for point in entry.implementation.operating_points:
        cfg = operating_point_config(module, point.knobs)
        for batch in batch_sizes:
            row = measure(module, cfg, batch, device, seed=seed, min_time_s=min_time_s)
            rows.append({"operating_point": point.name, "operating_point_source": point.source, **row})
    document = results.record(entry.id, code_hash(entry), rows)
    return results.write(document, results_root or results.RESULTS_DIR)


def _jsonable(value: Any) -> Any:
    """Decision summaries may hold tensors or numpy values; make them JSON-friendly."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist()) if value.numel() != 1 else value.item()
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, float):
        return round(value, 6)
    return value


def relative(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
