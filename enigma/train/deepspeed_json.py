"""DeepSpeed JSON: load, reject unknown keys by name, fill ``"auto"`` from the training config.

``"auto"`` follows the Hugging Face convention: batch sizes, accumulation, clipping, bf16/fp16
``enabled`` (from ``precision``, decided per run: :mod:`enigma.train.precision`), the
optimizer's lr, betas, eps and weight decay come from :class:`TrainConfig`, and the ZeRO bucket
sizes and thresholds from the model width ``d`` (``d²`` for the buckets, ``0.9 d²`` for the
ZeRO-3 prefetch, ``10 d`` for its persistence threshold), so one JSON file serves every preset.
An ``"auto"`` left anywhere else is an error naming the key, before any worker starts. A
``scheduler`` section is refused: the learning rate follows the training config
(:mod:`enigma.train.schedule`), set at every step. ``torch_adam`` is left to each worker, which
knows whether DeepSpeed's compiled Adam loads on its machine (:mod:`enigma.train.optimizer`).
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path

from ..errors import InputError
from .config import TrainConfig

# Top-level sections DeepSpeed reads that this project uses or passes through; DeepSpeed itself
# ignores unknown top-level keys silently, so a typo would otherwise change nothing.
TOP_LEVEL = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "optimizer", "scheduler", "gradient_clipping", "bf16", "fp16", "zero_optimization",
    "activation_checkpointing", "steps_per_print", "wall_clock_breakdown",
    "communication_data_type", "prescale_gradients", "gradient_predivide_factor",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "flops_profiler", "comms_logger", "checkpoint", "data_types",
    "memory_breakdown", "dump_state", "torch_autocast", "seq_parallel_communication_data_type",
}  # fmt: skip
OPTIMIZER_PARAMS = {
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "torch_adam",
    "adam_w_mode",
    "bias_correction",
}


ACTIVATION_CHECKPOINTING = {
    "partition_activations": bool, "contiguous_memory_optimization": bool,
    "cpu_checkpointing": bool, "number_checkpoints": (int, type(None)),
    "synchronize_checkpoint_boundary": bool, "profile": bool,
}  # fmt: skip
# Filled from the model width when "auto" (the Hugging Face integration's rules).
ZERO_AUTO = {
    "reduce_bucket_size": lambda d: d * d,
    "allgather_bucket_size": lambda d: d * d,
    "stage3_prefetch_bucket_size": lambda d: int(0.9 * d * d),
    "stage3_param_persistence_threshold": lambda d: 10 * d,
}
# Shipped configs whose names promised a precision, and their names since bf16 became "auto".
RENAMED = {f"zero{n}_bf16.json": f"zero{n}.json" for n in (1, 2, 3)}
WORKER_AUTO = {("optimizer", "params", "torch_adam")}  # resolved by each worker (optimizer.py)


class DeepSpeedConfigError(InputError):
    """A DeepSpeed JSON that this project cannot run: the message names the key."""


def _close(key: str, known) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=2)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def load(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        now = RENAMED.get(p.name)
        hint = (
            f"; it is now {p.with_name(now)}, whose precision follows the hardware" if now else ""
        )
        raise DeepSpeedConfigError(
            f"DeepSpeed config {path} does not exist (see ds_configs/){hint}"
        )
    try:
        config = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DeepSpeedConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"DeepSpeed config {path} must be a JSON object")
    validate(config, path)
    return config


def validate(config: dict, where: str = "DeepSpeed config") -> None:
    """Unknown keys are rejected by name, nested sections through DeepSpeed's own models."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    for key in config:
        if key not in TOP_LEVEL:
            raise DeepSpeedConfigError(f"{where}: unknown key {key!r}{_close(key, TOP_LEVEL)}")
    if "scheduler" in config:
        raise DeepSpeedConfigError(
            f"{where}: a scheduler section would be overwritten at every step: the learning rate "
            "follows the training config (--set lr=, warmup_ratio=, min_lr_ratio=); remove it"
        )
    check_activation_checkpointing(config.get("activation_checkpointing", {}), where)
    optimizer = config.get("optimizer", {})
    for key in optimizer.get("params", {}):
        if key not in OPTIMIZER_PARAMS:
            raise DeepSpeedConfigError(
                f"{where}: unknown optimizer param {key!r}{_close(key, OPTIMIZER_PARAMS)}"
            )
    for section, model in (
        ("zero_optimization", DeepSpeedZeroConfig),
        ("bf16", DeepSpeedBF16Config),
        ("fp16", DeepSpeedFP16Config),
    ):
        if section in config:
            try:
                model(**{k: v for k, v in config[section].items() if v != "auto"})
            except ValidationError as err:
                first = err.errors()[0]
                name = ".".join(str(x) for x in first["loc"])
                raise DeepSpeedConfigError(f"{where}: {section}.{name}: {first['msg']}") from None


def check_activation_checkpointing(section: dict, where: str) -> None:
    for key, value in section.items():
        if key not in ACTIVATION_CHECKPOINTING:
            known = ACTIVATION_CHECKPOINTING
            raise DeepSpeedConfigError(
                f"{where}: unknown activation_checkpointing key {key!r}{_close(key, known)}"
            )
        kind = ACTIVATION_CHECKPOINTING[key]
        if not isinstance(value, kind) or (kind is bool) != isinstance(value, bool):
            raise DeepSpeedConfigError(
                f"{where}: activation_checkpointing.{key}={value!r}: expected "
                f"{'true or false' if kind is bool else 'an integer or null'}"
            )


def zero_stage(config: dict) -> int:
    return config.get("zero_optimization", {}).get("stage", 0)


def precision(config: dict) -> str:
    if config.get("bf16", {}).get("enabled"):
        return "bf16"
    if config.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def check_device(precision_name: str | None, path: str, use_gpu: bool) -> None:
    """fp16 is refused on CPU workers (DeepSpeed does not support it there)."""
    if precision_name == "fp16" and not use_gpu:
        raise DeepSpeedConfigError(
            f"{path} asks for fp16, which DeepSpeed does not support on CPU workers; use bf16 "
            "instead (--ds-config ds_configs/zero2.json)"
        )


def fill_auto(config: dict, cfg: TrainConfig, world_size: int) -> dict:
    """A copy of ``config`` with every ``"auto"`` replaced (the optimizer's ``torch_adam`` is
    left to the workers); an ``"auto"`` this project cannot fill is an error naming it."""
    if cfg.precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision {cfg.precision!r} must be decided before filling the JSON")
    out = copy.deepcopy(config)
    values = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
    }
    for key, value in values.items():
        if out.get(key, "auto") == "auto":
            out[key] = value
    params = out.setdefault("optimizer", {"type": "AdamW"}).setdefault("params", {})
    auto_params = {
        "lr": cfg.lr,
        "betas": list(cfg.betas),
        "eps": cfg.adam_eps,
        "weight_decay": cfg.weight_decay,
    }
    for key, value in auto_params.items():
        if params.get(key, "auto") == "auto":
            params[key] = value
    for section in ("bf16", "fp16"):
        if out.get(section, {}).get("enabled") == "auto":
            out[section]["enabled"] = cfg.precision == section
    zero, d = out.get("zero_optimization", {}), cfg.model_config().d
    for key, rule in ZERO_AUTO.items():
        if zero.get(key) == "auto":
            zero[key] = rule(d)
    out.setdefault("steps_per_print", 10**9)  # our own progress line replaces DeepSpeed's
    left = [".".join(path) for path in auto_paths(out) if path not in WORKER_AUTO]
    if left:
        raise DeepSpeedConfigError(
            f'{cfg.ds_config}: {left[0]} is "auto", which this project cannot fill; give it a '
            f"value (filled from the training config: batch sizes, clipping, bf16/fp16 enabled, "
            f"optimizer lr/betas/eps/weight_decay, ZeRO {', '.join(ZERO_AUTO)})"
        )
    return out


def auto_paths(node, path: tuple = ()) -> list[tuple]:
    """The key paths whose value is ``"auto"``."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in auto_paths(v, (*path, str(k)))]
    return [path] if node == "auto" else []
