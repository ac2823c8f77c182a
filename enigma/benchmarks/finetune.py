"""``enigma bench finetune``: what fine-tuning teaches a pretrained model, held out honestly, with
the plain Transformer beside EnigmaLM.

Three tasks on strings of Chinese numerals (:mod:`enigma.benchmarks.finetune_tasks`): ``sort``
(content), ``reverse`` and ``rotate`` (position). Splits are made by answer: no test answer is
the answer of any training row. Each base model (EnigmaLM and the plain Transformer of its shape,
both pretrained with the demo's recipe: ``enigma bench eval`` trains them) is fine-tuned with
LoRA (rank 16 on attention and MLP, the final LayerNorm whole) and fully, for three seeds
(each seed its own split, sample and start); dev picks the checkpoint, test is scored once
(:mod:`enigma.benchmarks.finetune_loop`). Reported: test exact match before and after, mean ±
std over seeds, the trained share of the parameters, the steps and the seconds.

``--curve`` adds, for the position tasks (``--curve-tasks``) and both models (seed 0), what
LoRA is given beyond the default: rank 64, the head or the embedding as targets too, twice the
steps, three times the learning rate, a base pretrained three times as long. The default recipe
was fixed before the curve was run; nothing in it is chosen on test.

Runs go ``--parallel`` at a time, one process and one thread each.
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

from ..errors import InputError
from . import meta
from .finetune_loop import Recipe
from .finetune_tasks import POSITION_TASKS, TASKS, answers_shared, make_splits

CURVE = {
    "rank 64": {"lora_r": 64},
    "+ head": {"lora_targets": "attention,mlp,head"},
    "+ embedding": {"lora_targets": "attention,mlp,embedding"},
    "2x steps": {"steps": 2},  # a multiple of the default
    "3x learning rate": {"lr": 3},  # a multiple of the default
    "base pretrained 3x as long": {},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--enigma", default="runs/bench-eval/enigma-s0/model",
                   help="the pretrained EnigmaLM (enigma bench eval trains it)")  # fmt: skip
    p.add_argument("--plain", default="runs/bench-eval/plain-s0/model",
                   help="the plain Transformer, pretrained the same way")  # fmt: skip
    p.add_argument("--tasks", default="sort,reverse,rotate")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--length", type=int, default=5, help="numerals per string")
    p.add_argument("--train-rows", type=int, default=3000)
    p.add_argument("--dev-rows", type=int, default=150)
    p.add_argument("--test-rows", type=int, default=200)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lora-lr", type=float, default=3e-3)
    p.add_argument("--full-lr", type=float, default=5e-4)
    p.add_argument("--curve", action="store_true", help="also what LoRA needs (position tasks)")
    p.add_argument("--curve-tasks", default=",".join(POSITION_TASKS),
                   help="the position tasks the curve covers")  # fmt: skip
    p.add_argument("--enigma-long", default="runs/bench-eval/enigma-long/model")
    p.add_argument("--plain-long", default="runs/bench-eval/plain-long/model")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--json", dest="json_out", default=None)


def _one(job: dict) -> dict:
    """A job in a pool process: its task's rows for its seed, then the run."""
    import torch

    from .finetune_loop import finetune

    torch.set_num_threads(1)
    rows = make_splits(job["task"], job["length"], job["sizes"], job["seed"])
    if answers_shared(rows):
        raise RuntimeError(f"{job['task']}: a test answer is also a training answer")
    result = finetune(job["base"], rows, Recipe(**job["recipe"]), job["seed"])
    return {**{k: job[k] for k in ("task", "model", "seed", "variant")}, **result,
            "recipe": job["recipe"]}  # fmt: skip


def _before(job: dict) -> dict:
    """The base model's test exact match, untrained."""
    import torch

    from ..data.conversations import with_chat_template
    from ..data.tokenizer import load_tokenizer
    from ..inference.generate import load_model
    from .finetune_loop import exact_match

    torch.set_num_threads(1)
    rows = make_splits(job["task"], job["length"], job["sizes"], job["seed"])
    tokenizer = with_chat_template(load_tokenizer(job["base"], quiet=True))
    score = exact_match(load_model(job["base"]), tokenizer, rows["test"])
    return {**{k: job[k] for k in ("task", "model", "seed")}, "before": score}


def jobs(args: argparse.Namespace, bases: dict) -> tuple[list, list]:
    sizes = {"train": args.train_rows, "dev": args.dev_rows, "test": args.test_rows}
    common = {"length": args.length, "sizes": sizes}
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    recipes = {"lora": Recipe("lora", args.lora_lr, args.steps),
               "full": Recipe("full", args.full_lr, args.steps)}  # fmt: skip
    runs, before = [], []
    for task in tasks:
        for model, base in bases.items():
            for seed in seeds:
                before.append({**common, "task": task, "model": model, "seed": seed, "base": base})
                for method in args.methods.split(","):
                    runs.append({**common, "task": task, "model": model, "seed": seed,
                                 "base": base, "variant": method,
                                 "recipe": asdict(recipes[method])})  # fmt: skip
    if args.curve:
        default = recipes["lora"]
        for task in [t for t in tasks if t in args.curve_tasks.split(",")]:
            for model, base in bases.items():
                for name, change in CURVE.items():
                    recipe, where = default, base
                    if "steps" in change:
                        recipe = replace(default, steps=default.steps * change["steps"])
                    elif "lr" in change:
                        recipe = replace(default, lr=default.lr * change["lr"])
                    elif change:
                        recipe = replace(default, **change)
                    else:
                        where = args.enigma_long if model == "enigma" else args.plain_long
                    runs.append({**common, "task": task, "model": model, "seed": seeds[0],
                                 "base": where, "variant": f"lora, {name}",
                                 "recipe": asdict(recipe)})  # fmt: skip
    return runs, before


def summarise(runs: list[dict], before: list[dict]) -> dict:
    """Per task, model and method: each seed's figures, their mean and std."""
    table: dict = {}
    for r in runs:
        if not r["variant"].startswith("lora, "):
            cell = table.setdefault(r["task"], {}).setdefault(r["model"], {})
            cell.setdefault(r["variant"], []).append(r)
    out = {}
    for task, models in table.items():
        for model, methods in models.items():
            start = [b["before"] for b in before if (b["task"], b["model"]) == (task, model)]
            entry = out.setdefault(task, {}).setdefault(model, {"before": _stats(start)})
            for method, seeds in methods.items():
                entry[method] = {"test": _stats([s["test"] for s in seeds]),
                                 "dev": _stats([s["dev"] for s in seeds]),
                                 "seconds": _stats([s["seconds"] for s in seeds]),
                                 "steps": seeds[0]["recipe"]["steps"], "share": seeds[0]["share"],
                                 "trainable": seeds[0]["trainable"],
                                 "lr": seeds[0]["recipe"]["lr"]}  # fmt: skip
    return out


def _stats(values: list[float]) -> dict:
    return {"values": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    from ..train.config import base_model_dir

    bases = {}
    for name, path in (("enigma", args.enigma), ("plain", args.plain)):
        if not (Path(path) / "config.json").is_file():
            raise InputError(f"{path} is missing: run `enigma bench eval` (it pretrains both "
                             f"models), or give --{name}")  # fmt: skip
        bases[name] = str(base_model_dir(path))
    if args.curve:
        for path in (args.enigma_long, args.plain_long):
            if not (Path(path) / "config.json").is_file():
                raise InputError(f"{path} is missing: `enigma bench eval --long` trains it")
    unknown = set(args.tasks.split(",")) - set(TASKS)
    if unknown:
        raise InputError(f"--tasks: unknown {', '.join(sorted(unknown))}; of {', '.join(TASKS)}")
    unknown = set(args.curve_tasks.split(",")) - set(POSITION_TASKS)
    if unknown:
        raise InputError(f"--curve-tasks: {', '.join(sorted(unknown))} is not a position task; "
                         f"of {', '.join(POSITION_TASKS)}")  # fmt: skip
    runs, before = jobs(args, bases)
    # Finished runs go to a journal beside the JSON as they end, so a benchmark that is stopped
    # (it runs for an hour or more) picks up where it was when run again with the same settings.
    journal = Path(f"{args.json_out}.partial.jsonl") if args.json_out else None
    finished = _journalled(journal)
    todo = [j for j in runs if _key(j) not in finished]
    resumed = len(runs) - len(todo)
    resumed = f" ({resumed} already done, from {journal})" if resumed else ""
    print(f"{len(runs)} fine-tuning runs, {args.parallel} at a time{resumed}", flush=True)
    if journal is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(args.parallel, mp_context=get_context("spawn")) as pool:
        started = list(pool.map(_before, before))
        futures = {pool.submit(_one, job): _key(job) for job in todo}
        for future in as_completed(futures):  # each journalled as it ends, whatever the order
            r = finished[futures[future]] = future.result()
            if journal is not None:
                with journal.open("a") as f:
                    f.write(json.dumps({"key": futures[future], "run": r}) + "\n")
            print(f"{r['task']}, {r['model']}, {r['variant']}, seed {r['seed']}: test exact match "
                  f"{r['test']:.1%} (dev {r['dev']:.1%} at step {r['best_step']}), "
                  f"{r['seconds']:.0f} s", flush=True)  # fmt: skip
    done = [finished[_key(j)] for j in runs]  # in the runs' order, resumed or not
    result = {"benchmark": "finetune", "tasks": args.tasks.split(","), "length": args.length,
              "rows": {"train": args.train_rows, "dev": args.dev_rows, "test": args.test_rows},
              "bases": {k: args.enigma if k == "enigma" else args.plain for k in bases},
              "parallel": args.parallel, "summary": summarise(done, started), "runs": done,
              "before": started}  # fmt: skip
    result["curve"] = [r for r in done if r["variant"].startswith("lora, ")]
    meta.save(result, args.json_out, args.command_line)
    if journal is not None:
        journal.unlink(missing_ok=True)
    return result


def _key(job: dict) -> str:
    """What makes a run the same run: everything it is given, and the base's weights as they are
    on disk (a base pretrained again in place is another base)."""
    weights = Path(job["base"]) / "model.safetensors"
    found = weights.stat() if weights.is_file() else None
    base = [found.st_size, found.st_mtime_ns] if found else None
    return json.dumps({**job, "base_weights": base}, sort_keys=True)


def _journalled(journal: Path | None) -> dict:
    if journal is None or not journal.is_file():
        return {}
    kept = {}
    for line in journal.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # the line a kill cut short
            continue
        kept[entry["key"]] = entry["run"]
    return kept
