"""What a fine-tuning run trains and exports: the base model with a LoRA adapter through PEFT
(or every weight), its data prepared with the chat template, and the adapter and merged model it
exports (see :mod:`enigma.train.finetune`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .config import base_model_dir

LORA_TARGETS = {
    "attention": ["qkv", "proj"],
    "mlp": ["mlp.0", "mlp.2"],
    "head": ["lm_head"],
    "embedding": ["embed"],
    "coupling": ["f.0", "f.2", "g.0", "g.2"],
}
# Modules a LoRA run trains whole (PEFT's modules_to_save), besides its adapters.
TRAINED_WHOLE = ["norm"]


def lora_config(cfg):
    from peft import LoraConfig

    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise InputError(
            f"lora_targets={cfg.lora_targets!r}: choose from {', '.join(LORA_TARGETS)}"
        )
    modules = [m for t in targets for m in LORA_TARGETS[t]]
    # The final LayerNorm trains whole (2d parameters): its gain bounds how far the tied head's
    # logits can lean towards a few tokens, and without it the adapter underfits even an
    # answer's format (enigma bench finetune --task reverse: loss 2.6 where the full model
    # reaches 1.8).
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=modules, modules_to_save=TRAINED_WHOLE)  # fmt: skip


def build_model(cfg):
    """The base model with LoRA (a ``PeftModel``), or the base model itself with ``full``. The
    adapter's start is seeded, so every rank starts from the same one, in a forked random
    state: building the model (again at every export) leaves the caller's stream where it was."""
    import torch

    from ..models.lm import EnigmaLM

    model = EnigmaLM.from_pretrained(base_model_dir(cfg.base_model), config=cfg.model_config())
    if cfg.full:
        return model
    from peft import get_peft_model

    if "head" in cfg.lora_targets or "embedding" in cfg.lora_targets:
        untie_head(model)  # a LoRA on either, merged into a tied matrix, would move the other
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        tuned = get_peft_model(model, lora_config(cfg))
    no_dropout_in_the_machine(tuned)
    return tuned


def no_dropout_in_the_machine(model) -> None:
    """LoRA on the machine's coupling nets runs without dropout: the machine applies each net
    in its forward half and again in its inverse half (and the reversible backward once more),
    and is exactly invertible only if every run is the same function."""
    import torch

    for name, module in model.named_modules():
        if ".machine." in f".{name}." and hasattr(module, "lora_dropout"):
            for adapter in module.lora_dropout:
                module.lora_dropout[adapter] = torch.nn.Identity()


def untie_head(model) -> None:
    """Give the head its own copy of the embedding: a LoRA on a tied head would move the
    embedding with it when merged."""
    import torch

    model.lm_head.weight = torch.nn.Parameter(model.embed.weight.detach().clone())
    model.config.tie_word_embeddings = False


def trainable_share(model) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def prepare_data(cfg) -> None:
    """Tokenize ``cfg.conversations`` into ``cfg.data`` with the base model's tokenizer (kept
    when ``cfg.data`` already holds exactly that)."""
    from ..data.conversations import prepare_conversations
    from ..data.tokenizer import load_tokenizer
    from ..storage.mirror import local_file

    tokenizer = load_tokenizer(str(base_model_dir(cfg.base_model)), quiet=True)
    rows = local_file(cfg.conversations, "--data")
    val = local_file(cfg.val_data, "--val") if cfg.val_data else cfg.val_data
    prepare_conversations(rows, Path(cfg.data), tokenizer, cfg.resolved_seq_len,
                          cfg.val_fraction, val, cfg.seed)  # fmt: skip
