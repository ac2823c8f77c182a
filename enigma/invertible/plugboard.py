"""The plugboard: a fixed channel permutation made of disjoint pair swaps."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from .base import InvertibleModule, permute, zero_log_det


class Plugboard(InvertibleModule):
    """Swaps ``num_plugs`` disjoint channel pairs, like the cables of the real plugboard.

    A product of disjoint transpositions is its own inverse (``P = P^T = P^-1``), so forward and
    inverse are the same gather and the log-det is 0. The wiring is drawn from ``seed`` and stored
    as an index buffer, so it travels with ``state_dict``.
    """

    def __init__(self, d: int, num_plugs: int | None = None, seed: int = 0):
        super().__init__()
        if d < 2:
            raise InputError(f"d={d}: the plugboard needs at least 2 channels")
        num_plugs = d // 2 if num_plugs is None else num_plugs
        if not 0 <= num_plugs <= d // 2:
            raise InputError(
                f"num_plugs={num_plugs} must be between 0 and d // 2 = {d // 2} "
                "(each plug swaps two distinct channels)"
            )
        g = torch.Generator().manual_seed(seed)
        ends = torch.randperm(d, generator=g)[: 2 * num_plugs]
        wiring = torch.arange(d)
        wiring[ends[0::2]] = ends[1::2]
        wiring[ends[1::2]] = ends[0::2]
        self.d, self.num_plugs = d, num_plugs
        self.register_buffer("wiring", wiring)

    def _forward(self, x: Tensor, positions: Tensor):
        y = permute(x, -1, self.wiring.expand(x.shape))  # P is its own inverse
        return y, zero_log_det(y)

    _inverse = _forward

    rebuilds_with_vjp = True

    def rebuild_and_backprop(self, out: Tensor, grad_out: Tensor | None, reverse: bool, params):
        """For the reversible backward: the input is ``P out`` and its gradient ``P grad_out``
        (``P`` is symmetric and its own inverse); one gather each, no parameters."""
        x = out.index_select(-1, self.wiring)
        grad = None if grad_out is None else grad_out.index_select(-1, self.wiring)
        return x, grad, ()

    def extra_repr(self) -> str:
        return f"d={self.d}, num_plugs={self.num_plugs}"
