"""Which Adam a DeepSpeed engine steps with, chosen on the worker's own machine.

DeepSpeed's own Adam kernels are C++/CUDA ops: ``FusedAdam`` on GPUs, ``DeepSpeedCPUAdam`` when
the optimizer is offloaded to the CPU. Unless prebuilt, ``deepspeed.initialize`` JIT-compiles them
with ``nvcc`` or ``c++``, and on a node whose CUDA toolkit is missing or does not match torch every
worker dies at start. So the kernel is loaded here first; when it cannot be, torch's AdamW (fused
on CUDA, foreach elsewhere; nothing to build) is handed to DeepSpeed as a client optimizer.

The knob is the JSON's ``optimizer.params.torch_adam``: ``true`` always takes torch's AdamW,
``false`` requires DeepSpeed's kernel (a failed build is an error), ``"auto"`` (the shipped
configs) tries the kernel and falls back. On CPU workers without offload ``"auto"`` takes torch's
AdamW directly: DeepSpeed's fused Adam is a CUDA kernel.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import time
from dataclasses import dataclass

import torch


@dataclass
class Choice:
    """What ``deepspeed.initialize`` gets: its config, the client optimizer (or None, when the
    config's optimizer section is DeepSpeed's to build) and one line saying which and why."""

    config: dict
    client_optimizer: object
    line: str

    @property
    def uses_deepspeed_kernel(self) -> bool:
        return self.client_optimizer is None


def offloaded(config: dict) -> bool:
    zero = config.get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")


def kernel_name(config: dict, device: torch.device) -> str | None:
    """The DeepSpeed op this config would build, or None when ``"auto"`` needs no kernel."""
    if offloaded(config):
        return "CPUAdamBuilder"
    return "FusedAdamBuilder" if device.type == "cuda" else None


def load_kernel(builder_name: str) -> tuple[bool, str]:
    """Load (prebuilt) or JIT-build one DeepSpeed op; ``(loaded, how or why not)``."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None:
        return False, f"the {get_accelerator()._name} accelerator has no {builder_name}"
    if not builder.is_compatible(verbose=False):
        why = " ".join(str(e) for e in getattr(builder, "error_log", None) or []) or "unsupported"
        return False, f"{builder.name} is not compatible here ({why})"
    start = time.perf_counter()
    try:
        with numeric_arch_list():
            builder.load(verbose=False)
    except Exception as err:  # any build failure means: use the optimizer that needs no build
        lines = [s for s in str(err).strip().splitlines() if s.strip()]
        return False, f"{builder.name} could not be built ({lines[-1] if lines else type(err)})"
    return True, f"{builder.name} loaded in {time.perf_counter() - start:.1f} s"


@contextlib.contextmanager
def numeric_arch_list():
    """DeepSpeed's JIT builder reads ``TORCH_CUDA_ARCH_LIST`` as numbers and fails on an
    arch-specific entry such as Hopper's ``9.0a`` (which CUDA images set); Adam needs no
    arch-specific instruction, so it is built for the plain ``9.0``."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    plain = re.sub(r"(\d+\.\d+)[a-z]+", r"\1", value) if value else value
    if plain != value:
        os.environ["TORCH_CUDA_ARCH_LIST"] = plain
    try:
        yield
    finally:
        if plain != value:
            os.environ["TORCH_CUDA_ARCH_LIST"] = value


def torch_adamw(config: dict, params: dict, device: torch.device, offload: bool):
    """A factory DeepSpeed calls with the model's parameters: torch's AdamW, fused where its
    states live on CUDA."""
    fused = device.type == "cuda" and not offload
    kwargs = {k: params[k] for k in ("lr", "betas", "eps", "weight_decay") if k in params}
    # DeepSpeed's "Adam" is AdamW unless adam_w_mode is false (its own default is true).
    decoupled = config.get("optimizer", {}).get("type", "AdamW") == "AdamW" or params.get(
        "adam_w_mode", True
    )
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam

    def build(model_parameters):
        return cls(model_parameters, **kwargs, fused=fused or None, foreach=None if fused else True)

    build.description = f"torch {cls.__name__} ({'fused' if fused else 'foreach'})"
    return build


def choose(config: dict, device: torch.device, agree=None) -> Choice:
    """The optimizer for an engine on ``device``. With several ranks, ``agree(ok)`` returns
    whether the kernel loaded on every rank (a collective), so that all take the same one."""
    params = config.get("optimizer", {}).get("params", {})
    setting = params.get("torch_adam", "auto")
    if setting is True:
        return torch_choice(config, device, params, "torch_adam is true in the DeepSpeed config")
    wanted = kernel_name(config, device) or ("FusedAdamBuilder" if setting is False else None)
    if wanted is None:
        why = "DeepSpeed's fused Adam is a CUDA kernel and this worker runs on the CPU"
        return torch_choice(config, device, params, why)
    ok, how = load_kernel(wanted)
    if agree is not None and agree(ok) != ok:
        ok, how = False, f"{how} here, but not on every rank"
    if ok:
        out = copy.deepcopy(config)
        out["optimizer"]["params"]["torch_adam"] = False
        return Choice(out, None, f"optimizer: DeepSpeed {wanted[: -len('Builder')]} ({how})")
    if setting is False:
        raise RuntimeError(
            f'torch_adam is false in the DeepSpeed config, but {how}; set it to "auto" to '
            "fall back to torch's AdamW"
        )
    return torch_choice(config, device, params, how)


def torch_choice(config: dict, device: torch.device, params: dict, why: str) -> Choice:
    out = copy.deepcopy(config)
    out.pop("optimizer", None)
    offload = offloaded(config)
    if offload:
        out["zero_force_ds_cpu_optimizer"] = False  # a client optimizer with offload, on purpose
    build = torch_adamw(config, params, device, offload)
    return Choice(out, build, f"optimizer: {build.description}: {why}")
