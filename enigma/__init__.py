"""Enigma: an exact, position-dependent invertible network modelled on the Enigma cipher machine."""

from .flow import EnigmaFlow
from .invertible import InvertibleModule
from .lm import EnigmaLM
from .lm_config import PRESETS, EnigmaConfig
from .machine import Enigma
from .plugboard import Plugboard
from .reflector import Reflector
from .rev_block import RevBlock
from .reversible import ReversibleSequence
from .rotor import DynamicInvertibleConv1x1Stack, InvertibleConv1x1, InvertibleConv1x1Stack

__all__ = [
    "DynamicInvertibleConv1x1Stack",
    "Enigma",
    "EnigmaConfig",
    "EnigmaFlow",
    "EnigmaLM",
    "InvertibleConv1x1",
    "InvertibleConv1x1Stack",
    "InvertibleModule",
    "PRESETS",
    "Plugboard",
    "Reflector",
    "RevBlock",
    "ReversibleSequence",
]
__version__ = "0.1.0"
