"""Provenance of a measurement: the machine, the software and the code it ran on.

Depends on torch and the standard library only (no pydantic), so the GPU benchmark scripts can use it
on machines that have only torch and Triton.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else platform's best guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: Path = REPO_ROOT) -> str:
    """The checked-out commit (with ``-dirty`` when tracked files outside ``catalog/results`` changed), or
    ``unknown``. Result files do not count: a benchmark writing its results one by one would otherwise
    mark every later result of the same run dirty.

    ``DYNNET_COMMIT`` overrides it (a tree copied to a GPU machine may carry an older ``.git``);
    without git, ``GITHUB_SHA`` names it.
    """
    if os.environ.get("DYNNET_COMMIT"):  # set explicitly (e.g. a copied tree whose .git is older)
        return os.environ["DYNNET_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)catalog/results"],
            cwd=root, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GITHUB_SHA", "unknown")


def triton_version() -> str | None:
    """Triton's version if installed (imported lazily, only when asked)."""
    try:
        import triton  # noqa: PLC0415

        return triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def device_name(device: str | torch.device) -> str:
    """Human name of the device: the GPU's name, or the CPU model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def environment(
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    layout: str = "contiguous",
    batch_size: int | None = None,
) -> dict:
    """Everything needed to judge whether two measurements are comparable."""
    device = torch.device(device)
    return {
        "device": device.type,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "dtype": str(dtype).replace("torch.", ""),
        "layout": layout,
        "batch_size": batch_size,
        "platform": f"{sys.platform}-{platform.machine()}",
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
