"""The results store: one JSON file per entry and environment, machine-written, committed.

``catalog/results/<id>/<device>-<device name>.json`` holds every measurement (operating point x batch
size) taken in one ``catalog bench`` run on that device, with the environment and the hash of the code
that produced it. Never hand-edited; CI recomputes every stored MAC count.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from catalog.env import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "catalog" / "results"
SCHEMA_VERSION = 1
_SHARED_ENV_KEYS = ("device", "device_name", "cpu_model", "threads", "python", "torch", "triton", "cuda",
                    "platform", "commit", "date", "allocator")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "unknown"


def result_path(entry_id: str, environment: dict, root: Path = RESULTS_DIR) -> Path:
    name = f"{environment['device']}-{slug(environment['device_name'])}.json"
    return root / entry_id / name


def record(entry_id: str, code_hash: str, measurements: list[dict[str, Any]]) -> dict[str, Any]:
    """One result document: shared environment on top, per-measurement details below."""
    if not measurements:
        raise ValueError("measurements: nothing to record")
    env = measurements[0]["environment"]
    shared = {k: env.get(k) for k in _SHARED_ENV_KEYS}
    rows = []
    for m in measurements:
        row = dict(m)
        menv = row.pop("environment")
        row["dtype"], row["layout"] = menv.get("dtype"), menv.get("layout")
        rows.append(row)
    return {"schema_version": SCHEMA_VERSION, "id": entry_id, "code_hash": code_hash,
            "environment": shared, "measurements": rows}


def write(document: dict[str, Any], root: Path = RESULTS_DIR) -> Path:
    """Write atomically (temp file, then rename): a crash never leaves a half-written result."""
    path = result_path(document["id"], document["environment"], root)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(entry_id: str | None = None, root: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Every stored result document (of one entry, or of all), sorted by path."""
    folder = root / entry_id if entry_id else root
    if not folder.exists():
        return []
    docs = []
    for path in sorted(folder.rglob("*.json")):
        if path.parent.name == "kernels":
            continue
        doc = json.loads(path.read_text())
        doc["_path"] = str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
        docs.append(doc)
    return docs
