"""`catalog new`: an entry that validates and an implementation skeleton following Contract 2."""

from __future__ import annotations

from pathlib import Path

from catalog import vocab

ENTRY_TEMPLATE = """\
# yaml-language-server: $schema=../../entry.schema.json
id: {id}
title: 'TODO: the paper title as printed'
authors:
  - 'TODO: First Author'
year: {year}
venue: 'TODO: venue and year, e.g. CVPR 2021'
paper:
  url: https://arxiv.org/abs/0000.00000
code: []
taxonomy:
  category: {category}
  granularity: {granularity}
  decision: gate
  training: [supervised]
  tags: []
summary: >-
  TODO: two to four sentences in your own words: what is dynamic, what decides it, how the decision
  is trained, and what the paper applies it to.
real_speedup_reported:
  status: unknown
reported: []
corrections: []
verification:
  confidence: low
  sources:
    - https://arxiv.org/abs/0000.00000
  unconfirmed:
    - Every field above is a placeholder until checked against the paper.
implementation:
  status: planned
"""

MODULE_TEMPLATE = '''\
"""# {id}

TODO: paper title and link.

**What is dynamic:** TODO (the unit that is run or skipped, what decides it, and when).

**Simplifications against the paper:** TODO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Config:
    """Defaults run on CPU in well under a second; `keep_rate` is the operating-point knob."""

    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    width: int = 16
    keep_rate: float = 0.5


class Model(nn.Module):
    """TODO: the dynamic network. forward(x (N, C, H, W)) -> (logits (N, classes), info)."""

    def __init__(self, cfg: Config, dynamic: bool = True):
        super().__init__()
        self.cfg, self.dynamic = cfg, dynamic
        self.stem = nn.Conv2d(cfg.in_channels, cfg.width, 3, padding=1)
        self.head = nn.Linear(cfg.width, cfg.num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        h = torch.relu(self.stem(x)).mean(dim=(2, 3))
        return self.head(h), {{"aux_loss": h.new_zeros(())}}


def build(cfg: Config | None = None) -> nn.Module:
    return Model(cfg or Config(), dynamic=True)


def build_baseline(cfg: Config | None = None) -> nn.Module:
    return Model(cfg or Config(), dynamic=False)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    return torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size)


def summarize(info: dict) -> dict:
    """Human-readable decision statistics for `python -m catalog run`."""
    return {{}}
'''

_DEFAULT_GRANULARITY = {
    "overview": "none", "depth": "layer", "channel": "channel", "spatial": "pixel",
    "resolution": "resolution", "transformer": "token", "dynamic_weights": "weight",
    "quantization": "precision", "moe": "expert", "video": "frame",
}


def scaffold(entry_id: str, category: str, entries_dir: Path, impl_dir: Path, year: int) -> list[Path]:
    """Write the entry and the module skeleton; refuse to overwrite. Returns the paths written."""
    if category not in vocab.CATEGORIES:
        raise ValueError(f"--category: {category!r} is not one of {', '.join(vocab.CATEGORIES)}")
    entry_path = entries_dir / category / f"{entry_id}.yaml"
    module_path = impl_dir / category / f"{entry_id}.py"
    for path in (entry_path, module_path):
        if path.exists():
            raise FileExistsError(f"{path} already exists; nothing was written")
    entry_path.parent.mkdir(parents=True, exist_ok=True)
    module_path.parent.mkdir(parents=True, exist_ok=True)
    init = module_path.parent / "__init__.py"
    written = []
    entry_path.write_text(ENTRY_TEMPLATE.format(
        id=entry_id, category=category, year=year, granularity=_DEFAULT_GRANULARITY[category]))
    written.append(entry_path)
    module_path.write_text(MODULE_TEMPLATE.format(id=entry_id))
    written.append(module_path)
    if not init.exists():
        init.write_text("")
        written.append(init)
    return written
