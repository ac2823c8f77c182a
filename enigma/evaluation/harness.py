"""lm-evaluation-harness on a saved model, with the defaults this project's models need.

``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`` works on a saved
EnigmaLM unchanged (its tokenizer names bos and eos; see
:func:`~enigma.data.tokenizer.as_causal_tokenizer`). This runs the same evaluation in-process:
offline unless the environment says otherwise (tasks from local YAML files, ``--include-path``,
whose relative ``data_files`` are read beside them),
the modelling code the directory carries trusted, the model on the CPU unless a GPU is there,
and the chat template applied where the model's tokenizer has one (a fine-tuned model answers
as it was trained to).
"""

from __future__ import annotations

import contextlib
import difflib
import os
from pathlib import Path

from ..errors import InputError


def offline() -> None:
    """No hub: datasets and models from local files, unless the caller asked for the network."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")


def check_tasks(tasks: list[str], include_path: str | None):
    """lm-evaluation-harness's task manager, every task in ``tasks`` known to it (else one line
    naming the closest and the fix)."""
    from lm_eval.tasks import TaskManager

    if include_path and not Path(include_path).is_dir():
        raise InputError(f"--include-path {include_path} is not a directory of task YAML files")
    manager = TaskManager(include_path=include_path)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = f" or {include_path}" if include_path else " (a local task: --include-path DIR)"
            raise InputError(f"unknown task {task!r} in lm-evaluation-harness{where}{hint}")
    return manager


@contextlib.contextmanager
def _inside(directory: str | None):
    """The working directory ``directory`` for the block (none given: unchanged)."""
    before = os.getcwd()
    try:
        if directory:
            os.chdir(directory)
        yield
    finally:
        os.chdir(before)


def evaluate_tasks(model_dir: str, tasks: list[str], include_path: str | None = None,
                   limit: float | None = None, num_fewshot: int | None = None,
                   batch_size: int = 8, chat_template: bool | None = None) -> dict:  # fmt: skip
    """``{task: {metric: value, ...}}`` for one saved model; ``chat_template`` None: applied
    where the model's tokenizer has one."""
    import torch
    from lm_eval import simple_evaluate

    from ..data.tokenizer import load_tokenizer

    offline()
    include_path = str(Path(include_path).resolve()) if include_path else None
    manager = check_tasks(tasks, include_path)
    if chat_template is None:
        chat_template = bool(getattr(load_tokenizer(model_dir, quiet=True), "chat_template", None))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Local tasks' data_files resolve beside their YAML files, not wherever this was run from.
    with _inside(include_path):
        out = simple_evaluate(
            model="hf",
            model_args=f"pretrained={Path(model_dir).resolve()},trust_remote_code=True,"
            f"device={device}",
            tasks=tasks, num_fewshot=num_fewshot, batch_size=batch_size, limit=limit,
            task_manager=manager, apply_chat_template=chat_template, log_samples=False,
        )  # fmt: skip
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return {"model": str(model_dir), "chat_template": chat_template, "results": results}
