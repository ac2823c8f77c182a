"""Exported models that travel: the model card, and ``enigma export RUN_DIR OUT``.

Every export (the best model of a run, written by rank 0 at each new best val loss, or a
re-export) is a ``save_pretrained`` directory that loads without this project: the modelling code
sits next to the weights and ``config.json``'s ``auto_map`` names it, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` is enough. Its ``README.md``
is the model card: what the model is and how big, how it was trained and on what, how well it
did, how to load it, and the licence.

``enigma export`` re-exports a run: its best model (the run's ``model/``), or the weights of any
checkpoint it kept (``--step N``), consolidated from DeepSpeed's shards for every ZeRO stage.
Each checkpoint carries ``run.json`` (the training config, the command and the data summary), so
a run that never finished exports all the same.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

from ..errors import InputError
from .checkpoint import DS_TAG, RUN_FILE, STATE_FILE, TrainState

LICENCE = "MIT"


def data_summary(manifest: dict) -> dict:
    """What the card says of the data: the source, the tokenizer, the tokens per split."""
    splits = {
        name: {k: split.get(k) for k in ("documents", "tokens", "blocks")}
        for name, split in manifest.get("splits", {}).items()
    }
    tokenizer = manifest.get("tokenizer", {})
    return {
        "source": manifest.get("source"),
        "tokenizer": tokenizer.get("name"),
        "vocab_size": tokenizer.get("vocab_size"),
        "seq_len": manifest.get("seq_len"),
        "splits": splits,
    }


def _architecture(model) -> list[str]:
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    machine = (
        f"{c.num_rev_blocks} RevBlocks and {c.num_rotors} rotors"
        if c.num_rev_blocks or c.num_rotors
        else "no machine (a plain Transformer)"
    )
    rows = [
        ("parameters", f"{params:,}"),
        ("width d / heads", f"{c.d} / {c.num_heads}"),
        ("Transformer layers", f"{c.num_transformer_layers}"),
        ("machine", machine),
        ("rotor start", c.rotor_offset),
        ("rotor products", c.rotor_matmul),
        ("reversible layers", str(c.reversible_layers)),
        ("vocabulary", f"{c.vocab_size:,}"),
        ("context", f"{c.max_len:,} positions"),
    ]
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return lines


def _data(info: dict) -> list[str]:
    data = info.get("data") or {}
    if not data:
        return ["Not recorded."]
    lines = [
        f"- source: `{data.get('source')}`, blocks of {data.get('seq_len')} tokens",
        f"- tokenizer: {data.get('tokenizer')} ({data.get('vocab_size'):,} tokens)",
    ]
    for name, split in data.get("splits", {}).items():
        lines.append(
            f"- {name}: {split.get('documents')} documents, {split.get('tokens'):,} tokens, "
            f"{split.get('blocks'):,} blocks"
        )
    return lines


def _result(val_loss: float | None, step: int) -> str:
    if val_loss is not None and math.isfinite(val_loss):
        return (
            f"Val perplexity **{math.exp(val_loss):.2f}** (val loss {val_loss:.4f}) at step "
            f"{step}, on the held-out val split below."
        )
    return f"Step {step}: not evaluated at this step (no val perplexity)."


def _training(info: dict) -> list[str]:
    command = info.get("command") or "enigma train --config train.json  # the config below"
    return [
        "```bash",
        command,
        "```",
        "",
        "<details><summary>The full training config (<code>enigma train --config</code> reads "
        "it)</summary>",
        "",
        "```json",
        json.dumps(info.get("config") or {}, indent=2, ensure_ascii=False),
        "```",
        "",
        "</details>",
    ]


FRONT_MATTER = [
    "---",
    f"license: {LICENCE.lower()}",
    "library_name: transformers",
    "pipeline_tag: text-generation",
    "tags: [enigma, invertible, reversible, custom_code]",
    "---",
]
INTRO = [
    "A causal language model whose embeddings pass through the Enigma machine: an exact,",
    "position-dependent invertible network (plugboard, RevBlocks, rotors stepping with the",
    "position, a reflector, and the way back), followed by Transformer layers.",
]
LOADING = [
    "The modelling code is in this directory; only `torch` and `transformers` are needed.",
    "`trust_remote_code=True` runs those Python files (`lm.py` and the modules beside it) in your",
    "process: load this model only from a source you trust, or read the files first.",
    "",
    "```python",
    "from transformers import AutoModelForCausalLM, AutoTokenizer",
    "",
    'tokenizer = AutoTokenizer.from_pretrained("PATH")',
    'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)',
    'ids = tokenizer("话说天下大势", return_tensors="pt", add_special_tokens=False).input_ids',
    "print(tokenizer.decode(model.generate(ids, max_new_tokens=32)[0]))",
    "```",
]


def _tuning(config: dict) -> list[str]:
    """How a fine-tuned model came from its base, or nothing for a pretrained one."""
    if not config.get("base_model"):
        return []
    how = "every weight" if config.get("full") else (
        f"LoRA (rank {config.get('lora_r')}, alpha {config.get('lora_alpha')}, dropout "
        f"{config.get('lora_dropout')}) on {config.get('lora_targets')}, merged into the weights"
    )  # fmt: skip
    rows = [f"- base model: `{config['base_model']}`", f"- trained: {how}",
            f"- rows: `{config.get('conversations')}`"]  # fmt: skip
    if config.get("val_data"):
        rows.append(f"- held-out rows: `{config['val_data']}`")
    rows.append("- the tokenizer carries the chat template (`apply_chat_template`); the loss was "
                "taken on the assistant's tokens only")  # fmt: skip
    return rows


def render_card(model, info: dict, val_loss: float | None, step: int) -> str:
    """The model card (``README.md``) of an export from ``step`` with val loss ``val_loss``."""
    config = info.get("config") or {}
    preset = "fine-tuned" if config.get("base_model") else config.get("preset", "custom")
    tuning = _tuning(config)
    sections = [
        ("Result", [_result(val_loss, step)]),
        *([("Fine-tuning", tuning)] if tuning else []),
        ("Architecture", _architecture(model)),
        ("Training", _training(info)),
        ("Data", _data(info)),
        ("Loading", LOADING),
        ("Licence", [f"The code and the weights: {LICENCE}; the training text keeps its terms."]),
    ]
    lines = [*FRONT_MATTER, "", f"# EnigmaLM `{preset}`, step {step}", "", *INTRO]
    for title, body in sections:
        lines += ["", f"## {title}", "", *body]
    return "\n".join(lines) + "\n"


def gathered_weights(engine, rank: int, stage: int, trained_only: bool = False) -> dict | None:
    """The engine's full weights in fp32 on the CPU, on rank 0 (None on the others). Each
    trained parameter comes from the optimizer's fp32 master: under bf16 or fp16 the module
    holds only a rounded copy. The rest (frozen weights, buffers) come from the module, unless
    ``trained_only``. Every rank takes part: assembling a master from ZeRO's partitions (and,
    under ZeRO-3, any parameter) is a collective."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    if stage == 3:  # every parameter gathered, 16-bit, onto rank 0
        held = None if trained_only else engine._zero3_consolidated_16bit_state_dict()
    else:
        held = None if trained_only or rank != 0 else module.state_dict()
    masters = {}  # the trained parameters' fp32 masters, by parameter
    for _, param in module.named_parameters():
        if param.requires_grad:
            full = safe_get_full_fp32_param(param)  # collective: every rank, in one order
            if rank == 0:
                masters[id(param)] = param.detach() if full is None else full
    if rank != 0:
        return None
    weights = {}
    for name, param in module.named_parameters(remove_duplicate=False):  # tied names too
        if id(param) in masters:
            weights[name] = masters[id(param)].detach().float().cpu()
    for name, value in (held or {}).items():
        if name not in weights:
            weights[name] = value.detach().cpu()
            if value.is_floating_point():
                weights[name] = weights[name].float()
    return weights


def lm_from_weights(model_config, weights: dict, where: str):
    """An EnigmaLM holding ``weights`` (a tied head may be absent from them)."""
    from ..models.lm import EnigmaLM

    model = EnigmaLM(model_config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"{where}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model


def export_model(
    engine, model_config, out: Path, tokenizer_dir: str, rank: int, stage: int, card=None
):
    """Write the full weights with ``save_pretrained`` (+ tokenizer, + the model card that
    ``card(model)`` renders), atomically. Under ZeRO-3 every rank takes part in gathering the
    partitioned parameters."""
    weights = gathered_weights(engine, rank, stage)
    if weights is None:
        return
    model = lm_from_weights(model_config, weights, "export")
    write_model_dir(model, out, tokenizer_dir, card(model) if card else None, wait_s=600)


def save_tokenizer(tokenizer_dir: str, out: Path, max_len: int) -> None:
    """The run's tokenizer beside the weights, as a causal LM's (bos and eos named, nothing
    after a text: :func:`~enigma.data.tokenizer.as_causal_tokenizer`), whatever form the data
    directory saved it in, and knowing the model's length: what lm-evaluation-harness and
    transformers read from it."""
    from ..data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir, quiet=True)
    tokenizer.model_max_length = max_len
    tokenizer.save_pretrained(out)


def write_model_dir(
    model, out: Path, tokenizer_dir: str | None, card: str | None = None, wait_s: float | None = 0
) -> None:
    """``save_pretrained`` (weights, config and the modelling code) + tokenizer + the model card
    (``README.md``) into a unique staging directory, then put in place whole
    (:func:`enigma.storage.atomic.replace_dir`), under the directory's lock, waited for up to
    ``wait_s`` seconds (None: the caller holds it)."""
    from transformers.utils import logging as hf_logging

    from ..storage.atomic import replace_with

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for every export

    def fill(staging: Path) -> None:
        model.save_pretrained(staging)
        if tokenizer_dir and Path(tokenizer_dir).is_dir():
            save_tokenizer(tokenizer_dir, staging, model.config.max_len)
        if card is not None:
            (staging / "README.md").write_text(card, encoding="utf-8")

    replace_with(out, fill, "an export", wait_s)


# ---------------------------------------------------------------------------------------------
# enigma export


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="an `enigma train` output directory, or its --storage-path")
    p.add_argument("out", help="the directory to write (replaced whole if it exists), or a URI")
    p.add_argument(
        "--step",
        default="best",
        help="best (the run's exported best model), latest, or a step with a kept checkpoint",
    )


def checkpoints(run_dir: Path) -> dict[int, Path]:
    """A run's checkpoints by step, those its fence trusts (:mod:`enigma.storage.fence`)."""
    from ..storage import fence as fences
    from ..storage.store import Storage

    storage = Storage(str(run_dir.resolve()))
    fence = fences.read(storage)[0]
    return {c.step: run_dir.joinpath(*c.parts) for c in fences.checkpoints(storage, fence)}


def consolidated_weights(checkpoint: Path) -> dict:
    """The full fp32 weights of a checkpoint, from DeepSpeed's shards (any ZeRO stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DS_TAG)


def export_run(run_dir: str, out: str, step: str = "best") -> dict:
    """Write ``out`` from a run's best model or one of its checkpoints, holding ``out``'s lock
    throughout; returns what was used. Either may be a storage URI: a run there is read from a
    copy of what the export needs (never written); an ``out`` there is built here and put in
    place as a run's export is (:meth:`Storage.replace_model`), under its parent's lock."""
    from ..storage.atomic import model_lock
    from ..storage.store import Storage

    with tempfile.TemporaryDirectory(prefix="enigma-export-run-") as tmp:
        run = _fetched_run(run_dir, step, Path(tmp)) if "://" in run_dir else Path(run_dir)
        if "://" not in out:
            with model_lock(Path(out), "enigma export"):
                return _export_locked(run, out, step)
        given = Storage.at(out, "out")
        if "/" not in given.root.split("://", 1)[1].strip("/"):
            raise InputError(f"out {out}: name a prefix in the bucket, e.g. s3://bucket/models/m")
        root, _, name = given.root.rpartition("/")
        parent = Storage(root, given.query)
        parent.check("out")
        with parent.lock("enigma export"):
            done = _export_locked(run, str(Path(tmp) / "out"), step)
            parent.replace_model(Path(tmp) / "out", name)
        return {**done, "out": out}


def _fetched_run(run_dir: str, step: str, tmp: Path) -> Path:
    """The part of a run at a URI that an export of ``step`` reads, laid out as the run is:
    every kept checkpoint's state files, the chosen checkpoint whole, the exported model."""
    import pyarrow.fs as pafs

    from ..storage import fence as fences
    from ..storage.mirror import local_model
    from ..storage.store import Storage

    storage, run = Storage.at(run_dir, "run_dir"), tmp / "run"
    if "/" not in storage.root.split("://", 1)[1].strip("/"):  # a bucket, not a run in it
        raise InputError(f"{run_dir}: name the run's prefix, e.g. s3://bucket/runs/base")
    try:
        fence = fences.read(storage)[0]
        numbers = {c.step: c for c in fences.checkpoints(storage, fence)}
    except OSError as err:  # no bucket, no credentials, no route
        raise InputError(f"{run_dir} cannot be read from here ({err}); check the bucket and the "
                         "AWS_* variables (endpoint and credentials)") from None  # fmt: skip
    if not numbers:
        raise InputError(f"{run_dir} has no checkpoints (ray/train/step-*): give the "
                         "--storage-path of an `enigma train` run")  # fmt: skip
    run.mkdir(parents=True)
    (run / fences.FENCE).write_text(fence.to_json())
    chosen = max(numbers) if step == "latest" else int(step) if step.isdigit() else None
    for number, found in numbers.items():
        fs, where = storage.filesystem(*found.parts)
        local = run.joinpath(*found.parts)
        local.mkdir(parents=True)
        if number == chosen:
            pafs.copy_files(where, str(local), source_filesystem=fs)
            continue
        for small in (RUN_FILE, STATE_FILE):
            if fs.get_file_info(f"{where}/{small}").is_file:
                pafs.copy_files(f"{where}/{small}", str(local / small), source_filesystem=fs)
    if storage.read_text("model", "config.json") or storage.read_text(".model.next",
                                                                        "config.json"):  # fmt: skip
        shutil.copytree(local_model(storage.uri("model"), "run_dir"), run / "model")
    return run


def _export_locked(run: Path, out: str, step: str) -> dict:
    from ..models.lm import EnigmaLM
    from ..storage.atomic import readable
    from .config import TrainConfig

    run_dir = str(run)
    kept = checkpoints(run)
    if not kept:
        raise InputError(
            f"{run_dir} has no checkpoints (ray/train/step-*): give an `enigma train` output "
            "directory"
        )
    latest = kept[max(kept)]
    info = json.loads((latest / RUN_FILE).read_text()) if (latest / RUN_FILE).is_file() else {}
    if not info:
        raise InputError(f"{latest} has no {RUN_FILE} (written by an older version): retrain")
    state = TrainState.from_json((latest / STATE_FILE).read_text())
    model_dir = run / "model"
    readable(model_dir)  # an export killed between its renames set the model aside
    if step == "best":
        if not (model_dir / "config.json").is_file():
            raise InputError(f"{run_dir} has no exported model yet: use --step latest or a step")
        model = EnigmaLM.from_pretrained(model_dir)
        at, val = state.best_step, state.best_val
    else:
        at = max(kept) if step == "latest" else _step_number(step, kept)
        cfg = TrainConfig.from_dict(info["config"])
        with tempfile.TemporaryDirectory(prefix="enigma-export-") as tmp:
            copy = pinned(kept[at], Path(tmp))
            chosen = TrainState.from_json((copy / STATE_FILE).read_text())
            model = checkpoint_model(cfg, consolidated_weights(copy), kept[at])
        val = chosen.last_val if chosen.last_val_step == chosen.step else None
    card = render_card(model, info, val, at)
    with tempfile.TemporaryDirectory(prefix="enigma-tokenizer-") as tmp:
        tokenizer = _tokenizer_files(model_dir, Path(tmp))
        write_model_dir(model, Path(out), tokenizer, card, wait_s=None)
    return {"step": at, "val_loss": val, "out": str(Path(out).resolve())}


def pinned(checkpoint: Path, tmp: Path) -> Path:
    """A copy of ``checkpoint`` in ``tmp``, made before anything is read from it: a live run
    keeps only its newest checkpoints and deletes an older one as it writes a new one, which
    would otherwise vanish half-read."""
    from .checkpoint import damage

    copy = tmp / checkpoint.name
    try:
        shutil.copytree(checkpoint, copy)
    except (FileNotFoundError, shutil.Error):
        raise InputError(
            f"{checkpoint} was deleted while it was read (a run in progress keeps only its "
            "newest checkpoints): export a newer step, or --step best"
        ) from None
    problem = damage(str(copy))
    if problem:
        raise InputError(f"{checkpoint} is damaged ({problem}): export another step")
    return copy


def checkpoint_model(cfg, weights: dict, where: Path):
    """The model a checkpoint's full weights make: EnigmaLM, or for a fine-tuning run its base
    with the adapter, merged."""
    if cfg.base_model:
        from .tuning import build_model

        # Only what trained: DeepSpeed keeps no fp32 master of a frozen weight, so the
        # checkpoint's copy of one is rounded to the training precision; the base on disk is not.
        tuned = build_model(cfg)
        trained = {n for n, p in tuned.named_parameters() if p.requires_grad}
        tuned.load_state_dict({k: v for k, v in weights.items() if k in trained}, strict=False)
        return tuned if cfg.full else tuned.merge_and_unload()
    return lm_from_weights(cfg.model_config(), weights, where)


def _step_number(step: str, kept: dict[int, Path]) -> int:
    steps = ", ".join(map(str, sorted(kept)))
    if not step.isdigit() or int(step) not in kept:
        raise InputError(f"--step {step}: the run kept checkpoints at steps {steps}; or use best")
    return int(step)


MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "README.md"}


def _tokenizer_files(model_dir: Path, tmp: Path) -> str | None:
    """The run's tokenizer, as its export holds it: the files that are not the model's."""
    if not model_dir.is_dir():
        return None
    files = [
        f
        for f in model_dir.iterdir()
        if f.is_file() and f.name not in MODEL_FILES and f.suffix not in (".py", ".bin")
    ]
    for f in files:
        shutil.copy(f, tmp / f.name)
    return str(tmp) if files else None


def run(args: argparse.Namespace) -> dict:
    done = export_run(args.run_dir, args.out, args.step)
    val = done["val_loss"]
    figure = f"val ppl {math.exp(val):.2f}" if val is not None else "not evaluated"
    print(f"exported step {done['step']} ({figure}) to {done['out']}")
    print(f"load: AutoModelForCausalLM.from_pretrained({done['out']!r}, trust_remote_code=True)")
    print(f"model card: {done['out']}/README.md")
    return done


def export_finetuned(engine, cfg, spec, rank: int, stage: int, card) -> None:
    """Rank 0 writes ``adapter/`` (LoRA) and ``model/`` (merged): the base model with the trained
    parameters' fp32 masters (every rank takes part in gathering them)."""
    weights = gathered_weights(engine, rank, stage, trained_only=True)
    if weights is None:
        return
    from ..storage.atomic import replace_with
    from .tuning import build_model

    # The frozen weights from the base model on disk, in fp32, the trained ones from their fp32
    # masters: the adapter and the merge see neither rounded to the training precision.
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise RuntimeError(f"export: the run trained parameters the model lacks: {unexpected}")
    if not cfg.full:
        replace_with(Path(spec.local_dir("adapter")), model.save_pretrained, "an export", 600)
        model = model.merge_and_unload()
    write_model_dir(model, Path(spec.local_dir("model")), spec.tokenizer_dir, card(model), 600)
