"""The models built on the machine: EnigmaLM (its config, attention and reversible layers) and
EnigmaFlow."""
