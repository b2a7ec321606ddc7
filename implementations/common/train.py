"""A small training loop for `python -m catalog run <id> --train`.

Every model follows Contract 2: `model(x)` returns `(output, info)`. The default loss is
`cross_entropy(output, y) + info.get("aux_loss", 0)`; a method module may define
`loss(output, info, target) -> Tensor` to replace it (e.g. BranchyNet's weighted sum over exits) and a
module-level `TRAIN = TrainSettings(...)` to change epochs, learning rate or batch size.
`model.train()` runs the method's relaxation, `evaluate` the hard, executing eval path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.data import batches, load_digits_split

LossFn = Callable[[Tensor, dict, Tensor], Tensor]
Progress = Callable[[int, int, float], None]


@dataclass
class TrainSettings:
    """How `train_and_compare` trains both networks (the same way)."""

    epochs: int = 4
    lr: float = 3e-3
    batch_size: int = 64
    optimizer: str = "adam"  # "adam" | "sgd"
    weight_decay: float = 0.0
    schedule: str = "cosine"  # "cosine" | "constant"
    seed: int = 0
    test_fraction: float = 0.25
    eval_batch_size: int = 512
    image_size: int | None = None  # digits resolution for training (None: the config's image_size)


def default_loss(output: Tensor, info: dict, target: Tensor) -> Tensor:
    """`cross_entropy(output, target) + info.get("aux_loss", 0)`; `output (N, K)`, `target (N,)`."""
    return F.cross_entropy(output, target) + info.get("aux_loss", 0.0)


def fit(
    model: nn.Module,
    data: tuple[Tensor, Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    progress: Progress | None = None,
) -> list[float]:
    """Train `model` in train mode on `data = (x (N, C, H, W), y (N,))`.

    Args:
        loss_fn: `(output, info, target) -> scalar`; `default_loss` when None.
        optimizer: "adam" or "sgd" (momentum 0.9, nesterov).
        schedule: "cosine" anneals the learning rate to 0 over all steps; "constant" keeps it.
        progress: called as `progress(epoch, epochs, mean_loss)` after each epoch.
        seed: shuffles the batches and seeds torch's global generator (the relaxations' noise).
    Batches of one sample are skipped (BatchNorm cannot train on them). Leaves the model in eval mode.

    Returns:
        the mean training loss of each epoch.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    x, y = data
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    steps = epochs * -(-len(x) // batch_size)

    def lr_factor(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * step / steps)) if schedule == "cosine" else 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    loss_fn = loss_fn or default_loss
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the relaxations' noise
    history = []
    model.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for xb, yb in batches(x, y, batch_size, shuffle=True, generator=gen):
            if len(xb) < 2:  # BatchNorm cannot train on a single sample
                continue
            output, info = model(xb)
            loss = loss_fn(output, info, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(xb)
            count += len(xb)
        history.append(total / max(count, 1))
        if progress is not None:
            progress(epoch + 1, epochs, history[-1])
    model.eval()
    return history


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 512) -> tuple[Tensor, list[dict]]:
    """Eval-mode predictions `(N,)` and the `info` of each batch (decisions, exits, ...)."""
    model.eval()
    preds, infos = [], []
    for start in range(0, len(x), batch_size):
        output, info = model(x[start : start + batch_size])
        preds.append(output.argmax(dim=1))
        infos.append(info)
    return torch.cat(preds), infos


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of the hard, executing eval path."""
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    preds, _ = predict(model, x, batch_size)
    return float((preds == y).float().mean())


def digits_for(cfg: Any, seed: int = 0, test_fraction: float = 0.25) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits split in `cfg`'s input format (`image_size`, `in_channels`; 10 classes)."""
    num_classes = getattr(cfg, "num_classes", 10)
    if num_classes != 10:
        raise ValueError(f"digits training needs num_classes=10, got {num_classes!r}")
    return load_digits_split(
        image_size=getattr(cfg, "image_size", 32),
        channels=getattr(cfg, "in_channels", 3),
        seed=seed,
        test_fraction=test_fraction,
    )


def train_and_compare(
    module: ModuleType,
    cfg: Any = None,
    settings: TrainSettings | None = None,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Train `module.build_baseline(cfg)` and `module.build(cfg)` the same way on the digits.

    Both start from the same seed, use `module.TRAIN` (or `settings`, or the defaults) and
    `module.loss` when defined. `progress(which, epoch, epochs, loss)` reports each epoch.
    When the settings name an `image_size`, the config's `image_size` is replaced by it (the digits are
    natively 8x8, so 8 trains a fully convolutional network 16x cheaper than at 32x32).

    Returns:
        JSON-safe numbers `accuracy_dense`, `accuracy_dynamic` (in [0, 1]), `train_seconds_dense`,
        `train_seconds_dynamic`, `epochs`, `n_train`, `n_test`, `image_size` (of the training and test
        images); and, for MAC measurement on the test set, the objects `model_dense`, `model_dynamic`
        (eval mode), `x_test`, `y_test`.
    """
    cfg = module.Config() if cfg is None else cfg
    s = settings or getattr(module, "TRAIN", None) or TrainSettings()
    if s.image_size is not None and getattr(cfg, "image_size", None) != s.image_size:
        if not (dataclasses.is_dataclass(cfg) and hasattr(cfg, "image_size")):
            raise ValueError(f"settings.image_size={s.image_size} needs a dataclass config with an image_size field")
        cfg = dataclasses.replace(cfg, image_size=s.image_size)
    loss_fn = getattr(module, "loss", None)
    x_tr, y_tr, x_te, y_te = digits_for(cfg, seed=s.seed, test_fraction=s.test_fraction)
    out: dict[str, Any] = {"epochs": s.epochs, "n_train": len(y_tr), "n_test": len(y_te), "image_size": x_te.shape[-1]}
    for which, builder in (("dense", module.build_baseline), ("dynamic", module.build)):
        torch.manual_seed(s.seed)
        model = builder(cfg)
        start = time.perf_counter()
        fit(
            model,
            (x_tr, y_tr),
            epochs=s.epochs,
            lr=s.lr,
            batch_size=s.batch_size,
            loss_fn=loss_fn,
            seed=s.seed,
            optimizer=s.optimizer,
            weight_decay=s.weight_decay,
            schedule=s.schedule,
            progress=None if progress is None else (lambda e, n, v, w=which: progress(w, e, n, v)),
        )
        out[f"train_seconds_{which}"] = time.perf_counter() - start
        out[f"accuracy_{which}"] = evaluate(model, x_te, y_te, s.eval_batch_size)
        out[f"model_{which}"] = model
    out["x_test"], out["y_test"] = x_te, y_te
    if os.environ.get(TRAIN_LOG_ENV):
        _log_run(os.environ[TRAIN_LOG_ENV], module, cfg, out)
    return out


TRAIN_LOG_ENV = "DYNNET_TRAIN_LOG"  # a path: every train_and_compare appends one JSON line there


def _log_run(path: str, module: ModuleType, cfg: Any, out: dict[str, Any]) -> None:
    """Append the run's accuracies and the executed-MAC fraction on the test set (for closing notes)."""
    from catalog.costs import count_macs  # noqa: PLC0415

    macs = {w: count_macs(out[f"model_{w}"], out["x_test"]) for w in ("dense", "dynamic")}
    name = getattr(module, "__name__", repr(module))  # a stand-in namespace has no __name__
    line = {"module": name, "config": repr(cfg), "epochs": out["epochs"], "image_size": out["image_size"],
            "accuracy_dense": out["accuracy_dense"], "accuracy_dynamic": out["accuracy_dynamic"],
            "executed_mac_fraction": macs["dynamic"] / macs["dense"],
            "train_seconds": out["train_seconds_dense"] + out["train_seconds_dynamic"]}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
