"""Training configuration: plain defaults, a preset, a JSON file, then ``--set key=value``.

Defaults are the original's ``base`` recipe (micro-batch 16, accumulation 2, lr 5e-4, weight decay
1e-3, 10 % warmup, 5 epochs, early stop after 2 evaluations without improvement, evaluate every
2000 steps, save every 10000). Model fields (``d``, ``num_rotors``, ...) may be set the same way;
every key is checked, and a misspelled one is rejected with the closest known names.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from ..errors import InputError
from ..models.lm_config import PRESET_SEQ_LEN, EnigmaConfig, preset_fields
from ..storage.store import check_storage_path
from .checkpointing import mode as checkpointing_mode
from .precision import PRECISIONS

FINETUNE_SEQ_LEN = 256


@dataclass
class TrainConfig:
    preset: str = "tiny"
    model: dict = field(default_factory=dict)  # EnigmaConfig overrides on top of the preset
    data: str = "data/sanguo-128"
    output_dir: str = "runs/tiny"
    # The run's name in TensorBoard (tensorboard/RUN_NAME, so `--logdir runs` tells runs apart);
    # "": the output directory's name. Sweep trials are named by their knobs.
    run_name: str = ""
    # Checkpoints, TensorBoard and the model: a local/NFS path or s3:// / gs:// URI; "": output_dir
    storage_path: str = ""
    ds_config: str = "ds_configs/zero2.json"
    seq_len: int = 0  # 0: the preset's
    micro_batch: int = 16
    grad_accum: int = 2
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 1e-3
    betas: tuple = (0.9, 0.95)
    adam_eps: float = 1e-8
    # auto: bf16 where every worker runs it natively, else fp32 (enigma.train.precision); what
    # bf16/fp16 "enabled": "auto" in the DeepSpeed JSON become
    precision: str = "auto"
    warmup_ratio: float = 0.1
    max_epochs: int = 5
    max_steps: int = 0  # 0: max_epochs worth of steps
    stop_at_step: int = 0  # end early (with a checkpoint); the lr schedule still spans max_steps
    early_stop_patience: int = 2  # evaluations in a row without a new best; 0: never stop
    eval_steps: int = 2000
    eval_batches: int = 50  # per worker and evaluation
    save_steps: int = 10000
    checkpoint_tmp_dir: str = ""  # where ranks stage a checkpoint; "": OUTPUT/.checkpoint-tmp
    log_steps: int = 10
    grad_clip: float = 1.0
    shuffle_buffer: int = 256  # a worker mixes its blocks in windows of this many; 0: none
    # train shards and their blocks in an order drawn from (seed, epoch); False: as written
    shuffle_shards: bool = True
    # Recompute the standard layers in backward: "auto" (when a micro-batch's activations would
    # take over half the worker's free memory; enigma.train.checkpointing), "on", "off";
    # reversible layers need none.
    activation_checkpointing: str = "auto"
    # torch.compile the Transformer blocks, the head and the loss: "auto" on CUDA workers below
    # ZeRO-3 (whose parameter hooks a compiled graph would break), "on", "off".
    compile_layers: str = "auto"
    # torch.compile the machine (its many small ops are launch-bound on a GPU): "auto" compiles
    # on CUDA workers below ZeRO-3 (whose parameter hooks a compiled graph would break) when the
    # machine backpropagates by plain autograd (the reversible backward's rebuild calls autograd
    # itself and cannot be traced), "on", "off".
    compile_machine: str = "auto"
    workers: int = 2
    cpus_per_worker: int = 1
    gpus_per_worker: int = -1  # -1: 1 when the cluster has GPUs, else 0
    max_failures: int = 2
    # Workers waiting for room with nothing of this job placed: fail after this long (0: wait
    # as long as it takes; a request no node set could hold fails at once, whatever this is).
    placement_timeout_s: float = 0.0
    seed: int = 0
    sample_prompt: str = "话说天下大势，分久必合，合久必分。"
    sample_tokens: int = 48
    # Fine-tuning (enigma finetune; see enigma.train.finetune): the model it starts from (a saved
    # model or an `enigma train` output directory; "": pretraining), the rows it learns from
    # (.jsonl or .parquet; `data` is then where they are prepared), held-out rows, and what trains.
    base_model: str = ""
    conversations: str = ""
    val_data: str = ""  # held-out rows from their own file; "": val_fraction of the rows
    val_fraction: float = 0.05
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = "attention,mlp"  # of attention, mlp, head, embedding, coupling
    full: bool = False  # every weight trains, no LoRA

    @property
    def model_fields(self) -> dict:
        if self.base_model:
            return {**base_model_fields(self.base_model), **self.model}
        return {**preset_fields(self.preset), **self.model}

    def model_config(self) -> EnigmaConfig:
        fields = self.model_fields
        fields.setdefault("max_len", max(2048, self.resolved_seq_len))
        # Reversible layers are rebuilt by the reversible backward: nothing to checkpoint.
        # "auto" is decided by each worker (enigma.train.checkpointing); the model starts without.
        checkpointing = self.checkpointing == "on" and not fields.get("reversible_layers")
        fields.setdefault("activation_checkpointing", checkpointing)
        config = EnigmaConfig(**fields)
        # The length it was pretrained on, recorded in the saved config (enigma eval's
        # perplexity windows are multiples of it); a fine-tuned model keeps its base's.
        config.train_seq_len = (
            self.base_train_seq_len() if self.base_model else self.resolved_seq_len
        )
        return config

    def base_train_seq_len(self) -> int | None:
        saved = Path(base_model_dir(self.base_model)) / "config.json"
        return json.loads(saved.read_text()).get("train_seq_len") if saved.is_file() else None

    @property
    def checkpointing(self) -> str:
        """``activation_checkpointing`` as ``"auto"``, ``"on"`` or ``"off"`` (older configs and
        callers say ``True``/``False``)."""
        return checkpointing_mode(self.activation_checkpointing)

    @property
    def resolved_run_name(self) -> str:
        # A run resumed elsewhere from the same storage keeps its name, and so its curves.
        # The URI's path only: its query (an endpoint) names no run.
        where = (
            urlsplit(self.storage_path).path.rstrip("/") if self.storage_path else self.output_dir
        )
        return self.run_name or PurePosixPath(where).name or Path(where).resolve().name or "run"

    @property
    def resolved_seq_len(self) -> int:
        if self.base_model:  # a conversation, not a block of a corpus
            return self.seq_len or FINETUNE_SEQ_LEN
        return self.seq_len or PRESET_SEQ_LEN[self.preset]

    def to_dict(self) -> dict:
        """JSON-ready: ``from_dict(json.loads(json.dumps(c.to_dict()))) == c``."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """The inverse of :meth:`to_dict` (JSON turns tuples into lists); keys are checked."""
        cfg = cls()
        apply_overrides(cfg, data)
        return cfg

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes``; the model overrides are copied, never shared."""
        changes["model"] = dict(changes.get("model", self.model))
        return dataclasses.replace(self, **changes)


TRAIN_KEYS = {f.name: f for f in dataclasses.fields(TrainConfig)}
MODEL_KEYS = {
    name: p
    for name, p in inspect.signature(EnigmaConfig.__init__).parameters.items()
    if name not in ("self", "kwargs")
}
MODEL_ALIASES = EnigmaConfig.renamed_keys  # old names that saved configs and scripts may still use


# Saved with a model but how a run trains, not what the model is: a fine-tuning run decides.
RUN_KNOBS = {"activation_checkpointing", "reversible_backward", "machine_memory_efficient"}


def base_model_dir(path: str) -> Path:
    """A saved model directory, or an ``enigma train`` output directory's ``model/``; of a
    storage URI, this node's mirror of it (:mod:`enigma.storage.mirror`)."""
    if "://" in path:
        return _mirrored(path)
    p = Path(path)
    for candidate in (p, p / "model"):
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    raise InputError(
        f"--model {path} is neither a saved model (no config.json) nor an `enigma train` output "
        "directory (no model/config.json)"
    )


@functools.lru_cache(maxsize=8)
def _mirrored(uri: str) -> Path:
    """Once per process: the config is asked for the base model's shape many times."""
    from ..storage.mirror import local_model

    return Path(local_model(uri, "--model"))


def base_model_fields(path: str) -> dict:
    """The base model's shape, as ``EnigmaConfig`` keys."""
    saved = json.loads((base_model_dir(path) / "config.json").read_text())
    if saved.get("model_type") != "enigma":
        raise InputError(f"--model {path} holds a {saved.get('model_type')!r} model, not EnigmaLM")
    return {k: v for k, v in saved.items() if k in MODEL_KEYS and k not in RUN_KNOBS}


def _unknown(key: str) -> InputError:
    close = difflib.get_close_matches(key, [*TRAIN_KEYS, *MODEL_KEYS], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return InputError(f"unknown config key {key!r}{hint}")


SWITCHES = {"activation_checkpointing", "compile_machine", "compile_layers"}


def _switch(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return "on" if value.lower() in ("true", "1", "yes") else "off"
    return value


def _coerce(key: str, value, default):
    """Parse ``--set`` strings and check JSON values against the default's type."""
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        if kind is bool or (default is None and value.lower() in ("true", "false")):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise InputError(f"{key}={value!r}: expected true or false")
            return value.lower() in ("true", "1", "yes")
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise InputError(f"{key}={value!r}: expected a {kind.__name__}") from err
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is tuple and isinstance(value, list):
        value = tuple(value)
    if default is not None and not isinstance(value, kind):
        raise InputError(f"{key}={value!r}: expected a {kind.__name__}")
    return value


def apply_overrides(cfg: TrainConfig, pairs: dict) -> TrainConfig:
    """Set train or model keys; model keys land in ``cfg.model``."""
    for key, value in pairs.items():
        if key == "model" and isinstance(value, dict):
            apply_overrides(cfg, value)
        elif key in TRAIN_KEYS:
            if key in SWITCHES:  # auto/on/off; older configs and scripts say true/false
                value = _switch(value)
            default = getattr(cfg, key)
            setattr(cfg, key, _coerce(key, value, default))
        elif key in MODEL_KEYS or key in MODEL_ALIASES:
            key = MODEL_ALIASES.get(key, key)
            default = MODEL_KEYS[key].default
            cfg.model[key] = _coerce(key, value, default)
        else:
            raise _unknown(key)
    return cfg


def parse_set(items: list[str]) -> dict:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--set {item!r}: expected key=value")
        pairs[key.strip()] = value
    return pairs


def build_config(
    preset: str | None = None,
    config_file: str | None = None,
    sets: list[str] | None = None,
    **explicit,
) -> TrainConfig:
    """Defaults < preset < JSON file < explicit flags < ``--set`` pairs."""
    cfg = TrainConfig()
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise InputError(f"config file {config_file} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"config file {config_file} is not valid JSON: {err}") from err
        apply_overrides(cfg, data)
    if preset:
        cfg.preset = preset
    preset_fields(cfg.preset)  # unknown preset: lists the known ones
    apply_overrides(cfg, {k: v for k, v in explicit.items() if v is not None})
    pairs = parse_set(sets or [])
    apply_overrides(cfg, pairs)
    if cfg.model.get("reversible_layers") and "activation_checkpointing" in pairs:
        if cfg.checkpointing == "on":
            raise InputError(
                "reversible_layers=true rebuilds every layer in backward already; "
                "activation_checkpointing=true would recompute them again: drop it"
            )
    if cfg.precision not in PRECISIONS:
        raise InputError(f"precision={cfg.precision!r}: expected {', '.join(PRECISIONS)}")
    check_storage_path(cfg.storage_path)
    for key in ("compile_machine", "compile_layers", "activation_checkpointing"):
        value = checkpointing_mode(getattr(cfg, key))
        if value not in ("auto", "on", "off"):
            raise InputError(f"{key}={value!r}: expected auto, on or off")
        setattr(cfg, key, value)
    check_model(cfg)
    return cfg


def compiles_layers(cfg: TrainConfig, on_cuda: bool, zero_stage: int) -> bool:
    """Whether a worker compiles the Transformer blocks, the head and the loss."""
    if cfg.compile_layers == "auto":
        return on_cuda and zero_stage < 3
    return cfg.compile_layers == "on"


def compiles_machine(cfg: TrainConfig, on_cuda: bool, zero_stage: int, rebuilds: bool) -> bool:
    """Whether a worker compiles the machine (see ``TrainConfig.compile_machine``); ``rebuilds``:
    the machine runs the reversible backward."""
    if cfg.compile_machine == "auto":
        return on_cuda and zero_stage < 3 and not rebuilds
    return cfg.compile_machine == "on"


def check_model(cfg: TrainConfig) -> None:
    """Build the model on the meta device (no memory, no compute), so a shape the machine or the
    layers reject (they raise :class:`InputError` for it) stops the run here, before any worker
    starts. Any other error is a bug and keeps its traceback."""
    import torch

    from ..models.lm import EnigmaLM

    with torch.device("meta"):
        EnigmaLM(cfg.model_config())
