"""Compute-budget losses shared by methods that learn to spend less compute.

- `target_rate_loss`: ConvNet-AIG's loss, the squared gap between each gate's batch execution rate and
  a target rate, averaged over gates.
- `mac_budget_loss`: the same idea on the whole network's executed-MAC fraction.
- `ponder_cost`: Adaptive Computation Time's ponder cost `N + R`, averaged over samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _as_gate_matrix(gates: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(gates, Tensor):
        g = gates
    else:
        if len(gates) == 0:
            raise ValueError("gates must hold at least one gate")
        g = torch.stack([t.reshape(-1) for t in gates])
    if g.dim() != 2:
        raise ValueError(f"gates must be (G, N) or a list of (N,) tensors, got shape {tuple(g.shape)}")
    return g


def target_rate_loss(gates: Tensor | Sequence[Tensor], target: float | Tensor) -> Tensor:
    """ConvNet-AIG target-rate loss `mean_g (target_g - mean_n gate_{g,n})^2`.

    Args:
        gates: `(G, N)` gate values (0/1 with straight-through gradient) or a list of G `(N,)` tensors.
        target: scalar or `(G,)` target execution rate(s) in [0, 1].
    Returns:
        scalar loss.
    """
    g = _as_gate_matrix(gates)
    t = torch.as_tensor(target, dtype=g.dtype, device=g.device)
    if t.dim() not in (0, 1) or (t.dim() == 1 and t.numel() != g.shape[0]):
        raise ValueError(
            f"target must be a scalar or have one value per gate ({g.shape[0]}), got {tuple(t.shape)}"
        )
    if bool(((t < 0) | (t > 1)).any()):
        raise ValueError(f"target rates must lie in [0, 1], got {t.tolist()}")
    return ((t - g.mean(dim=1)) ** 2).mean()


def mac_budget_loss(macs: Tensor, dense_macs: float, target: float, *, one_sided: bool = False) -> Tensor:
    """Squared gap between the executed-MAC fraction and a budget.

    Args:
        macs: `(N,)` (differentiable, expected) executed MACs per sample.
        dense_macs: MACs of the dense network per sample (> 0).
        target: budget as a fraction of `dense_macs`, in (0, 1].
        one_sided: if True only spending above the budget is penalized.
    Returns:
        scalar `(mean(macs) / dense_macs - target)^2` (clamped at 0 from below when one-sided).
    """
    if dense_macs <= 0:
        raise ValueError(f"dense_macs must be > 0, got {dense_macs!r}")
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target!r}")
    gap = macs.mean() / dense_macs - target
    if one_sided:
        gap = gap.clamp_min(0)
    return gap**2


def ponder_cost(n_updates: Tensor, remainders: Tensor) -> Tensor:
    """ACT ponder cost `mean_n (N_n + R_n)`.

    Args:
        n_updates: `(N,)` number of steps each sample took (no gradient flows through it).
        remainders: `(N,)` remainder `R = 1 - sum of halting probabilities before the last step`.
    Returns:
        scalar cost; its gradient flows through `remainders` only, as in ACT.
    """
    if n_updates.shape != remainders.shape:
        raise ValueError(
            f"n_updates and remainders must have the same shape, got {tuple(n_updates.shape)} and "
            f"{tuple(remainders.shape)}"
        )
    return (n_updates.detach().to(remainders.dtype) + remainders).mean()
