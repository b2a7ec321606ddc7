"""The latency harness: behaviour only (order, warm-up, statistics, threads, errors), never speed."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from catalog import timing
from catalog.timing import LatencyStats, compare, round_order, time_interleaved


class FakeClock:
    """A clock (seconds) that only moves when a fake function "runs"; records the call order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def fn(self, name: str, durations_ms: list[float]):
        """A fake function: its k-th call takes ``durations_ms[k % len]`` milliseconds."""
        count = [0]

        def run() -> None:
            self.calls.append(name)
            self.now += durations_ms[count[0] % len(durations_ms)] / 1e3
            count[0] += 1

        return run


def test_calls_are_interleaved_one_of_each_per_round_in_round_order() -> None:
    clock = FakeClock()
    fns = {name: clock.fn(name, [1.0]) for name in "abc"}
    stats = time_interleaved(fns, warmup=2, repeats=4, min_time_s=0, threads=1, clock=clock)
    warm = list("abc") * 2
    timed = [name for r in range(4) for name in round_order(list("abc"), r)]
    assert clock.calls == warm + timed
    assert [s.n for s in stats.values()] == [4, 4, 4]
    assert list(stats) == ["a", "b", "c"]


def test_round_order_rotates_two_and_balances_predecessors_of_more() -> None:
    assert round_order(["a", "b"], 0) == ["a", "b"]
    assert round_order(["a", "b"], 1) == ["b", "a"]
    assert round_order(["a", "b", "c"], 5) == round_order(["a", "b", "c"], 5)  # deterministic
    names = ["dense", "sparse", "auto"]
    calls = [name for r in range(600) for name in round_order(names, r)]
    assert all(sorted(round_order(names, r)) == sorted(names) for r in range(20))
    after_dense = {n: sum(1 for p, c in zip(calls, calls[1:], strict=False) if p == "dense" and c == n) for n in names}
    # a rotation would give sparse 400 and auto 200 of these 600 rounds
    assert abs(after_dense["sparse"] - after_dense["auto"]) < 60, after_dense


def test_warmup_calls_are_not_recorded() -> None:
    clock = FakeClock()
    slow_then_fast = [100.0] * 3 + [2.0] * 1000  # the first three calls are the warm-up
    stats = time_interleaved(
        {"x": clock.fn("x", slow_then_fast)}, warmup=3, repeats=5, min_time_s=0, threads=1, clock=clock
    )["x"]
    assert stats.n == 5 and stats.median_ms == pytest.approx(2.0) and stats.p90_ms == pytest.approx(2.0)
    assert len(clock.calls) == 8


def test_repeats_until_min_time_for_every_function_then_caps() -> None:
    clock = FakeClock()
    fns = {"fast": clock.fn("fast", [1.0]), "slow": clock.fn("slow", [10.0])}
    stats = time_interleaved(fns, warmup=0, repeats=3, min_time_s=0.05, threads=1, clock=clock)
    assert stats["fast"].n == stats["slow"].n == 50  # the fast one needs 50 x 1 ms; same rounds for both
    clock = FakeClock()
    stats = time_interleaved(
        {"x": clock.fn("x", [1.0])},
        warmup=0,
        repeats=3,
        min_time_s=10.0,
        max_repeats=7,
        threads=1,
        clock=clock,
    )
    assert stats["x"].n == 7


def test_stats_on_known_samples() -> None:
    samples = [float(v) for v in range(1, 11)]  # 1..10 ms
    s = LatencyStats.from_samples(list(reversed(samples)))
    assert s.n == 10 and s.min_ms == 1.0
    assert s.median_ms == pytest.approx(5.5) and s.mean_ms == pytest.approx(5.5)
    assert s.p10_ms == pytest.approx(1.9) and s.p90_ms == pytest.approx(9.1)
    assert s.iqr_ms == pytest.approx(7.75 - 3.25)
    assert s.rel_spread == pytest.approx(4.5 / 5.5)
    rng = np.random.default_rng(0)
    data = rng.exponential(3.0, size=37).tolist()
    s = LatencyStats.from_samples(data)
    q10, q25, q50, q75, q90 = np.percentile(data, [10, 25, 50, 75, 90])
    assert (s.p10_ms, s.median_ms, s.p90_ms) == pytest.approx((q10, q50, q90))
    assert s.iqr_ms == pytest.approx(q75 - q25) and s.mean_ms == pytest.approx(np.mean(data))
    assert LatencyStats.from_samples([4.0]).as_dict() == {
        "median_ms": 4.0, "p10_ms": 4.0, "p90_ms": 4.0, "iqr_ms": 0.0, "mean_ms": 4.0, "min_ms": 4.0,
        "n": 1, "rel_spread": 0.0,
    }  # fmt: skip


def test_stats_from_the_harness_match_the_injected_times() -> None:
    clock = FakeClock()
    stats = time_interleaved(
        {"x": clock.fn("x", [3.0, 1.0, 2.0])}, warmup=0, repeats=9, min_time_s=0, threads=1, clock=clock
    )["x"]
    assert stats.n == 9
    assert stats.median_ms == pytest.approx(2.0) and stats.mean_ms == pytest.approx(2.0)
    assert stats.min_ms == pytest.approx(1.0) and stats.p90_ms == pytest.approx(3.0)


def test_thread_count_is_fixed_while_timing_and_restored_after() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    target = 1 if before != 1 else 2
    time_interleaved({"x": lambda: seen.append(torch.get_num_threads())}, warmup=1, repeats=2, min_time_s=0,
                     threads=target)  # fmt: skip
    assert set(seen) == {target} and torch.get_num_threads() == before

    def boom() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        time_interleaved({"x": boom}, warmup=0, repeats=1, min_time_s=0, threads=target)
    assert torch.get_num_threads() == before


def test_default_threads_are_the_physical_cores() -> None:
    cores = timing.physical_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    seen: list[int] = []
    time_interleaved({"x": lambda: seen.append(torch.get_num_threads())}, warmup=0, repeats=1, min_time_s=0)
    assert seen == [cores]


def test_functions_run_under_inference_mode() -> None:
    seen: list[bool] = []
    time_interleaved({"x": lambda: seen.append(torch.is_inference_mode_enabled())}, repeats=1, min_time_s=0)
    assert all(seen) and not torch.is_inference_mode_enabled()


def test_compare_gives_ratio_of_medians_and_environment() -> None:
    clock = FakeClock()
    result = compare(
        clock.fn("dense", [6.0, 9.0, 6.0]),
        clock.fn("dynamic", [2.0, 3.0, 100.0]),  # an outlier moves the mean, not the median
        batch_size=4,
        warmup=0,
        repeats=3,
        min_time_s=0,
        threads=1,
        clock=clock,
    )
    assert result["dense"].median_ms == pytest.approx(6.0) and result["dynamic"].median_ms == pytest.approx(
        3.0
    )
    assert result["speedup"] == pytest.approx(2.0)
    assert result["threads"] == 1
    env = result["environment"]
    assert env["threads"] == 1 and env["batch_size"] == 4 and env["device"] == "cpu"
    assert {"torch", "python", "cpu_model", "commit", "date", "dtype"} <= set(env)


def test_compare_pairs_the_calls_of_each_round_for_the_speedup_spread() -> None:
    # Rounds 1..10: the host slows both calls of round k by k (drift); dynamic is always 2x faster.
    clock = FakeClock()
    drift = [float(k) for k in range(1, 11)]
    result = compare(
        clock.fn("dense", [4.0 * k for k in drift]),
        clock.fn("dynamic", [2.0 * k for k in drift]),
        warmup=0,
        repeats=10,
        min_time_s=0,
        threads=1,
        clock=clock,
    )
    # The drift spreads each latency over 2-40 ms but cancels in every per-round ratio.
    assert result["speedup_spread"] == {"p10": pytest.approx(2.0), "p90": pytest.approx(2.0), "n": 10}
    assert result["dense"].p90_ms / result["dense"].p10_ms > 3


def test_paired_spread_quantiles_and_errors() -> None:
    spread = timing.paired_spread([float(k) for k in range(1, 12)], [1.0] * 11)  # ratios 1..11
    assert spread == {"p10": pytest.approx(2.0), "p90": pytest.approx(10.0), "n": 11}
    assert timing.paired_spread([1.0], [0.0])["p90"] == math.inf
    with pytest.raises(ValueError, match="dense_ms, dynamic_ms"):
        timing.paired_spread([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="dense_ms, dynamic_ms"):
        timing.paired_spread([], [])


def test_speedup_edge_cases() -> None:
    zero, one = LatencyStats.from_samples([0.0]), LatencyStats.from_samples([1.0])
    assert timing.speedup(one, zero) == math.inf
    assert math.isnan(timing.speedup(zero, zero))
    assert timing.speedup(one, LatencyStats.from_samples([4.0])) == 0.25


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"fns": {}}, ValueError, "fns"),
        ({"fns": [lambda: None]}, TypeError, "fns"),
        ({"fns": {"x": 3}}, TypeError, r"fns\['x'\]"),
        ({"fns": {1: lambda: None}}, TypeError, "fns"),
        ({"warmup": -1}, ValueError, "warmup"),
        ({"repeats": 0}, ValueError, "repeats"),
        ({"repeats": 2.5}, TypeError, "repeats"),
        ({"repeats": 10, "max_repeats": 5}, ValueError, "max_repeats"),
        ({"min_time_s": -1.0}, ValueError, "min_time_s"),
        ({"min_time_s": float("nan")}, ValueError, "min_time_s"),
        ({"min_time_s": "1"}, TypeError, "min_time_s"),
        ({"threads": 0}, ValueError, "threads"),
        ({"device": "nope"}, ValueError, "device"),
        ({"device": "meta"}, ValueError, "device"),
    ],
)
def test_bad_arguments_give_clear_errors(kwargs, error, match) -> None:
    args = {"fns": {"x": lambda: None}, "repeats": 1, "min_time_s": 0, **kwargs}
    with pytest.raises(error, match=match):
        time_interleaved(args.pop("fns"), **args)


def test_cuda_without_cuda_and_clock_on_cuda_rejected(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device: CUDA"):
        time_interleaved({"x": lambda: None}, device="cuda", repeats=1, min_time_s=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="clock"):
        time_interleaved({"x": lambda: None}, device="cuda", repeats=1, min_time_s=0, clock=lambda: 0.0)


def test_bad_samples_and_quantiles_rejected() -> None:
    with pytest.raises(ValueError, match="samples_ms"):
        LatencyStats.from_samples([])
    with pytest.raises(ValueError, match="samples_ms"):
        LatencyStats.from_samples([1.0, -2.0])
    with pytest.raises(ValueError, match="q"):
        timing.quantile([1.0], 1.5)


def test_imports_with_torch_and_the_standard_library_only() -> None:
    """The GPU machines have torch but no pydantic or rich: importing the harness must not need them."""
    code = (
        "import sys; import catalog.timing; "
        "bad = [m for m in ('pydantic', 'rich', 'yaml', 'jinja2') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_steady_allocator_stops_fresh_mappings_of_large_tensors() -> None:
    """After ``steady_allocator`` a 16 MB tensor comes from the heap, not from a fresh mmap (glibc).

    Checked in a fresh process, as ``catalog bench`` measures every entry, with glibc's ``mallinfo2``:
    ``hblks`` counts the live blocks malloc mapped separately.
    """
    code = (
        "import ctypes, platform, torch\n"
        "from catalog import timing\n"
        "class Info(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena ordblks smblks hblks hblkhd usmblks fsmblks '\n"
        "                                              'uordblks fordblks keepcost').split()]\n"
        "def mapped(t):\n"
        "    f = ctypes.CDLL(None).mallinfo2\n"
        "    f.restype = Info\n"
        "    return f().hblks\n"
        "if platform.libc_ver()[0] != 'glibc':\n"
        "    print(timing.steady_allocator(), '|', 0, '|', 0)\n"
        "else:\n"
        "    before = mapped(torch.empty(4 * 2**20))\n"
        "    state = timing.steady_allocator()\n"
        "    assert state == timing.steady_allocator()\n"
        "    print(state, '|', before, '|', mapped(torch.empty(4 * 2**20)))\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    state, before, after = (part.strip() for part in done.stdout.strip().split("|"))
    import platform

    if platform.libc_ver()[0] != "glibc":
        assert state == "default"
        return
    assert state == "glibc malloc: mmap off, trim threshold 1 GiB"
    # the live tensor is one more mapped block by default, none once the allocator keeps its memory
    assert int(after) == int(before) - 1, (before, after)
