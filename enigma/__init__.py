"""Enigma: an exact, position-dependent invertible network modelled on the Enigma cipher machine."""

from .invertible import InvertibleModule
from .machine import Enigma
from .plugboard import Plugboard
from .reflector import Reflector
from .rev_block import RevBlock
from .reversible import ReversibleSequence
from .rotor import DynamicInvertibleConv1x1Stack, InvertibleConv1x1, InvertibleConv1x1Stack

__all__ = [
    "DynamicInvertibleConv1x1Stack",
    "Enigma",
    "InvertibleConv1x1",
    "InvertibleConv1x1Stack",
    "InvertibleModule",
    "Plugboard",
    "Reflector",
    "RevBlock",
    "ReversibleSequence",
]
__version__ = "0.1.0"
