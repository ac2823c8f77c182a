"""EnigmaFlow: a normalizing flow whose transform is an invertible machine.

``log p(x) = log p_Z(z) + log|det dz/dx|`` with ``z = machine(x)``, exactly: the machine reports
the log-det of every rotor, coupling scale and reflection it applies.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..invertible.base import InvertibleModule

PRIORS = ("gaussian",)


class EnigmaFlow(nn.Module):
    """``EnigmaFlow(Enigma(d, involutive=False, coupling="affine"))`` for density estimation.

    Data go ``x -> z`` through the machine's forward map, samples come back through its inverse.
    ``positions`` (default 0 for ``(N, d)`` data) selects the rotors' offsets.
    """

    def __init__(self, enigma_model: InvertibleModule, prior: str = "gaussian"):
        super().__init__()
        if prior not in PRIORS:
            raise InputError(f"prior={prior!r} is not one of {PRIORS}")
        self.machine, self.prior = enigma_model, prior
        self.d = enigma_model.d

    def prior_log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * (z.square().sum(-1) + self.d * math.log(2 * math.pi))

    def log_prob(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """Exact log-density of ``x`` (shape ``(..., d)``), shape ``x.shape[:-1]``."""
        z, log_det = self.machine.forward_and_log_det(x, positions)
        return self.prior_log_prob(z) + log_det

    @torch.no_grad()
    def sample(self, num_samples: int, positions: Tensor | None = None) -> Tensor:
        param = next(self.machine.parameters())
        z = torch.randn(num_samples, self.d, device=param.device, dtype=param.dtype)
        return self.machine.inverse(z, positions)

    def bits_per_dim(self, x: Tensor, log_scale: float = 0.0) -> Tensor:
        """Mean negative log2-likelihood per dimension. ``log_scale`` adds the log-det of a fixed
        preprocessing ``x = raw * exp(log_scale)`` per dimension, so the figure is in raw units."""
        nll = -(self.log_prob(x) + self.d * log_scale)
        return nll.mean() / (self.d * math.log(2))


def fit(
    flow: EnigmaFlow,
    batches: Iterator[Tensor],
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    clip: float = 5.0,
) -> list[float]:
    """Maximum-likelihood training: ``steps`` AdamW steps on ``-log_prob``; returns the losses."""
    opt = torch.optim.AdamW(flow.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    losses = []
    flow.train()
    for _ in range(steps):
        loss = -flow.log_prob(next(batches)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(flow.parameters(), clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses
