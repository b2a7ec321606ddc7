"""Shared pytest setup: the repository root is importable and every test starts from fixed seeds."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _deterministic_seeds() -> None:
    """Seed Python's, numpy's and torch's generators before every test."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
