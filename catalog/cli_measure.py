"""``run`` and ``bench``: execute implementations and measure them (dense vs dynamic in one process;
``bench`` of several entries runs each in a fresh process)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from catalog.cli import UsageError, _console, _entry, _load

RUN_KEYS = ("id", "config", "device", "batch_size", "macs_dense", "macs_dynamic", "mac_reduction",
            "params_dense", "params_dynamic", "latency_ms_dense", "latency_ms_dynamic", "speedup",
            "realization", "environment")


def _device(name: str):
    import torch  # noqa: PLC0415

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: {name!r} is not a device (use cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: cuda was asked for but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: {name!r} is not supported (use cpu or cuda)")
    return device


def _point(entry, name: str | None):
    points = entry.implementation.operating_points
    if name is None:
        return points[0] if points else None
    for point in points:
        if point.name == name:
            return point
    known = ", ".join(p.name for p in points) or "none"
    raise UsageError(f"--point: {entry.id} has no operating point {name!r}; known: {known}")


def _config(module, entry, point_name: str | None, assignments: list[str], train: bool = False):
    """The Config to run: the operating point (the first unless named) plus `--set`. With `--train` and
    no `--point`, the module's default Config (sized for the digits), since operating points may be
    ImageNet-sized backbones that would take hours to train on a CPU."""
    from catalog import knobs  # noqa: PLC0415

    point = None if train and point_name is None else _point(entry, point_name)
    try:
        cfg = knobs.apply(module.Config, dict(point.knobs) if point else {})
    except knobs.KnobError as exc:
        raise UsageError(f"{entry.id}: operating point {point.name!r}: {exc}") from None
    try:
        return knobs.apply(module.Config, knobs.parse_assignments(assignments), base=cfg), point
    except knobs.KnobError as exc:
        message = str(exc)
        raise UsageError(message if message.startswith("--set") else f"--set {message}") from None


def _fmt_macs(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.3f} {unit}"
    return f"{value:.0f}"


def _fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def print_measurement(entry, result: dict, console) -> None:
    from rich.table import Table  # noqa: PLC0415

    spread = result["latency_spread"]
    table = Table(title=f"{entry.id}: dense vs dynamic ({result['device']}, batch {result['batch_size']})")
    table.add_column("")
    table.add_column("dense", justify="right")
    table.add_column("dynamic", justify="right")
    table.add_column("ratio", justify="right")
    table.add_row("MACs / sample (executed)", _fmt_macs(result["macs_dense"]), _fmt_macs(result["macs_dynamic"]),
                  f"{_fmt(result['mac_reduction'])}x fewer")
    table.add_row("params", f"{result['params_dense']:,}", f"{result['params_dynamic']:,}", "")
    lat = (f"{result['latency_ms_dense']:.3f} [{spread['dense']['p10_ms']:.3f}-{spread['dense']['p90_ms']:.3f}]",
           f"{result['latency_ms_dynamic']:.3f} [{spread['dynamic']['p10_ms']:.3f}-{spread['dynamic']['p90_ms']:.3f}]")
    paired = result.get("speedup_spread")
    faster = f"{_fmt(result['speedup'])}x faster"
    if paired:
        faster += f" [{_fmt(paired['p10'])}-{_fmt(paired['p90'])}]"
    table.add_row("latency ms, median [p10-p90]", *lat, faster)
    table.add_row("realization (speedup / MAC reduction)", "", "", _fmt(result["realization"]))
    if "accuracy_dense" in result:
        table.add_row("digits test accuracy (after --train)", f"{100 * result['accuracy_dense']:.1f}%",
                      f"{100 * result['accuracy_dynamic']:.1f}%", "")
    console.print(table)
    env = result["environment"]
    console.print(f"device: {env['device_name']} | threads {env['threads']} | torch {env['torch']} | "
                  f"commit {env['commit'][:12]} | {env['date']}", markup=False)
    config = ", ".join(f"{k}={v}" for k, v in result["config"].items())
    where = f"operating point {result['operating_point']}" if result.get("operating_point") else "default Config"
    console.print(f"config ({where}): {config}", markup=False)
    if result.get("decisions"):
        console.print("decisions taken:", markup=False)
        for key, value in result["decisions"].items():
            console.print(f"  {key}: {value}", markup=False)


def cmd_run(args: argparse.Namespace) -> int:
    from catalog.measure import ImplementationError, load_module, measure  # noqa: PLC0415

    entry = _entry(_load(), args.id)
    if entry.implementation.status == "planned":
        raise UsageError(f"{entry.id} has no implementation yet (status 'planned'); "
                         f"`python -m catalog list --status runs` lists the runnable ones")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: must be >= 1, got {args.batch_size}")
    device = _device(args.device)
    try:
        module = load_module(entry)
    except ImplementationError as exc:
        raise UsageError(str(exc)) from None
    cfg, point = _config(module, entry, args.point, args.set or [], train=args.train)
    console = _console(stderr=args.json)
    trained = None
    if args.train:
        from implementations.common.train import train_and_compare  # noqa: PLC0415

        console.print(f"training dense and dynamic {entry.id} on scikit-learn digits ...", markup=False)
        trained = train_and_compare(module, cfg)
    models = (trained.pop("model_dense"), trained.pop("model_dynamic")) if trained else None
    test_x = trained.pop("x_test") if trained else None
    if trained:
        trained.pop("y_test")
    result = measure(module, cfg, args.batch_size, device, seed=args.seed, min_time_s=args.min_time,
                     models=models, count_inputs=test_x)
    result = {"id": entry.id, "operating_point": point.name if point else None, "device": device.type, **result}
    if trained:
        result.update(trained)
        result["macs_measured_on"] = f"the {len(test_x)} digits test images (trained models)"
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print_measurement(entry, result, console)
    return 0


def child_command(entry_id: str, args: argparse.Namespace) -> list[str]:
    """The ``python -m catalog bench <id> --in-process ...`` line that benches one entry on its own."""
    cmd = [sys.executable, "-m", "catalog", "bench", entry_id, "--in-process", "--device", args.device,
           "--batch-sizes", *(str(b) for b in args.batch_sizes), "--seed", str(args.seed),
           "--min-time", str(args.min_time)]
    if args.results_dir:
        cmd += ["--results-dir", str(Path(args.results_dir).resolve())]
    return cmd


def bench_in_child(entry_id: str, args: argparse.Namespace) -> Path:
    """Bench one entry in a fresh Python process; the path it wrote, or RuntimeError with its error line.

    Each entry then starts from the state a user's ``python -m catalog run`` starts from: no caches,
    allocator history or thread pools left by the entries measured before it in a long run.
    """
    import subprocess  # noqa: PLC0415

    from catalog.env import REPO_ROOT  # noqa: PLC0415

    done = subprocess.run(child_command(entry_id, args), capture_output=True, text=True, check=False,
                          cwd=REPO_ROOT)
    paths = [line.removeprefix("wrote ").strip() for line in done.stdout.splitlines() if line.startswith("wrote ")]
    if done.returncode == 0 and paths:
        return Path(paths[-1])
    lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
    mine = [ln.removeprefix(f"{entry_id}: ") for ln in lines if ln.startswith(f"{entry_id}: ")]
    raise RuntimeError(mine[-1] if mine else (lines[-1] if lines else f"exit status {done.returncode}"))


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.progress import Progress  # noqa: PLC0415

    from catalog.measure import bench_entry  # noqa: PLC0415

    entries = _load()
    if args.all:
        chosen = [e for e in entries if e.implementation.status != "planned"]
    elif args.ids:
        chosen = [_entry(entries, name) for name in args.ids]
    else:
        raise UsageError("give entry ids or --all")
    if any(b < 1 for b in args.batch_sizes):
        raise UsageError(f"--batch-sizes: must be >= 1, got {args.batch_sizes}")
    device = _device(args.device)
    root = Path(args.results_dir) if args.results_dir else None
    console = _console(stderr=True)
    isolate = len(chosen) > 1 and not args.in_process  # one entry: this process is already a fresh one
    failures: list[str] = []
    written = []
    with Progress(console=console, transient=False) as progress:
        task = progress.add_task("bench", total=len(chosen))
        for entry in chosen:
            progress.update(task, description=f"bench {entry.id}")
            try:
                if isolate:
                    written.append(bench_in_child(entry.id, args))
                else:
                    written.append(bench_entry(entry, root, device, tuple(args.batch_sizes), args.seed,
                                               args.min_time))
            except Exception as exc:  # noqa: BLE001 - one failing entry must not stop the others
                reason = str(exc) if isolate else f"{type(exc).__name__}: {exc}"
                failures.append(f"{entry.id}: {reason}")
                progress.console.print(f"FAILED {entry.id}: {reason}", markup=False)
            progress.advance(task)
    for path in written:
        print(f"wrote {path}")
    if failures:
        print(f"{len(failures)} of {len(chosen)} entries failed:", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help="run one method: dense vs dynamic MACs, params, latency, decisions")
    p.add_argument("id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a Config knob (repeatable)")
    p.add_argument("--point", help="start from this operating point of the entry (default: the first)")
    p.add_argument("--train", action="store_true", help="short training on scikit-learn digits first (on the default Config unless --point)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per model (default 1)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="measure implemented entries and write catalog/results/")
    p.add_argument("ids", nargs="*")
    p.add_argument("--all", action="store_true", help="every entry with an implementation")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--results-dir", help="write here instead of catalog/results/ (for trials)")
    p.add_argument("--in-process", action="store_true",
                   help="measure every entry in this process (default with several: a fresh process each)")
    p.set_defaults(func=cmd_bench)
