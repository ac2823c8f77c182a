"""Enigma: an exact, position-dependent invertible network modelled on the Enigma cipher machine.

Exports resolve lazily, so ``enigma.data`` (used inside Ray Data workers) runs without importing
torch or the models.
"""

from importlib import import_module

_EXPORTS = {
    "DynamicInvertibleConv1x1Stack": "rotor",
    "Enigma": "machine",
    "EnigmaConfig": "lm_config",
    "EnigmaFlow": "flow",
    "EnigmaLM": "lm",
    "InvertibleConv1x1": "rotor",
    "InvertibleConv1x1Stack": "rotor",
    "InvertibleModule": "invertible",
    "PRESETS": "lm_config",
    "Plugboard": "plugboard",
    "Reflector": "reflector",
    "RevBlock": "rev_block",
    "ReversibleSequence": "reversible",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'enigma' has no attribute {name!r}")


def __dir__():
    return __all__
