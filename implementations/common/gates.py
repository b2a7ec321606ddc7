"""Gates and gradient estimators for discrete compute decisions.

Pure functions plus one tiny helper class, shared by every method that turns a score into an on/off
(or one-of-k) decision:

- `gumbel_softmax`: one-of-k sample from logits with temperature; `hard=True` gives a one-hot forward
  pass with the soft sample's gradient (straight-through Gumbel-Softmax, Jang et al. 2017).
- `gumbel_sigmoid`: the two-class special case on a single logit (binary Concrete / logistic noise).
- `straight_through`, `ste_threshold`, `ste_sign`: hard forward value, identity (or soft) gradient.
- `hard_gate`: the deterministic eval decision (threshold on a probability or logit).
- `ReinforceBaseline`: score-function estimator `-log_prob * (reward - baseline)` with a moving-average
  baseline.

Shapes: any leading shape `(*)`; `dim` names the class axis where there is one.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-10


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")


def straight_through(soft: Tensor, hard: Tensor) -> Tensor:
    """Value of `hard` in the forward pass, gradient of `soft` in the backward pass.

    Args:
        soft: `(*)` differentiable relaxation.
        hard: `(*)` discrete value of the same shape (its gradient is ignored).
    Returns:
        `(*)` tensor equal to `hard`, with `d out / d soft = 1`.
    """
    if soft.shape != hard.shape:
        raise ValueError(
            f"soft and hard must have the same shape, got {tuple(soft.shape)} and {tuple(hard.shape)}"
        )
    return hard.detach() + (soft - soft.detach())  # exactly `hard` in floating point


def gumbel_noise(
    shape: torch.Size | tuple[int, ...], *, like: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Standard Gumbel samples `-log(-log(U))`, `U ~ Uniform(0, 1)`, with `like`'s dtype and device."""
    u = torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)
    neg_log_u = -torch.log(u.clamp_min(_EPS))  # Exp(1) samples, > 0
    return -torch.log(neg_log_u.clamp_min(_EPS))


def gumbel_softmax(
    logits: Tensor,
    tau: float = 1.0,
    *,
    hard: bool = True,
    dim: int = -1,
    noise: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Gumbel-Softmax sample over the `dim` axis.

    Args:
        logits: `(*, K, *)` unnormalized log-probabilities.
        tau: temperature > 0; lower is closer to one-hot.
        hard: if True the forward value is one-hot (argmax of the noisy logits) and the gradient is
            that of the soft sample (straight-through).
        noise: if False no Gumbel noise is added (a deterministic softmax / argmax).
        generator: optional random generator for reproducible samples.
    Returns:
        `(*, K, *)` sample, summing to 1 over `dim`.
    """
    _check_tau(tau)
    y = logits + gumbel_noise(logits.shape, like=logits, generator=generator) if noise else logits
    soft = torch.softmax(y / tau, dim=dim)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(dim, soft.argmax(dim=dim, keepdim=True), 1.0)
    return straight_through(soft, one_hot)


def gumbel_sigmoid(
    logits: Tensor,
    tau: float = 1.0,
    *,
    hard: bool = True,
    threshold: float = 0.5,
    noise: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Binary Gumbel (logistic-noise) sample of an on/off gate.

    Equivalent to a two-class Gumbel-Softmax on logits `(0, logit)`: the difference of two Gumbels is
    logistic noise `log(U) - log(1 - U)`.

    Args:
        logits: `(*)` gate logits (log-odds of "on").
        tau: temperature > 0.
        hard: forward value 1 where the soft sample exceeds `threshold`, else 0; soft gradient.
        threshold: cut-off on the soft sample for the hard value.
        noise: if False no logistic noise is added.
    Returns:
        `(*)` gate values in [0, 1] (exactly 0/1 when `hard`).
    """
    _check_tau(tau)
    if noise:
        u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
        u = u.clamp(_EPS, 1 - 1e-7)
        logits = logits + torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid(logits / tau)
    if not hard:
        return soft
    return straight_through(soft, (soft > threshold).to(soft.dtype))


def ste_threshold(x: Tensor, threshold: float = 0.0) -> Tensor:
    """Hard step `1[x > threshold]` forward, identity gradient backward (plain straight-through).

    Args:
        x: `(*)` scores (e.g. probabilities with `threshold=0.5`, or logits with `threshold=0`).
    Returns:
        `(*)` 0/1 tensor of `x`'s dtype whose gradient w.r.t. `x` is 1.
    """
    return straight_through(x, (x > threshold).to(x.dtype))


def ste_sign(x: Tensor) -> Tensor:
    """`sign(x)` in {-1, +1} forward (0 maps to +1), identity gradient backward."""
    return straight_through(x, torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x)))


def hard_gate(scores: Tensor, threshold: float = 0.5) -> Tensor:
    """Deterministic eval decision: bool `(*)` mask `scores > threshold` (no noise, no gradient)."""
    return scores.detach() > threshold


class ReinforceBaseline:
    """REINFORCE with a moving-average reward baseline.

    `loss(log_prob, reward)` returns `-mean(log_prob * (reward - b))` (to minimize) and then updates
    `b <- momentum * b + (1 - momentum) * mean(reward)`. The first call sets `b` to the batch mean.

    Args:
        momentum: in [0, 1); weight of the old baseline.
    """

    def __init__(self, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = momentum
        self.baseline: float | None = None

    def advantage(self, reward: Tensor) -> Tensor:
        """`(N,)` reward minus the current baseline (detached)."""
        b = reward.detach().mean() if self.baseline is None else reward.new_tensor(self.baseline)
        return reward.detach() - b

    def loss(self, log_prob: Tensor, reward: Tensor) -> Tensor:
        """Policy-gradient surrogate loss.

        Args:
            log_prob: `(N,)` log-probability of each sample's sampled decisions (differentiable).
            reward: `(N,)` reward per sample (treated as a constant).
        Returns:
            scalar loss whose gradient is the REINFORCE estimate of `-grad E[reward]`.
        """
        if log_prob.shape != reward.shape:
            raise ValueError(
                f"log_prob and reward must have the same shape, got {tuple(log_prob.shape)} and {tuple(reward.shape)}"
            )
        out = -(log_prob * self.advantage(reward)).mean()
        mean = float(reward.detach().mean())
        self.baseline = (
            mean if self.baseline is None else self.momentum * self.baseline + (1 - self.momentum) * mean
        )
        return out
