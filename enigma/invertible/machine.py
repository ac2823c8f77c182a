"""The Enigma machine: ``E_t = F_t^-1 o U o F_t`` with ``F_t = RevBlocks o R_t o P``."""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import InputError
from .base import InvertibleModule, check_even_dim
from .plugboard import Plugboard
from .reflector import Reflector
from .rev_block import RevBlock
from .reversible import Step, apply_chain, invert_chain
from .rotor import DynamicInvertibleConv1x1Stack, InvertibleConv1x1Stack


class Enigma(InvertibleModule):
    """Plugboard -> rotors -> blocks -> reflector -> blocks back -> rotors back -> plugboard back.

    The path of the current through the real machine. With ``involutive=True`` the map is its own
    inverse at every position (``E_t(E_t(x)) = x``): the same machine encrypts and decrypts.
    ``involutive=False`` gives the open map ``F_t`` (no reflector) for flows and ablations.

    ``log|det J_E(x)| = log|det J_F(x)| - log|det J_F(E(x))|``, which is 0 when ``F`` is
    volume-preserving (additive coupling). ``num_rev_blocks=0`` or ``num_rotors=0`` leave that part
    out. ``dynamic=False`` keeps the rotors still (no stepping). ``rotor_matmul="bf16"`` runs the
    rotors' per-token products in bf16 (faster on GPUs, invertible to about 1e-3; see
    :mod:`enigma.invertible.rotor`).
    """

    def __init__(
        self,
        d: int,
        num_rev_blocks: int = 4,
        num_rotors: int = 2,
        rotor_positions: int = 16,
        involutive: bool = True,
        coupling: str = "additive",
        memory_efficient: bool = True,
        num_plugs: int | None = None,
        num_reflections: int = 1,
        seed: int = 0,
        hidden: int | None = None,
        dynamic: bool = True,
        rotor_init: str = "identity",
        rotor_matmul: str = "fp32",
    ):
        super().__init__()
        check_even_dim(d)
        for name, value in (("num_rev_blocks", num_rev_blocks), ("num_rotors", num_rotors)):
            if value < 0:
                raise InputError(f"{name}={value} must be >= 0 (0 leaves the part out)")
        if dynamic and num_rotors and (rotor_positions < 1 or d % rotor_positions):
            raise InputError(
                f"d={d} is not divisible by rotor_positions={rotor_positions}: each rotor step "
                f"turns the wiring by d / rotor_positions channels; choose a divisor of d"
            )
        self.d, self.involutive, self.memory_efficient = d, involutive, memory_efficient
        self.plugboard = Plugboard(d, num_plugs=num_plugs, seed=seed)
        if dynamic:
            self.rotors = DynamicInvertibleConv1x1Stack(
                d, num_rotors, rotor_positions, init=rotor_init, seed=seed, matmul=rotor_matmul
            )
        else:
            self.rotors = InvertibleConv1x1Stack(
                d, num_rotors, init=rotor_init, seed=seed, matmul=rotor_matmul
            )
        self.blocks = nn.ModuleList(
            RevBlock(d, coupling=coupling, hidden=hidden, seed=seed + 1 + i)
            for i in range(num_rev_blocks)
        )
        self.reflector = Reflector(d, num_reflections, seed=seed) if involutive else None

    @property
    def period(self) -> int:
        """The map repeats after this many token positions."""
        return self.rotors.period

    def open_chain(self) -> list[Step]:
        """``F_t``: plugboard, rotors, blocks."""
        steps: list[Step] = [(self.plugboard, False)]
        if self.rotors.num_layers:
            steps.append((self.rotors, False))
        steps += [(block, False) for block in self.blocks]
        return steps

    def chain(self) -> list[Step]:
        """The whole path of the current as ``(module, reverse)`` steps."""
        steps = self.open_chain()
        if not self.involutive:
            return steps
        return steps + [(self.reflector, False)] + invert_chain(steps)

    def _forward(self, x: Tensor, positions: Tensor):
        self._check_width(x)
        return apply_chain(self.chain(), x, positions, self.memory_efficient)

    def _inverse(self, y: Tensor, positions: Tensor):
        self._check_width(y)
        return apply_chain(invert_chain(self.chain()), y, positions, self.memory_efficient)

    def _check_width(self, x: Tensor) -> None:
        if x.shape[-1] != self.d:
            raise ValueError(
                f"input has {x.shape[-1]} channels in its last dim but the machine has d={self.d}"
            )

    def extra_repr(self) -> str:
        return f"d={self.d}, involutive={self.involutive}, memory_efficient={self.memory_efficient}"
