"""The machine and its invertible parts: plugboard, rotors, coupling blocks, reflector, the
reversible chain that rebuilds activations in backward, and their common contract."""
