"""The contract every invertible part of the machine follows.

Each module maps ``x`` of shape ``(..., d)`` at integer token ``positions`` and knows its
inverse and its log|det J|. Subclasses implement ``_forward`` and ``_inverse``; the public
``forward / inverse / *_and_log_det`` derive from them. There is no mutable state: the same call
always gives the same answer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import InputError


def default_positions(x: Tensor) -> Tensor:
    """``arange(L)`` along dim -2 for input with 3 or more dims, 0 for ``(N, d)`` input."""
    if x.dim() >= 3:
        return torch.arange(x.shape[-2], device=x.device)
    return torch.zeros((), dtype=torch.long, device=x.device)


def resolve_positions(x: Tensor, positions: Tensor | int | None) -> Tensor:
    """Validate ``positions`` against ``x`` and return an integer tensor broadcastable to it."""
    if positions is None:
        return default_positions(x)
    if not isinstance(positions, Tensor):
        positions = torch.as_tensor(positions, device=x.device)
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError(
            f"positions must be an integer tensor, got dtype {positions.dtype}; "
            "pass token indices, e.g. torch.arange(L)"
        )
    batch_shape = tuple(x.shape[:-1])
    try:
        shape = torch.broadcast_shapes(positions.shape, batch_shape)
    except RuntimeError:
        shape = None
    if shape != batch_shape:
        raise ValueError(
            f"positions of shape {tuple(positions.shape)} do not broadcast to the token shape "
            f"{batch_shape} of x {tuple(x.shape)}; pass shape (L,) or one matching x.shape[:-1]"
        )
    return positions.to(x.device)


def check_even_dim(d: int, what: str = "d") -> None:
    if d <= 0 or d % 2:
        raise InputError(
            f"{what}={d} must be a positive even number: the coupling blocks split channels in "
            f"half; use {what}={d + 1 if d > 0 else 2}"
        )


class InvertibleModule(nn.Module):
    """Base class: ``forward / inverse / forward_and_log_det / inverse_and_log_det``.

    Subclasses implement ``_forward`` and ``_inverse``, each returning ``(out, log_det)`` with
    ``log_det`` of shape ``x.shape[:-1]``. Every direction goes through ``__call__`` so module hooks
    (DeepSpeed ZeRO-3 parameter gathering among them) fire in both.
    """

    def _forward(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inverse(self, y: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(
        self,
        x: Tensor,
        positions: Tensor | int | None = None,
        *,
        reverse: bool = False,
        with_log_det: bool = False,
        shared: dict | None = None,
    ):
        """``shared``: a dict one chain passes to all its steps, for what a module forms once per
        chain however often the chain uses it (the rotors' matrices); most modules ignore it."""
        positions = resolve_positions(x, positions)
        out, log_det = self._run(x, positions, reverse, shared)
        return (out, log_det) if with_log_det else out

    def _run(self, x: Tensor, positions: Tensor, reverse: bool, shared: dict | None):
        return self._inverse(x, positions) if reverse else self._forward(x, positions)

    def inverse(self, y: Tensor, positions: Tensor | int | None = None) -> Tensor:
        return self(y, positions, reverse=True)

    def forward_and_log_det(
        self, x: Tensor, positions: Tensor | int | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(y, log|det dy/dx|)``."""
        return self(x, positions, with_log_det=True)

    def inverse_and_log_det(
        self, y: Tensor, positions: Tensor | int | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dy|)`` for ``x = inverse(y)``."""
        return self(y, positions, reverse=True, with_log_det=True)


def zero_log_det(x: Tensor) -> Tensor:
    """Log-det of a volume-preserving map: zeros of shape ``x.shape[:-1]``, without a copy."""
    return x.new_zeros(()).expand(x.shape[:-1])


class _Permute(torch.autograd.Function):
    """``x.gather(dim, index)`` for an ``index`` that permutes along ``dim``. The gradient of a
    permutation is the permutation back, one more gather with ``back``; autograd's backward of
    ``gather`` would zero-fill and scatter-add instead (atomics on a GPU, and a kernel that
    compiled code cannot fuse)."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, index: Tensor, back: Tensor | None) -> Tensor:
        ctx.save_for_backward(index, back)
        ctx.dim = dim
        return x.gather(dim, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, back = ctx.saved_tensors
        if back is None:  # an involution: the way back is the same
            return _Permute.apply(grad, ctx.dim, index, None), None, None, None
        return _Permute.apply(grad, ctx.dim, back, index), None, None, None


def permute(x: Tensor, dim: int, index: Tensor, back: Tensor | None = None) -> Tensor:
    """``x.gather(dim, index)`` where ``index`` permutes along ``dim`` and ``back`` is its
    inverse (``x.gather(dim, index).gather(dim, back) == x``), both shaped as ``x``; no ``back``
    when ``index`` is its own inverse."""
    return _Permute.apply(x, dim, index, back)
