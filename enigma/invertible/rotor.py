"""Rotors: LU-parametrised invertible 1x1 convolutions (Glow) that step with the token position.

A rotor at offset ``k`` applies ``S^-k W S^k``, where ``S`` cyclically shifts the channels by
``d / rotor_positions``: the wiring turns with the rotor, as in the real machine. With ``R``
settings per rotor (``rotor_positions``), rotor ``i`` sits at offset ``floor(t / R**i) mod R`` at
token position ``t`` (an odometer), so the stack is periodic in ``t`` with period
``R**num_rotors``.

All tokens go through each rotor in one GEMM: the per-token shift is a gather over channel blocks,
and the shifts of consecutive rotors compose, so ``n`` rotors cost ``n`` GEMMs and ``n + 1``
gathers; a turn's gradient is the turn back, one more gather. The inverse is computed once per
call by triangular solves and shared by every token; one chain (the machine's ``F`` and
``F^-1``) forms the matrices and the turns' indices once for all its uses of the stack, and the
inverse's backward is a matrix inverse's (two products), not the solves'.
Each rotor is applied as ``z + z A^T`` with ``A = W - I`` formed directly, so fp32 rounding scales
with how far the rotor has moved from the identity rather than with the activations.

``matmul="bf16"`` runs that per-token product ``z A^T`` in bf16 (tensor cores on a GPU, where an
fp32 GEMM runs several times slower than a bf16 one) while the matrices are still formed and
inverted in fp32 and the stream stays fp32: the product's rounding is then bf16's, scaled by the
small ``A``, so ``E^-1(E(x))`` comes back to about 1e-3 instead of 1e-7. fp64 input keeps fp64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.linalg import solve_triangular

from ..errors import InputError
from .base import InvertibleModule, permute


def _solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """Rotor algebra runs in fp32 at least: bf16/fp16 solves would break invertibility."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotor_offsets(positions: Tensor, num_rotors: int, rotor_positions: int) -> Tensor:
    """Odometer offsets, shape ``(num_rotors, *positions.shape)``: at token position ``t`` rotor
    ``i`` sits at ``floor(t / rotor_positions**i) mod rotor_positions``."""
    scale = rotor_positions ** torch.arange(num_rotors, device=positions.device)
    scale = scale.view(-1, *([1] * positions.dim()))
    return torch.div(positions.unsqueeze(0), scale, rounding_mode="floor") % rotor_positions


def _turn_indices(offsets: Tensor, rotor_positions: int, d: int) -> list[tuple[Tensor, Tensor]]:
    """The gather indices of one pass through the stack in layer order, from its ``offsets``
    ``(num_layers, n)``: turn to rotor 0's offset, on by the difference before each later rotor,
    and back from the last. Each turn comes with the index of the turn back (its inverse, its
    gradient), all in one pass, so a machine call makes them once for both its uses and both
    directions of autograd."""
    shifts = torch.cat([offsets[:1], offsets[1:] - offsets[:-1], -offsets[-1:]])
    ring = torch.arange(rotor_positions, device=offsets.device)
    both = (ring - torch.cat([shifts, -shifts])[..., None]) % rotor_positions
    both = both[..., None].expand(*both.shape, d // rotor_positions)
    turns = len(shifts)
    return [(both[k], both[turns + k]) for k in range(turns)]


def _turn(z: Tensor, index: Tensor, back: Tensor) -> Tensor:
    """Per-row cyclic shift of ``z``'s channels by whole blocks, as :func:`_turn_indices` says."""
    n, d = z.shape
    return permute(z.view(n, index.shape[1], -1), 1, index, back).view(n, d)


MATMULS = ("fp32", "bf16")


def _low(m: Tensor, bf16: bool) -> Tensor:
    return m.to(torch.bfloat16) if bf16 else m


def _plus_product(z: Tensor, a: Tensor, m: Tensor, bf16: bool) -> Tensor:
    """``z + a m``; with ``bf16`` (``m`` given in bf16) the product alone runs in bf16."""
    return z + (a.to(torch.bfloat16) @ m).to(z.dtype) if bf16 else torch.addmm(z, a, m)


def _lu_identity(n: int, d: int) -> dict[str, Tensor]:
    return {
        "pivot": torch.arange(d).repeat(n, 1),
        "lower": torch.zeros(n, d, d),
        "upper": torch.zeros(n, d, d),
        "sign": torch.ones(n, d),
        "log_s": torch.zeros(n, d),
    }


def _lu_orthogonal(n: int, d: int, seed: int, off_scale: float) -> dict[str, Tensor]:
    """Glow's start: the LU of random orthogonal matrices."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, d, d, generator=g, dtype=torch.float64))
    p, lo, up = torch.linalg.lu(q)
    diag = up.diagonal(dim1=-2, dim2=-1)
    return {
        "pivot": p.argmax(dim=-1),  # P[i, pivot[i]] = 1, so (P A)[i] = A[pivot[i]]
        "lower": (lo.tril(-1) / off_scale).float(),
        "upper": (up.triu(1) / off_scale).float(),
        "sign": diag.sign().float(),
        "log_s": diag.abs().log().float(),
    }


class _InverseDeviation(torch.autograd.Function):
    """``B = W^-1 - I = -U^-1 L^-1 P^T A`` from ``A = W - I`` by triangular solves, with the
    backward of a matrix inverse: ``dW^-1 = -W^-1 dW W^-1`` and ``dW = dA`` give
    ``dL/dA = -(I + B)^T G (I + B)^T``, two products where differentiating the solves costs two
    more solves and two products. ``B`` depends on the parameters through ``W`` alone, so ``A``
    carries the whole gradient and the factors (``W = P L U``) get none of their own."""

    @staticmethod
    def forward(ctx, deviation: Tensor, lower: Tensor, upper: Tensor, back: Tensor) -> Tensor:
        rhs = deviation.gather(1, back)  # P^T A
        inv = solve_triangular(lower, rhs, upper=False, unitriangular=True)
        inverse = -solve_triangular(upper, inv, upper=True)
        ctx.save_for_backward(inverse)
        return inverse

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):  # as exact as the forward
            inverse_t = inverse.transpose(1, 2)
            left = torch.baddbmm(grad, inverse_t, grad)  # (I + B)^T G
            return -torch.baddbmm(left, left, inverse_t), None, None, None


class DynamicInvertibleConv1x1Stack(InvertibleModule):
    """``num_layers`` rotors that step with the token position (see the module docstring).

    Rotor ``i`` has weight ``W_i = P_i L_i (U_i + diag(sign_i * exp(log_s_i)))`` and
    ``log|det W_i| = sum(log_s_i)``; conjugating by a shift leaves the determinant alone, so the
    log-det does not depend on the position.

    ``init="identity"`` (the default) starts every rotor at ``W = I``. Glow's usual start, the LU
    of a random orthogonal matrix (``init="orthogonal"``), has a badly conditioned ``L`` at large
    ``d`` and loses fp32 exactness. The off-diagonal factors are scaled by ``1/sqrt(d)``, so an
    optimiser step moves ``W`` by an operator-norm amount that does not grow with ``d``: this keeps
    ``L`` and ``U`` well conditioned through training.

    ``matmul="bf16"`` runs the per-token products in bf16 (see the module docstring).
    """

    def __init__(
        self,
        num_channels: int,
        num_layers: int,
        rotor_positions: int = 16,
        init: str = "identity",
        seed: int = 0,
        matmul: str = "fp32",
    ):
        super().__init__()
        d, n = num_channels, num_layers
        if matmul not in MATMULS:
            raise InputError(f"matmul={matmul!r} is not one of {MATMULS}")
        self.matmul = matmul
        if d < 1:
            raise InputError(f"num_channels={d} must be positive")
        if rotor_positions < 1 or d % rotor_positions:
            divisors = [p for p in (1, 2, 4, 8, 16, 32, 64) if d % p == 0]
            raise InputError(
                f"rotor_positions={rotor_positions} must divide num_channels={d}: a rotor turns "
                f"by num_channels / rotor_positions channels per step; pick one of {divisors}"
            )
        if n < 0:
            raise InputError(f"num_layers={n} must be >= 0")
        self.num_channels, self.num_layers, self.rotor_positions = d, n, rotor_positions
        self.off_scale = 1.0 / math.sqrt(d)
        if init == "identity":
            lu = _lu_identity(n, d)
        elif init == "orthogonal":
            lu = _lu_orthogonal(n, d, seed, self.off_scale)
        else:
            raise InputError(f"init={init!r} is not one of 'identity', 'orthogonal'")
        self.lower = nn.Parameter(lu["lower"])
        self.upper = nn.Parameter(lu["upper"])
        self.log_s = nn.Parameter(lu["log_s"])
        self.register_buffer("sign", lu["sign"])
        self.register_buffer("pivot", lu["pivot"])

    @property
    def period(self) -> int:
        """The map repeats after this many token positions."""
        return self.rotor_positions**self.num_layers

    def _deviation(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``A = W - I``, the factors ``L``, ``U`` and the row index of ``P^T`` (which undoes
        the pivot); ``A`` never adds ``I`` to small terms."""
        eye = torch.eye(self.num_channels, dtype=dtype, device=self.lower.device)
        strict_lower = self.lower.to(dtype).tril(-1) * self.off_scale
        log_s, sign = self.log_s.to(dtype), self.sign.to(dtype)
        diag_minus_one = torch.where(sign > 0, torch.expm1(log_s), -log_s.exp() - 1)
        upper_minus_eye = self.upper.to(dtype).triu(1) * self.off_scale
        upper_minus_eye = upper_minus_eye + torch.diag_embed(diag_minus_one)
        # L U - I = (U - I) + (L - I) U
        lu_minus_eye = upper_minus_eye + strict_lower @ (upper_minus_eye + eye)
        rows = self.pivot[:, :, None].expand(-1, -1, self.num_channels)
        back = torch.argsort(self.pivot, dim=-1)[:, :, None].expand(-1, -1, self.num_channels)
        deviation = permute(lu_minus_eye + eye, 1, rows, back) - eye
        return deviation, strict_lower + eye, upper_minus_eye + eye, back

    def weights(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """All rotor matrices ``W``, shape ``(num_layers, d, d)``."""
        return self._deviation(dtype)[0] + torch.eye(
            self.num_channels, dtype=dtype, device=self.lower.device
        )

    def _inverse_deviation(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``A = W - I`` and ``B = W^-1 - I = -U^-1 L^-1 P^T A`` by triangular solves."""
        factors = self._deviation(dtype)
        return factors[0], self._solve_inverse(*factors)

    def _solve_inverse(self, deviation: Tensor, lower: Tensor, upper: Tensor, back: Tensor):
        return _InverseDeviation.apply(deviation, lower, upper, back)

    def _matrices(self, dtype: torch.dtype, reverse: bool, store: dict | None) -> Tensor:
        """``A = W - I``, or ``B = W^-1 - I`` for ``reverse``, each formed at most once per
        ``store`` (this stack's part of one chain's shared dict); the inverse reuses ``A``."""
        made = {} if store is None else store
        if "factors" not in made:
            made["factors"] = self._deviation(dtype)
        if not reverse:
            return made["factors"][0]
        if "inverse" not in made:
            made["inverse"] = self._solve_inverse(*made["factors"])
        return made["inverse"]

    def inverse_weights(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """All ``W^-1`` (no ``torch.inverse``)."""
        return self._inverse_deviation(dtype)[1] + torch.eye(
            self.num_channels, dtype=dtype, device=self.lower.device
        )

    def _run(self, x: Tensor, positions: Tensor, reverse: bool, shared: dict | None):
        # The involutive machine uses the stack in F and again, inverted, in F^-1: one chain's
        # ``shared`` dict lets both uses form the matrices and the turns once.
        return self._rotate(x, positions, reverse, shared)

    def _turns(
        self, positions: Tensor, batch_shape: torch.Size, reverse: bool, store: dict | None
    ) -> list[tuple[Tensor, Tensor]]:
        """``(index, back)`` for each turn of one pass (see :func:`_turn_indices`), kept in
        ``store`` (one chain call or one backward: the same positions and shape throughout).
        The inverse pass makes the same turns backwards: its turns are the forward pass's turns
        back, in reverse order."""
        turns = None if store is None else store.get("turns")
        if turns is None:
            flat = positions.expand(batch_shape).reshape(-1)
            offsets = rotor_offsets(flat, self.num_layers, self.rotor_positions)
            turns = _turn_indices(offsets, self.rotor_positions, self.num_channels)
            if store is not None:
                store["turns"] = turns
        return [(b, a) for a, b in reversed(turns)] if reverse else turns

    def _rotate(
        self, x: Tensor, positions: Tensor, reverse: bool, shared: dict | None = None
    ) -> tuple[Tensor, Tensor]:
        batch_shape = x.shape[:-1]
        dtype = _solve_dtype(x.dtype)
        if self.num_layers == 0:
            return x, x.new_zeros((), dtype=dtype).expand(batch_shape)
        store = None if shared is None else shared.setdefault((id(self), dtype), {})
        stepping = self.rotor_positions > 1
        turns = self._turns(positions, batch_shape, reverse, store) if stepping else None
        order = reversed(range(self.num_layers)) if reverse else range(self.num_layers)
        with torch.autocast(x.device.type, enabled=False):
            # Rotors stay near the identity, so apply z + z A^T with A = W - I (or W^-1 - I):
            # rounding then scales with the small deviation, not with z.
            mats = self._matrices(dtype, reverse, store)
            bf16 = self._bf16(dtype)
            mats = _low(mats, bf16).transpose(1, 2)
            z = x.reshape(-1, self.num_channels).to(dtype)
            for k, i in enumerate(order):
                if stepping:
                    z = _turn(z, *turns[k])
                z = _plus_product(z, z, mats[i], bf16)
            if stepping:
                z = _turn(z, *turns[-1])
            log_det = self.log_s.to(dtype).sum()
        log_det = -log_det if reverse else log_det
        return z.to(x.dtype).reshape(x.shape), log_det.expand(batch_shape)

    def rebuild_and_backprop(
        self, out: Tensor, grad_out: Tensor, reverse: bool, positions: Tensor, pending: dict
    ) -> tuple[Tensor, Tensor]:
        """For the memory-efficient backward of this stack used as a step (``reverse``: its
        inverse): rebuild the step's input from its output layer by layer with the inverse
        matrices, and backpropagate ``grad_out`` in the same pass (``z_out = z_in + z_in Mᵀ``
        gives ``g_in = g_out + g_out M`` and ``∂L/∂M = g_outᵀ z_in``), so nothing runs forward
        again; the rebuild is the same arithmetic as :meth:`inverse`. The matrices are built
        once per backward (the involutive machine uses the stack twice) and their gradients
        gathered in ``pending``; :meth:`parameter_grads` turns them into the parameters'."""
        dtype, shape, d = _solve_dtype(out.dtype), out.shape, self.num_channels
        order = list(reversed(range(self.num_layers))) if reverse else list(range(self.num_layers))
        entry = pending.get(id(self))
        if entry is None:
            with torch.autocast(out.device.type, enabled=False), torch.enable_grad():
                mats = self._inverse_deviation(dtype)  # (W - I, W⁻¹ - I), with their graph
            entry = pending[id(self)] = {"mats": mats, "grads": [None, None], "log_det": 0.0}
        step, back = (entry["mats"][1], entry["mats"][0]) if reverse else entry["mats"]
        stepping = self.rotor_positions > 1
        turns = self._turns(positions, shape[:-1], reverse, entry) if stepping else None
        with torch.autocast(out.device.type, enabled=False), torch.no_grad():
            bf16 = self._bf16(dtype)
            mats, undo = _low(step.detach(), bf16), _low(back.detach(), bf16).transpose(1, 2)
            z, g = out.detach().reshape(-1, d).to(dtype), grad_out.reshape(-1, d).to(dtype)
            if stepping:  # the pass ended by turning back from the last frame: undo that
                z, g = (_turn(t, *turns[-1][::-1]) for t in (z, g))
            grad_mats = torch.zeros_like(step, requires_grad=False)
            for k in reversed(range(len(order))):
                i = order[k]
                z = _plus_product(z, z, undo[i], bf16)  # this layer's input
                g_low = _low(g, bf16)  # cast once: the matrices' gradient and g's both use it
                grad_mats[i] = g_low.T @ _low(z, bf16)
                g = _plus_product(g, g_low, mats[i], bf16)
                if stepping:
                    z, g = (_turn(t, *turns[k][::-1]) for t in (z, g))
        slot = 1 if reverse else 0
        done = entry["grads"][slot]
        entry["grads"][slot] = grad_mats if done is None else done + grad_mats
        return z.to(out.dtype).reshape(shape), g.to(grad_out.dtype).reshape(shape)

    def _bf16(self, dtype: torch.dtype) -> bool:
        """Whether the per-token products run in bf16 (asked for, and the stream not fp64)."""
        return self.matmul == "bf16" and dtype == torch.float32

    def parameter_grads(self, entry: dict, params: list[Tensor], log_det_grad) -> tuple:
        """The gradients of ``params`` from what :meth:`rebuild_and_backprop` gathered, plus
        ``log_det_grad`` (the summed gradient of ``sum(log_s)``, the log-det) on ``log_s``. A
        frozen stack (no ``params``) has none to give."""
        if not params:
            return ()
        pairs = [
            (m, g) for m, g in zip(entry["mats"], entry["grads"], strict=True) if g is not None
        ]
        grads = list(torch.autograd.grad([m for m, _ in pairs], params, [g for _, g in pairs],
                                         allow_unused=True))  # fmt: skip
        if torch.is_tensor(log_det_grad):
            for j, p in enumerate(params):
                if p is self.log_s:
                    extra = log_det_grad.to(p.dtype).expand_as(p)
                    grads[j] = extra if grads[j] is None else grads[j] + extra
        return tuple(grads)

    def _forward(self, x: Tensor, positions: Tensor):
        return self._rotate(x, positions, reverse=False)

    def _inverse(self, y: Tensor, positions: Tensor):
        return self._rotate(y, positions, reverse=True)

    def extra_repr(self) -> str:
        return (
            f"num_channels={self.num_channels}, num_layers={self.num_layers}, "
            f"rotor_positions={self.rotor_positions}, matmul={self.matmul!r}"
        )


class InvertibleConv1x1Stack(DynamicInvertibleConv1x1Stack):
    """``num_layers`` fixed (non-stepping) 1x1 convolutions: rotors with ``rotor_positions=1``."""

    def __init__(
        self,
        num_channels: int,
        num_layers: int,
        init: str = "identity",
        seed: int = 0,
        matmul: str = "fp32",
    ):
        super().__init__(
            num_channels, num_layers, rotor_positions=1, init=init, seed=seed, matmul=matmul
        )


class InvertibleConv1x1(InvertibleConv1x1Stack):
    """One LU-parametrised invertible 1x1 convolution (Glow)."""

    def __init__(self, num_channels: int, init: str = "identity", seed: int = 0):
        super().__init__(num_channels, 1, init=init, seed=seed)
