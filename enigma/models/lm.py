"""EnigmaLM: token embedding -> the machine at each token's position -> pre-LN Transformer -> head.

The machine acts per token at its position, so it is causal and needs no cache: cached decoding
runs it on the new token only. A token's position is the count of real tokens before it (from the
attention mask), so left padding moves no rotor; in training with ``rotor_offset="random"`` each
sequence starts at a random rotor setting. ``core="none"`` (or 0 blocks and 0 rotors) is the plain
Transformer that every comparison uses.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..invertible.machine import Enigma
from .attention import CausalSelfAttention, FlexPlan, attention_bias
from .lm_config import EnigmaConfig
from .loss import next_token_loss
from .remote_code import AUTO_MAP, write_remote_code
from .rev_layers import LayerContext, ReversibleStack


class TransformerBlock(GradientCheckpointingLayer):
    """Pre-LN block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``. With ``reversible_layers`` the
    same two branches couple two streams instead (:mod:`enigma.models.rev_layers`)."""

    def __init__(self, config: EnigmaConfig, layer_idx: int):
        super().__init__()
        d = config.d
        self.ln_attn = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, config.num_heads, layer_idx, config.dropout)
        self.ln_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, config.mlp_ratio * d), nn.GELU(), nn.Linear(config.mlp_ratio * d, d)
        )
        self.drop = nn.Dropout(config.dropout)

    def attention_branch(self, x: Tensor, bias: Tensor | None, is_causal: bool, cache=None):
        return self.drop(self.attn(self.ln_attn(x), bias, is_causal, cache=cache))

    def mlp_branch(self, x: Tensor) -> Tensor:
        return self.drop(self.mlp(self.ln_mlp(x)))

    def forward(self, x: Tensor, bias: Tensor | None, is_causal: bool, cache=None) -> Tensor:
        x = x + self.attention_branch(x, bias, is_causal, cache)
        return x + self.mlp_branch(x)


def build_machine(config: EnigmaConfig) -> Enigma:
    return Enigma(
        config.d,
        num_rev_blocks=config.num_rev_blocks,
        num_rotors=config.num_rotors,
        rotor_positions=config.rotor_positions,
        coupling=config.coupling,
        hidden=config.coupling_hidden or None,
        memory_efficient=config.reversible_backward,
        dynamic=config.use_dynamic_conv1x1,
        seed=config.machine_seed,
        rotor_matmul=config.rotor_matmul,
    )


class EnigmaPreTrainedModel(PreTrainedModel):
    config_class = EnigmaConfig
    base_model_prefix = "enigma"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' ``save_pretrained``, plus the modelling code beside the weights and
        ``auto_map`` naming it, so the directory loads without this project
        (:mod:`enigma.models.remote_code`)."""
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_code(Path(save_directory))


class EnigmaLM(EnigmaPreTrainedModel, GenerationMixin):
    """``EnigmaLM(config)`` or the original's ``EnigmaLM(vocab_size=21128, d=768, ...)``."""

    _tied_weights_keys = {"lm_head.weight": "embed.weight"}

    def __init__(self, config: EnigmaConfig | None = None, **kwargs):
        config = EnigmaConfig(**kwargs) if config is None else config
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d)
        self.pos_embed = None if config.use_alibi else nn.Embedding(config.max_len, config.d)
        machine = build_machine(config) if config.has_machine else None
        blocks = nn.ModuleList(
            TransformerBlock(config, i) for i in range(config.num_transformer_layers)
        )
        if config.reversible_layers:
            # The stack owns the machine and the layers (one reversible chain, one ZeRO-3 leaf);
            # ``self.machine`` and ``self.blocks`` name the same modules, unregistered here.
            self.stack = ReversibleStack(machine, blocks, config.reversible_backward)
            object.__setattr__(self, "machine", machine)
            object.__setattr__(self, "blocks", blocks)
        else:
            self.stack = None
            self.machine, self.blocks = machine, blocks
        self.norm = nn.LayerNorm(config.d)
        self.lm_head = nn.Linear(config.d, config.vocab_size, bias=False)
        self._loss = next_token_loss
        if self.machine is not None:
            # The machine has its own start (identity rotors, zero-ended couplings, seeded
            # plugboard); Hugging Face's generic init must leave it alone.
            for module in self.machine.modules():
                module._is_hf_initialized = True
        self.post_init()
        if config.activation_checkpointing:
            self.activation_checkpointing_enable({"use_reentrant": False})

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def check_token_ids(self, input_ids: Tensor) -> None:
        vocab = self.config.vocab_size
        if input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if not input_ids.numel():
            return
        low, high = (int(v) for v in torch.stack(torch.aminmax(input_ids)).tolist())  # one sync
        if low < 0 or high >= vocab:
            raise ValueError(
                f"token ids must lie in [0, vocab_size={vocab}); got min {low}, max {high}: "
                "is the tokenizer the one this model was built for?"
            )

    def forward(
        self,
        input_ids: Tensor | None = None,
        cache: DynamicCache | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        rows_to_keep: Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if input_ids is None:
            raise ValueError("EnigmaLM needs input_ids")
        if not (self.training and input_ids.device.type != "cpu"):
            # One host sync; skipped in training on an accelerator, where it would stall the
            # launch queue every step (the data pipeline checked the ids against the vocabulary).
            self.check_token_ids(input_ids)
        _, length = input_ids.shape
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        device = input_ids.device
        if position_ids is None:
            position_ids = token_positions(attention_mask, past, length, device)
        machine_positions = self.machine_positions(position_ids, input_ids.shape[0])
        h = self.embed(input_ids)
        if self.pos_embed is not None:
            if past + length > self.config.max_len:
                raise ValueError(
                    f"sequence of {past + length} tokens exceeds max_len={self.config.max_len} "
                    "of learned positions; use_alibi=True extrapolates to any length"
                )
            h = h + self.pos_embed(position_ids)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        bias, is_causal = self.attention_plan(attention_mask, past, length, device, cache)
        if self.stack is not None:
            replay = self.training and self.config.reversible_backward and self.stack.draws()
            context = LayerContext(bias, is_causal, cache, replay_rng=replay)
            stream = h.to(_at_least_fp32(h.dtype))
            h = self.stack(stream, machine_positions, context).to(h.dtype)
        else:
            if self.machine is not None:
                # The machine's coupling stream runs in fp32 for exact invertibility (bf16
                # weights are fine: see CouplingNet).
                stream = h.to(_at_least_fp32(h.dtype))
                h = self.machine(stream, machine_positions).to(h.dtype)
            for block in self.blocks:
                h = block(h, bias, is_causal, cache=cache)
        h = self.norm(h)
        if rows_to_keep is not None:  # the rows whose logits are wanted (a packed forward's)
            h = h[rows_to_keep]
        if isinstance(logits_to_keep, Tensor):  # one position per row: (B,) -> (B, 1, d)
            h = h[torch.arange(h.shape[0], device=device), logits_to_keep][:, None]
        elif logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None if labels is None else self._loss(logits, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    def compile_layers(self) -> None:
        """``torch.compile`` the Transformer blocks, the final norm, the head and the loss, in
        place (parameter names and checkpoints stay the same): on a GPU their many small ops
        are otherwise bound by kernel launches and memory traffic. Reversible layers run their
        branches inside the reversible chain, which is not compiled; their norm, head and loss
        are."""
        if self.stack is None:
            for block in self.blocks:
                block.compile()
            self.blocks_compiled = True  # FlexAttention fuses only inside compiled blocks
        self.norm.compile()
        self.lm_head.compile()
        self._loss = torch.compile(next_token_loss)

    def attention_plan(self, attention_mask, past: int, length: int, device, cache=None):
        """``(bias, is_causal)`` for the blocks: a FlexAttention plan with ALiBi as a score
        modifier where it applies, else SDPA's additive bias. A cache whose rows hold different
        lengths (the serving engine's :class:`~enigma.serve.kv_cache.SlotCache`) makes the
        bias itself, each row's distances its own."""
        ragged = getattr(cache, "attention_plan", None)
        if ragged is not None:
            return ragged(compute_dtype(device, self.lm_head.weight.dtype))
        if self.uses_flex(device, attention_mask, past):
            return FlexPlan.make(self.config.num_heads, length, device), False
        return attention_bias(
            self.config.num_heads, past, length, self.config.use_alibi, attention_mask,
            device, compute_dtype(device, self.lm_head.weight.dtype),
        )  # fmt: skip

    def uses_flex(self, device: torch.device, attention_mask, past: int) -> bool:
        """FlexAttention for this forward (see ``EnigmaConfig.attention_kernel``)."""
        c = self.config
        if c.attention_kernel != "auto":
            return c.attention_kernel == "flex"
        plain = attention_mask is None and past == 0 and c.use_alibi and c.dropout == 0
        compiled = getattr(self, "blocks_compiled", False)  # uncompiled, flex runs unfused
        return plain and compiled and self.training and device.type == "cuda"

    def machine_positions(self, positions: Tensor, batch: int) -> Tensor:
        """The positions the machine sees: the tokens' own, or in training with
        ``rotor_offset="random"`` shifted per sequence by a random start in ``[0, period)``, so
        every rotor setting is trained (drawn on the device: no host sync). Learned position
        embeddings keep the 0-based positions."""
        if not (self.training and self.config.rotor_offset == "random" and self.machine):
            return positions
        start = torch.randint(self.machine.period, (batch, 1), device=positions.device)
        return positions + start

    def zero3_leaves(self) -> list[nn.Module]:
        """Modules DeepSpeed ZeRO-3 must gather whole: the one whose call holds a reversible
        chain (its backward rebuilds the chain with every parameter of it)."""
        if not self.config.reversible_backward:
            return []
        owner = self.stack if self.stack is not None else self.machine
        return [owner] if owner is not None else []

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part: embedding (tied with the head), machine, blocks, norm."""
        count = lambda m: 0 if m is None else sum(p.numel() for p in m.parameters())  # noqa: E731
        parts = {
            "embedding": count(self.embed) + count(self.pos_embed),
            "machine": count(self.machine),
            "blocks": count(self.blocks),
            "final_norm": count(self.norm),
        }
        parts["total"] = sum(p.numel() for p in self.parameters())
        return parts


def token_positions(mask: Tensor | None, past: int, length: int, device) -> Tensor:
    """Each new token's position: the count of real tokens before it, from the attention mask
    over the cached and the new tokens (``(B, past + length)``), so a left-padded prompt gets
    the positions, and the rotor settings, it would get alone. Without a mask: ``past, past + 1,
    ...`` (shape ``(length,)``)."""
    if mask is None:
        return torch.arange(past, past + length, device=device)
    if mask.shape[-1] != past + length:
        raise ValueError(
            f"attention_mask covers {mask.shape[-1]} tokens but the cache holds {past} and the "
            f"input {length}: pass the mask of every token so far ({past + length})"
        )
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]


def compute_dtype(device: torch.device, weights: torch.dtype) -> torch.dtype:
    """The dtype the layers compute in: autocast's where it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weights


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32, fp64 stays fp64 (a double model is double throughout)."""
    return torch.promote_types(dtype, torch.float32)


# exist_ok: the same lines run again when a process that imported the project also loads an
# exported directory with trust_remote_code=True (its copy of this module).
AutoConfig.register("enigma", EnigmaConfig, exist_ok=True)
AutoModelForCausalLM.register(EnigmaConfig, EnigmaLM, exist_ok=True)
