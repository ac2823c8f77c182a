"""``EnigmaConfig`` (a Hugging Face config) and the named presets."""

from __future__ import annotations

from transformers import PretrainedConfig

from ..errors import InputError

# name -> (model fields, training seq_len). Names are part of the interface.
PRESETS: dict[str, dict] = {
    "tiny": dict(d=128, num_transformer_layers=2, num_heads=4, num_rev_blocks=2, num_rotors=2),
    "small": dict(d=256, num_transformer_layers=4, num_heads=4, num_rev_blocks=2, num_rotors=2),
    "base": dict(d=512, num_transformer_layers=8, num_heads=8, num_rev_blocks=4, num_rotors=2),
    "large": dict(d=768, num_transformer_layers=12, num_heads=12, num_rev_blocks=6, num_rotors=4),
}
PRESET_SEQ_LEN = {"tiny": 128, "small": 256, "base": 256, "large": 256}
CORES = ("enigma", "none")
ROTOR_OFFSETS = ("zero", "random")
ROTOR_MATMULS = ("fp32", "bf16")
ATTENTION_KERNELS = ("auto", "sdpa", "flex")


def preset_fields(name: str) -> dict:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def _check_step_knobs(coupling_hidden: int, attention_kernel: str) -> None:
    if coupling_hidden < 0:
        raise InputError(f"coupling_hidden={coupling_hidden} must be >= 0 (0: d)")
    if attention_kernel not in ATTENTION_KERNELS:
        raise InputError(f"attention_kernel={attention_kernel!r} is not one of {ATTENTION_KERNELS}")


def _check_shape(d, num_heads, core, rotor_offset, rotor_matmul, vocab_size, max_len) -> None:
    if d % num_heads:
        raise InputError(
            f"d={d} is not divisible by num_heads={num_heads}; each head gets d / num_heads "
            f"channels, e.g. num_heads={next(h for h in (8, 4, 2, 1) if d % h == 0)}"
        )
    if core not in CORES:
        raise InputError(f"core={core!r} is not one of {CORES}")
    if rotor_offset not in ROTOR_OFFSETS:
        raise InputError(f"rotor_offset={rotor_offset!r} is not one of {ROTOR_OFFSETS}")
    if rotor_matmul not in ROTOR_MATMULS:
        raise InputError(f"rotor_matmul={rotor_matmul!r} is not one of {ROTOR_MATMULS}")
    for name, value in (("vocab_size", vocab_size), ("max_len", max_len)):
        if value < 1:
            raise InputError(f"{name}={value} must be positive")


def _resolve_backward(layers: bool, backward, machine_memory_efficient: bool, checkpointing):
    """``reversible_backward``: as given, or on with reversible layers or the old flag."""
    if backward is None:
        backward = bool(layers or machine_memory_efficient)
    elif machine_memory_efficient and not backward:
        raise InputError(
            "machine_memory_efficient=true and reversible_backward=false disagree (the first "
            "is the old name of the second); set only reversible_backward"
        )
    if layers and checkpointing:
        raise InputError(
            "reversible_layers=true rebuilds every layer in backward already; "
            "activation_checkpointing would recompute them again: set it false"
        )
    return backward


class EnigmaConfig(PretrainedConfig):
    """EnigmaLM's shape. ``core="none"`` (or 0 blocks and 0 rotors) is the plain Transformer.

    Args:
        vocab_size: Token ids the embedding and the tied head cover (21128, BERT-Chinese).
        d: Width of the embedding, the machine and the Transformer layers; even.
        num_rev_blocks: Coupling blocks of the machine (``F``'s RevBlocks); 0 leaves them out.
        num_rotors: Stepping rotors (invertible 1x1 convolutions); 0 leaves them out.
        num_transformer_layers: Pre-LN Transformer layers after the machine.
        num_heads: Attention heads; must divide ``d``.
        max_len: Longest sequence; the size of the learned position table when ``use_alibi`` is
            off. ALiBi extrapolates past it.
        use_alibi: ALiBi attention biases (distances) instead of learned absolute positions.
        use_dynamic_conv1x1: Rotors step with the token position (the machine's odometer);
            ``False`` keeps them still.
        rotor_positions: Settings of each rotor: a rotor turns by ``d / rotor_positions``
            channels per step, so it must divide ``d``; the machine repeats after
            ``rotor_positions ** num_rotors`` tokens. Saved configs may call it
            ``conv1x1_positions`` (the original's name), which is read as this.
        rotor_offset: Where training sequences start on the rotors: ``"zero"`` (every sequence at
            setting 0, so a slow rotor only sees the settings within ``seq_len`` tokens) or
            ``"random"`` (each sequence at a random position in ``[0, period)``, so every
            setting is trained). Generation starts at 0 either way; attention (ALiBi distances,
            learned 0-based positions) is unaffected.
        rotor_matmul: Precision of the rotors' per-token products: ``"fp32"`` (the machine
            inverts itself to about 1e-7) or ``"bf16"`` (tensor cores on a GPU, several times
            faster than fp32 there; the matrices are still formed and inverted in fp32, and the
            machine inverts itself to about 1e-3).
        core: ``"enigma"`` (the machine before the layers) or ``"none"`` (the plain Transformer).
        coupling: ``"additive"`` (volume-preserving) or ``"affine"`` RevBlock coupling.
        coupling_hidden: Hidden width of each coupling net of the machine; 0: ``d``. Half of
            ``d`` trims the machine's FLOPs (at ``base``, the plain Transformer's share of
            EnigmaLM's FLOPs goes from 0.87 to 0.92).
        attention_kernel: ``"auto"`` (FlexAttention, ALiBi as its score modifier and a causal
            block mask, when training on CUDA without padding or dropout, where SDPA's float bias
            would keep the fused kernels out; SDPA otherwise), ``"sdpa"`` or ``"flex"``
            (FlexAttention's backward needs CUDA).
        reversible_layers: The Transformer layers couple two streams RevNet-style
            (``y1 = x1 + Attention(LN(x2))``, ``y2 = x2 + MLP(LN(y1))``; see
            :mod:`enigma.models.rev_layers`), so the machine and the layers form one invertible
            chain. An architecture choice: the weights differ from the standard layers'.
        reversible_backward: Backward rebuilds the activations of the machine (and of the
            reversible layers) from the chain's output instead of storing them. ``None``: on
            with ``reversible_layers``, else ``machine_memory_efficient``. Changes no result:
            the same weights give the same gradients either way, up to rounding.
        machine_memory_efficient: The original's name for ``reversible_backward`` (accepted;
            always saved equal to it).
        machine_seed: Seed of the plugboard, reflector and coupling starts.
        mlp_ratio: Hidden width of each Transformer MLP, in multiples of ``d``.
        dropout: Dropout after attention and MLP.
        activation_checkpointing: Recompute each Transformer layer in backward (HF gradient
            checkpointing, or DeepSpeed's under ``enigma train``). Refused with
            ``reversible_layers``, whose backward rebuilds every layer already.
        initializer_range: Standard deviation of the normal start of linear and embedding weights.
        pad_token_id, bos_token_id, eos_token_id: Special token ids ([PAD], [SEP], [SEP]). The
            corpus is packed with [SEP] between documents, so [SEP] is both where a text ends
            and what a new one follows (GPT-2's convention with its one end-of-text token).
        tie_word_embeddings: The head shares the embedding matrix.
    """

    model_type = "enigma"
    # Old name -> current name; ``__init__`` accepts the old one so saved configs keep loading.
    renamed_keys = {"conv1x1_positions": "rotor_positions"}
    attribute_map = {
        "hidden_size": "d",
        "num_hidden_layers": "num_transformer_layers",
        "num_attention_heads": "num_heads",
        "max_position_embeddings": "max_len",
    }

    def __init__(
        self,
        vocab_size: int = 21128,
        d: int = 768,
        num_rev_blocks: int = 6,
        num_rotors: int = 4,
        num_transformer_layers: int = 12,
        num_heads: int = 12,
        max_len: int = 2048,
        use_alibi: bool = True,
        use_dynamic_conv1x1: bool = True,
        rotor_positions: int = 16,
        rotor_offset: str = "zero",
        rotor_matmul: str = "fp32",
        core: str = "enigma",
        coupling: str = "additive",
        coupling_hidden: int = 0,
        attention_kernel: str = "auto",
        reversible_layers: bool = False,
        reversible_backward: bool | None = None,
        machine_memory_efficient: bool = False,
        machine_seed: int = 0,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        activation_checkpointing: bool = False,
        initializer_range: float = 0.02,
        pad_token_id: int = 0,
        bos_token_id: int = 102,
        eos_token_id: int = 102,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        if "conv1x1_positions" in kwargs:  # a config saved before the rename
            rotor_positions = kwargs.pop("conv1x1_positions")
        _check_shape(d, num_heads, core, rotor_offset, rotor_matmul, vocab_size, max_len)
        self.vocab_size, self.d, self.max_len = vocab_size, d, max_len
        self.num_rev_blocks, self.num_rotors = num_rev_blocks, num_rotors
        self.num_transformer_layers, self.num_heads = num_transformer_layers, num_heads
        self.use_alibi, self.use_dynamic_conv1x1 = use_alibi, use_dynamic_conv1x1
        self.rotor_positions, self.core, self.coupling = rotor_positions, core, coupling
        _check_step_knobs(coupling_hidden, attention_kernel)
        self.coupling_hidden, self.attention_kernel = coupling_hidden, attention_kernel
        self.rotor_offset, self.rotor_matmul = rotor_offset, rotor_matmul
        reversible_backward = _resolve_backward(
            reversible_layers, reversible_backward, machine_memory_efficient,
            activation_checkpointing,
        )  # fmt: skip
        self.reversible_layers, self.reversible_backward = reversible_layers, reversible_backward
        self.machine_memory_efficient = reversible_backward  # the old name, kept in step
        self.machine_seed = machine_seed
        self.mlp_ratio, self.dropout = mlp_ratio, dropout
        self.activation_checkpointing = activation_checkpointing
        self.initializer_range = initializer_range
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def has_machine(self) -> bool:
        return self.core == "enigma" and (self.num_rev_blocks > 0 or self.num_rotors > 0)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> EnigmaConfig:
        """``EnigmaConfig.from_preset("tiny", num_rotors=0)``; unknown names list the known ones."""
        return cls(**{**preset_fields(name), **overrides})
