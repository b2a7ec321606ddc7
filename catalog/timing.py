"""Latency harness: time several callables in one process, interleaved, and compare dense with dynamic.

Method (see the design's Latency section):
- every function runs in the same process; after ``warmup`` untimed calls each, the timed calls go
  round-robin, one call of each function per round, the order changing every round (``round_order``),
  so drift (thermal, frequency, other load) and cache effects of the predecessor hit all equally;
- rounds continue until every function has at least ``repeats`` samples **and** at least
  ``min_time_s`` of measured time, or ``max_repeats`` rounds were run;
- a fixed torch thread count (default: the physical cores this process may use), restored afterwards;
- on CPU, glibc's malloc keeps freed memory (``steady_allocator``: no fresh mappings and page faults for
  large tensors on every call, whatever the process ran before);
  garbage collection paused while timing; everything under ``torch.inference_mode()``;
- on CUDA each call is timed with CUDA events and synchronized before and after it, so a call's
  launch overhead and host syncs are inside its time; on CPU with ``time.perf_counter``.

Absolute times are only comparable on the same machine in the same run; ``compare`` records the
environment (``catalog.env.environment``) next to the numbers. Imports torch and the standard library
only (the GPU machines have no pydantic).
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from catalog.env import environment

DEFAULT_WARMUP = 5
DEFAULT_REPEATS = 30
DEFAULT_MIN_TIME_S = 0.5
DEFAULT_MAX_REPEATS = 10_000


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one function's per-call times, in milliseconds.

    Quantiles interpolate linearly between order statistics (numpy's default). ``rel_spread`` is
    ``iqr_ms / median_ms``: a noise indicator (0.05 means the middle half of the calls lies within 5%).
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    iqr_ms: float
    mean_ms: float
    min_ms: float
    n: int
    rel_spread: float

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> LatencyStats:
        """Statistics of ``samples_ms`` (at least one finite, non-negative time)."""
        data = sorted(float(s) for s in samples_ms)
        if not data:
            raise ValueError("samples_ms: need at least one sample")
        if not all(math.isfinite(s) and s >= 0 for s in data):
            raise ValueError("samples_ms: times must be finite and >= 0")
        median = quantile(data, 0.5)
        iqr = quantile(data, 0.75) - quantile(data, 0.25)
        return cls(
            median_ms=median,
            p10_ms=quantile(data, 0.1),
            p90_ms=quantile(data, 0.9),
            iqr_ms=iqr,
            mean_ms=math.fsum(data) / len(data),
            min_ms=data[0],
            n=len(data),
            rel_spread=iqr / median if median > 0 else 0.0,
        )

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def quantile(sorted_data: Sequence[float], q: float) -> float:
    """The ``q``-quantile of already sorted data, linear interpolation (numpy's ``linear`` method)."""
    if not sorted_data:
        raise ValueError("sorted_data: empty")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q: must be in [0, 1], got {q}")
    pos = q * (len(sorted_data) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_data) - 1)
    if pos == lo or sorted_data[hi] == sorted_data[lo]:  # no interpolation (also exact for infinities)
        return sorted_data[lo]
    return sorted_data[lo] + (sorted_data[hi] - sorted_data[lo]) * (pos - lo)


def speedup(dense: LatencyStats, dynamic: LatencyStats) -> float:
    """``median_dense / median_dynamic`` (inf when the dynamic median is 0 and the dense one is not)."""
    if dynamic.median_ms == 0:
        return math.inf if dense.median_ms > 0 else math.nan
    return dense.median_ms / dynamic.median_ms


_ALLOCATOR: dict[str, str] = {}


def steady_allocator() -> str:
    """Keep freed memory in the process while timing (once per process); returns what was set.

    glibc's malloc maps every block above its mmap threshold (128 KiB in a fresh process) freshly and
    unmaps it on free, and gives heap memory above its trim threshold back to the OS; in a fresh process
    every large activation is then faulted in page by page on every call. That cost lands on whichever
    model allocates the larger tensors (usually the dense one) and depends on the process's allocation
    history. With mmap off and a 1 GiB trim threshold (``mallopt``) both models run in the steady state of
    a long-running process. Returns ``'glibc malloc: mmap off, trim threshold 1 GiB'``, or ``'default'``
    where that does not apply (another C library, or ``mallopt`` refused).
    """
    if "state" not in _ALLOCATOR:
        state = "default"
        try:
            mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
            if mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 1 << 30) == 1:
                state = "glibc malloc: mmap off, trim threshold 1 GiB"
        _ALLOCATOR["state"] = state
    return _ALLOCATOR["state"]


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads not counted); at least 1."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores: set[tuple[str, str]] = set()
    try:
        physical = core = ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                physical = value.strip()
            elif key == "core id":
                core = value.strip()
                cores.add((physical, core))
    except OSError:
        pass
    return max(1, min(allowed, len(cores))) if cores else max(1, allowed)


@contextmanager
def fixed_threads(threads: int) -> Iterator[int]:
    """Set ``torch.set_num_threads(threads)`` inside the block; restore the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return value


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: not a device: {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu or cuda, got {dev.type!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA was asked for but is not available")
    return dev


def _check_fns(fns: object) -> dict[str, Callable[[], object]]:
    if not isinstance(fns, Mapping):
        raise TypeError(f"fns: expected a dict of name -> callable, got {type(fns).__name__}")
    if not fns:
        raise ValueError("fns: need at least one function to time")
    for name, fn in fns.items():
        if not isinstance(name, str):
            raise TypeError(f"fns: names must be str, got {name!r}")
        if not callable(fn):
            raise TypeError(f"fns[{name!r}]: expected a callable, got {type(fn).__name__}")
    return dict(fns)


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """Call order of one round (a pure function of its arguments).

    Two names: rotated left by ``round_index``, so each follows the other in half the rounds. Three or
    more: a permutation drawn from a generator seeded with ``round_index``; a plain rotation would let
    one function follow a given other in most rounds (with ``dense, sparse, auto``, ``sparse`` would
    run right after ``dense`` in two rounds of three and inherit the caches ``dense`` left behind).
    """
    if len(names) <= 2:
        k = round_index % len(names)
        return list(names[k:]) + list(names[:k])
    order = list(names)
    random.Random(round_index).shuffle(order)
    return order


def _timer(
    device: torch.device, clock: Callable[[], float] | None
) -> Callable[[Callable[[], object]], float]:
    """A function that calls ``fn`` once and returns its time in ms."""
    if device.type == "cuda":

        def time_cuda(fn: Callable[[], object]) -> float:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))

        return time_cuda
    now = clock or time.perf_counter

    def time_cpu(fn: Callable[[], object]) -> float:
        t0 = now()
        fn()
        return (now() - t0) * 1e3

    return time_cpu


def time_interleaved(fns: Mapping[str, Callable[[], object]], **options: Any) -> dict[str, LatencyStats]:
    """Time every zero-argument function in ``fns``, interleaved; return their stats by name.

    ``options`` are ``interleaved_samples``'s keywords: ``device``; ``warmup`` (untimed calls of each
    function first); ``repeats`` (minimum timed calls of each); ``min_time_s`` (minimum total measured time
    of each); ``max_repeats`` (cap on timed calls); ``threads`` (torch CPU threads while timing, default
    ``physical_cores()``, restored afterwards); ``clock`` (seconds-valued clock for CPU timing, default
    ``time.perf_counter``; tests inject one).
    """
    return stats_by_name(interleaved_samples(fns, **options))


def stats_by_name(samples: Mapping[str, Sequence[float]]) -> dict[str, LatencyStats]:
    """``LatencyStats`` of every list of per-call times (ms)."""
    return {name: LatencyStats.from_samples(values) for name, values in samples.items()}


def interleaved_samples(
    fns: Mapping[str, Callable[[], object]],
    *,
    device: str | torch.device = "cpu",
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    min_time_s: float = DEFAULT_MIN_TIME_S,
    max_repeats: int = DEFAULT_MAX_REPEATS,
    threads: int | None = None,
    clock: Callable[[], float] | None = None,
) -> dict[str, list[float]]:
    """Raw per-call times (ms) by name, in round order: element ``i`` of every list was measured in round
    ``i``, so lists can be paired round by round. Arguments as described in ``time_interleaved``."""
    fns = _check_fns(fns)
    dev = _check_device(device)
    _check_int("warmup", warmup, 0)
    _check_int("repeats", repeats, 1)
    _check_int("max_repeats", max_repeats, repeats)
    if isinstance(min_time_s, bool) or not isinstance(min_time_s, (int, float)):
        raise TypeError(f"min_time_s: expected a number, got {type(min_time_s).__name__}")
    if not (math.isfinite(min_time_s) and min_time_s >= 0):
        raise ValueError(f"min_time_s: must be finite and >= 0, got {min_time_s}")
    threads = physical_cores() if threads is None else _check_int("threads", threads, 1)
    if clock is not None and dev.type == "cuda":
        raise ValueError("clock: a custom clock applies to CPU timing only (CUDA uses events)")
    return _interleaved_samples(fns, dev, warmup, repeats, min_time_s, max_repeats, threads, clock)


def _interleaved_samples(
    fns: dict[str, Callable[[], object]], dev: torch.device, warmup: int, repeats: int, min_time_s: float,
    max_repeats: int, threads: int, clock: Callable[[], float] | None,
) -> dict[str, list[float]]:
    """Per-call times in ms by name, in round order: element ``i`` of every list comes from round ``i``."""
    if dev.type == "cpu":
        steady_allocator()
    timer = _timer(dev, clock)
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    totals_ms = dict.fromkeys(names, 0.0)
    with fixed_threads(threads), torch.inference_mode(), _gc_paused():
        for _ in range(warmup):
            for name in names:
                fns[name]()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        rounds = 0
        while True:
            for name in round_order(names, rounds):
                elapsed_ms = timer(fns[name])
                samples[name].append(elapsed_ms)
                totals_ms[name] += elapsed_ms
            rounds += 1
            enough_time = min(totals_ms.values()) >= min_time_s * 1e3
            if (rounds >= repeats and enough_time) or rounds >= max_repeats:
                break
    return samples


def compare(
    dense_fn: Callable[[], object],
    dynamic_fn: Callable[[], object],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    layout: str = "contiguous",
    batch_size: int | None = None,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    min_time_s: float = DEFAULT_MIN_TIME_S,
    max_repeats: int = DEFAULT_MAX_REPEATS,
    threads: int | None = None,
    clock: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Time dense and dynamic interleaved; return their stats, the speedup and the environment.

    Returns ``{"dense": LatencyStats, "dynamic": LatencyStats, "speedup": median_dense /
    median_dynamic, "speedup_spread": paired_spread(...), "threads": int, "environment": dict}``; the
    environment's ``threads`` is the count used while timing.
    """
    threads = physical_cores() if threads is None else _check_int("threads", threads, 1)
    samples = interleaved_samples(
        {"dense": dense_fn, "dynamic": dynamic_fn},
        device=device,
        warmup=warmup,
        repeats=repeats,
        min_time_s=min_time_s,
        max_repeats=max_repeats,
        threads=threads,
        clock=clock,
    )
    stats = stats_by_name(samples)
    env = environment(device, dtype, layout, batch_size)
    env["threads"] = threads
    return {
        "dense": stats["dense"],
        "dynamic": stats["dynamic"],
        "speedup": speedup(stats["dense"], stats["dynamic"]),
        "speedup_spread": paired_spread(samples["dense"], samples["dynamic"]),
        "threads": threads,
        "environment": env,
    }


def paired_spread(dense_ms: Sequence[float], dynamic_ms: Sequence[float]) -> dict[str, float | int]:
    """p10 and p90 of the per-round speedups ``dense[i] / dynamic[i]`` (calls of the same round paired).

    A pure function. Drift that slows both calls of a round (host load, frequency) cancels in each
    ratio, so the spread shows how far the speedup itself moved while it was measured; ``n`` rounds.
    """
    if len(dense_ms) != len(dynamic_ms) or not dense_ms:
        raise ValueError(f"dense_ms, dynamic_ms: expected two equally long non-empty lists, got "
                         f"{len(dense_ms)} and {len(dynamic_ms)}")
    ratios = sorted(d / y if y > 0 else math.inf for d, y in zip(dense_ms, dynamic_ms, strict=True))
    return {"p10": quantile(ratios, 0.1), "p90": quantile(ratios, 0.9), "n": len(ratios)}
