"""Whether a run recomputes its Transformer layers in backward (activation checkpointing).

Checkpointing trades about a quarter more FLOPs for activation memory; a GPU that holds a step's
activations easily should not pay that. ``activation_checkpointing="auto"`` (the default)
measures what one micro-batch's forward keeps for backward, exactly and without computing
anything (the model runs under ``FakeTensorMode``, a saved-tensor hook adding up the bytes), and
turns checkpointing on only when that would take more than half of what the worker has free (the
GPU's free memory; on CPU workers, the node's available memory shared by its workers). Every
rank decides, and all take checkpointing if any needs it; rank 0 says which and why. ``"on"``
and ``"off"`` force it; reversible layers never need it.
"""

from __future__ import annotations

import torch

MODES = ("auto", "on", "off")
SHARE = 0.5  # of the free memory a step's activations may take without checkpointing


def mode(value) -> str:
    """``"auto"``, ``"on"`` or ``"off"`` (``True``/``False`` of older configs too)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


def saved_bytes(model_config, micro_batch: int, seq_len: int, dtype: torch.dtype | None) -> int:
    """What one micro-batch's forward keeps for backward without checkpointing (under autocast
    to ``dtype`` when given), counted under ``FakeTensorMode``."""
    import copy

    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..models.lm import EnigmaLM

    config = copy.deepcopy(model_config)
    config.activation_checkpointing = False
    total = [0]

    def keep(t):
        total[0] += t.numel() * t.element_size()
        return t

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = EnigmaLM(config).train()
        model.check_token_ids = lambda ids: None
        ids = torch.zeros(micro_batch, seq_len, dtype=torch.long)
        cast = torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), cast:
            model(ids, labels=ids)
    return total[0]


def free_bytes(device: torch.device, workers_here: int) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available // max(1, workers_here)


def decide(model_config, cfg, device, workers_here: int, agree=None) -> tuple[bool, str]:
    """(on, the line that says why) for ``activation_checkpointing="auto"``; ``agree(on)`` is
    True on every rank when any rank needs it (a collective)."""
    dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    need = saved_bytes(model_config, cfg.micro_batch, cfg.resolved_seq_len, dtype)
    free = free_bytes(device, workers_here)
    on = need > SHARE * free
    everyone = agree(on) if agree is not None else on
    where = "GPU" if device.type == "cuda" else "CPU worker's share of the node"
    size = f"a micro-batch's activations take {need / 2**30:.2f} GB, the {where} has "
    size += f"{free / 2**30:.1f} GB free"
    if everyone and not on:
        return True, f"activation checkpointing: on (auto: another rank needs it; here {size})"
    verdict = "more than half of it" if on else "within half of it"
    return everyone, f"activation checkpointing: {'on' if on else 'off'} (auto: {size}: {verdict})"
