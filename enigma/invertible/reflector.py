"""The reflector: ``U = I - 2 V V^T`` with orthonormal ``V`` (d x k), symmetric and orthogonal."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import InputError
from .base import InvertibleModule, zero_log_det


class Reflector(InvertibleModule):
    """Householder reflection across a learned ``d - k`` dimensional subspace.

    ``U`` is its own inverse (``U = U^T = U^-1``), which is what makes the whole machine an
    involution. ``|det U| = 1``, so the log-det is 0. ``V`` is the Q factor of a free ``d x k``
    parameter, so it stays orthonormal under any optimiser step.
    """

    def __init__(self, d: int, num_reflections: int = 1, seed: int = 0):
        super().__init__()
        if not 1 <= num_reflections <= d:
            raise InputError(f"num_reflections={num_reflections} must be between 1 and d={d}")
        g = torch.Generator().manual_seed(seed)
        self.d, self.num_reflections = d, num_reflections
        self.vectors = nn.Parameter(torch.randn(d, num_reflections, generator=g))

    def basis(self, dtype: torch.dtype) -> Tensor:
        v = self.vectors.to(dtype)
        if self.num_reflections == 1:
            return v / v.norm()
        return torch.linalg.qr(v).Q

    def _forward(self, x: Tensor, positions: Tensor):
        # Rank-k and cheap, so it runs in fp64: each output is then correctly rounded once, and
        # the reflection undoes itself to the last bit the input dtype can hold.
        with torch.autocast(x.device.type, enabled=False):
            v = self.basis(torch.float64)
            z = x.to(torch.float64)
            y = (z - 2.0 * (z @ v) @ v.T).to(x.dtype)
        return y, zero_log_det(y)

    _inverse = _forward

    rebuilds_with_vjp = True

    def rebuild_and_backprop(self, out: Tensor, grad_out: Tensor | None, reverse: bool, params):
        """For the reversible backward, in one pass: the input ``x = U out`` (the same fp64
        arithmetic as the forward), its gradient ``U grad_out`` (``U`` is symmetric), and the
        basis' gradient from ``y = x - 2 (x V) Vᵀ``: ``-2 (xᵀ (g V) + gᵀ (x V))``."""
        with torch.autocast(out.device.type, enabled=False):
            with torch.enable_grad():
                basis = self.basis(torch.float64)
            v = basis.detach()
            y = out.reshape(-1, self.d).to(torch.float64)
            x = y - 2.0 * (y @ v) @ v.T
            x_out = x.to(out.dtype).reshape(out.shape)
            if grad_out is None:
                return x_out, None, tuple(None for _ in params)
            # The gradient needs no more than its own precision (no round trip to undo).
            g = grad_out.reshape(-1, self.d)
            vg = v.to(g.dtype)
            gv = g @ vg
            grad = (g - 2.0 * gv @ vg.T).reshape(grad_out.shape)
            if not params:
                return x_out, grad, ()
            xg = x_out.reshape(-1, self.d).to(g.dtype)
            grad_basis = (-2.0 * (xg.T @ gv + g.T @ (xg @ vg))).to(basis.dtype)
            grads = torch.autograd.grad(basis, params, grad_basis, allow_unused=True)
        return x_out, grad, grads

    def extra_repr(self) -> str:
        return f"d={self.d}, num_reflections={self.num_reflections}"
