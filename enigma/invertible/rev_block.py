"""Coupling blocks on channel halves: additive (RevNet) and affine (RealNVP/Glow)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import InputError
from .base import InvertibleModule, check_even_dim, zero_log_det

COUPLINGS = ("additive", "affine")


class CouplingNet(nn.Sequential):
    """``Linear -> GELU -> Linear``; the last layer starts at zero, so the block starts as identity.

    No normalisation and no dropout: the memory-efficient backward runs this net again and must
    get the same function both times.
    """

    def __init__(self, d_in: int, hidden: int, d_out: int, generator: torch.Generator):
        first, last = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(d_in)
            first.weight.uniform_(-bound, bound, generator=generator)
            first.bias.uniform_(-bound, bound, generator=generator)
            last.weight.zero_()
            last.bias.zero_()
        super().__init__(first, nn.GELU(), last)

    def forward(self, h: Tensor) -> Tensor:
        # The net runs in its weights' precision (bf16 under DeepSpeed), the coupling stream stays
        # in the caller's (fp32): additive coupling is then exactly invertible whatever F's dtype.
        # A narrower output is left as it is: the coupling's add promotes it exactly, in the
        # same kernel, where a cast would be one more pass over it.
        out = super().forward(h.to(self[0].weight.dtype))
        narrower = out.dtype.itemsize < h.dtype.itemsize  # both floating: bf16/fp16 < fp32 < fp64
        return out if out.dtype == h.dtype or narrower else out.to(h.dtype)


class RevBlock(InvertibleModule):
    """``y1 = x1 + F(x2); y2 = x2 + G(y1)`` (additive, volume-preserving), or the affine version
    ``y1 = x1 * exp(s(x2)) + t(x2)`` with the log-scale bounded to ``(-scale_bound, scale_bound)``.
    """

    def __init__(
        self,
        d: int,
        coupling: str = "additive",
        hidden: int | None = None,
        scale_bound: float = 2.0,
        seed: int = 0,
    ):
        super().__init__()
        check_even_dim(d)
        if coupling not in COUPLINGS:
            raise InputError(f"coupling={coupling!r} is not one of {COUPLINGS}")
        half = d // 2
        hidden = d if hidden is None else hidden
        out = half if coupling == "additive" else 2 * half
        g = torch.Generator().manual_seed(seed)
        self.d, self.coupling, self.scale_bound = d, coupling, scale_bound
        self.f = CouplingNet(half, hidden, out, g)
        self.g = CouplingNet(half, hidden, out, g)

    def _shift_scale(self, net: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
        raw_s, t = net(h).to(h.dtype).chunk(2, dim=-1)
        return self.scale_bound * torch.tanh(raw_s / self.scale_bound), t

    def _forward(self, x: Tensor, positions: Tensor):
        x1, x2 = x.chunk(2, dim=-1)
        if self.coupling == "additive":
            y = additive_coupling(self.f, self.g, x, reverse=False)
            return y, zero_log_det(y)
        s1, t1 = self._shift_scale(self.f, x2)
        y1 = x1 * s1.exp() + t1
        s2, t2 = self._shift_scale(self.g, y1)
        y2 = x2 * s2.exp() + t2
        return torch.cat([y1, y2], dim=-1), s1.sum(-1) + s2.sum(-1)

    def _inverse(self, y: Tensor, positions: Tensor):
        y1, y2 = y.chunk(2, dim=-1)
        if self.coupling == "additive":
            x = additive_coupling(self.f, self.g, y, reverse=True)
            return x, zero_log_det(x)
        s2, t2 = self._shift_scale(self.g, y1)
        x2 = (y2 - t2) * (-s2).exp()
        s1, t1 = self._shift_scale(self.f, x2)
        x1 = (y1 - t1) * (-s1).exp()
        return torch.cat([x1, x2], dim=-1), -(s1.sum(-1) + s2.sum(-1))

    @property
    def rebuilds_with_vjp(self) -> bool:
        """Whether the reversible backward may use :meth:`rebuild_and_backprop` (additive only)."""
        return self.coupling == "additive"

    def rebuild_and_backprop(
        self, out: Tensor, grad_out: Tensor, reverse: bool, params: list[Tensor]
    ) -> tuple[Tensor, Tensor, tuple]:
        """See :func:`additive_rebuild_and_backprop`; ``f`` and ``g`` are this block's nets."""
        return additive_rebuild_and_backprop(self.f, self.g, out, grad_out, reverse, params)

    def extra_repr(self) -> str:
        return f"d={self.d}, coupling={self.coupling!r}"


def additive_coupling(f, g, x: Tensor, reverse: bool) -> Tensor:
    """``(x1, x2) -> (x1 + f(x2), x2 + g(y1))`` on the halves of the last dim, or its inverse
    ``(y1, y2) -> (y1 - f(x2), y2 - g(y1))`` with ``reverse``."""
    a, b = x.chunk(2, dim=-1)
    if reverse:
        b = b - g(a)
        a = a - f(b)
    else:
        a = a + f(b)
        b = b + g(a)
    return torch.cat([a, b], dim=-1)


def additive_rebuild_and_backprop(
    f, g, out: Tensor, grad_out: Tensor | None, reverse: bool, params: list[Tensor]
) -> tuple[Tensor, Tensor, tuple]:
    """The memory-efficient backward of one additive coupling step ``y1 = x1 + f(x2)``,
    ``y2 = x2 + g(y1)`` on the two halves of the last dim (``reverse``: the step is its inverse).

    Rebuilds the step's input from its output ``out`` and backpropagates ``grad_out`` through the
    step, taking the vector-Jacobian products of ``f`` and ``g`` while they run for the rebuild,
    so each runs once (RevNet's algorithm). Returns the input, its gradient and the gradients of
    ``params`` (None where unused). ``f`` and ``g`` must compute the same function as in the
    forward pass (a caller with dropout replays its random state)."""
    o1, o2 = out.detach().chunk(2, dim=-1)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    g1, g2 = grad_out.chunk(2, dim=-1)
    # Both halves of the input and of its gradient are written in place into one tensor each (no
    # concatenation); a half is written only once the graph that reads its neighbour is spent,
    # since views share one version counter.
    x = torch.empty_like(out, dtype=out.dtype)
    grad_x = torch.empty_like(grad_out)
    xa, xb = x.chunk(2, dim=-1)
    ga, gb = grad_x.chunk(2, dim=-1)
    with torch.enable_grad():
        if not reverse:  # out = (y1, y2): x2 = y2 - g(y1), x1 = y1 - f(x2)
            h1 = o1.detach().requires_grad_(True)
            g_out = g(h1)
            torch.sub(o2, g_out.detach(), out=xb)
            x2 = xb.detach().requires_grad_(True)
            f_out = f(x2)
            # y2 = x2 + g(y1), y1 = x1 + f(x2)
            gg = torch.autograd.grad(g_out, [h1, *params], g2, allow_unused=True)
            torch.add(g1, gg[0], out=ga)  # the gradient of y1
            fg = torch.autograd.grad(f_out, [x2, *params], ga, allow_unused=True)
            torch.add(g2, fg[0], out=gb)
            torch.sub(o1, f_out.detach(), out=xa)
            grads = [_add(a, b) for a, b in zip(gg[1:], fg[1:], strict=True)]
            return x, grad_x, tuple(grads)
        # reverse: out = (x1, x2) of the inverse; its input is (y1, y2) = forward(out)
        h2 = o2.detach().requires_grad_(True)
        f_out = f(h2)
        torch.add(o1, f_out.detach(), out=xa)
        y1 = xa.detach().requires_grad_(True)
        g_out = g(y1)
        # x1 = y1 - f(x2), x2 = y2 - g(y1)
        fg = torch.autograd.grad(f_out, [h2, *params], -g1, allow_unused=True)
        torch.add(g2, fg[0], out=gb)  # the gradient of x2
        gg = torch.autograd.grad(g_out, [y1, *params], -gb, allow_unused=True)
        torch.add(g1, gg[0], out=ga)
        torch.add(o2, g_out.detach(), out=xb)
        grads = [_add(a, b) for a, b in zip(fg[1:], gg[1:], strict=True)]
        return x, grad_x, tuple(grads)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b
