"""Enigma: an exact, position-dependent invertible network modelled on the Enigma cipher machine.

The packages: ``invertible`` (the machine and its parts), ``models`` (EnigmaLM, its config and
layers, EnigmaFlow), ``inference`` (generation and chat), ``train`` (pretraining, fine-tuning,
sweeps), ``data``, ``cluster`` (Ray), ``storage`` (storage paths, locks, atomic replacement) and
``benchmarks``. Exports resolve lazily, so ``enigma.data`` (used inside Ray Data workers) runs
without importing torch or the models.
"""

from importlib import import_module

_EXPORTS = {
    "DynamicInvertibleConv1x1Stack": "invertible.rotor",
    "Enigma": "invertible.machine",
    "EnigmaConfig": "models.lm_config",
    "EnigmaFlow": "models.flow",
    "EnigmaLM": "models.lm",
    "InvertibleConv1x1": "invertible.rotor",
    "InvertibleConv1x1Stack": "invertible.rotor",
    "InvertibleModule": "invertible.base",
    "PRESETS": "models.lm_config",
    "Plugboard": "invertible.plugboard",
    "Reflector": "invertible.reflector",
    "RevBlock": "invertible.rev_block",
    "ReversibleSequence": "invertible.reversible",
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
