"""``enigma bench finetune``: can fine-tuning teach the demo model an instruction it cannot follow?

The task is synthetic and seeded. By default ``把这些字从小到大排好：七三九三一`` ("put these
characters in order, smallest first") is to be answered ``一三三七九``, for strings of Chinese
numerals (repeats allowed) that the training rows never show (their answers may: another
ordering of the same numerals has the same answer); ``--task reverse`` asks for the
string backwards instead (``把这些字倒过来：``), which needs each answer token's position mirrored
across the prompt. The pretrained demo model (``make demo``: ``runs/demo/model``) continues text;
it does not follow instructions. Each method runs through ``enigma finetune`` itself (Ray Train
workers, DeepSpeed ZeRO-2, the chat template, the loss on the assistant's tokens): LoRA on the
attention projections and the MLP, and full fine-tuning. Reported: held-out exact match (greedy,
batched, the reply up to ``[SEP]`` equal to the answer) before and after, the share of the
parameters each trains, the steps and the seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

from ..errors import InputError
from . import meta

DIGITS = "一二三四五六七八九"
# What each task asks, and its answer to a string of numerals.
TASKS = {
    "sort": ("把这些字从小到大排好：", lambda text: "".join(sorted(text, key=DIGITS.index))),
    "reverse": ("把这些字倒过来：", lambda text: text[::-1]),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="runs/demo/model", help="the pretrained model (make demo)")
    p.add_argument("--task", choices=sorted(TASKS), default="sort")
    p.add_argument("--length", type=int, default=5, help="characters per string")
    p.add_argument("--train-rows", type=int, default=3000)
    p.add_argument("--val-rows", type=int, default=200)
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per method")
    p.add_argument("--lora-lr", type=float, default=3e-3)
    p.add_argument("--full-lr", type=float, default=5e-4)
    p.add_argument("--lora-targets", default="attention,mlp", help="of attention, mlp, coupling")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs/bench-finetune")
    p.add_argument("--json", dest="json_out", default=None)


def make_rows(count: int, length: int, rng: random.Random, avoid: set, task: str) -> list[dict]:
    """``count`` distinct rows of ``task`` whose strings are not in ``avoid`` (which they join)."""
    instruction, answer = TASKS[task]
    if count + len(avoid) > len(DIGITS) ** length:
        raise InputError(f"--length {length} has fewer than {count + len(avoid)} strings")
    rows = []
    while len(rows) < count:
        text = "".join(rng.choice(DIGITS) for _ in range(length))
        if text not in avoid:
            avoid.add(text)
            rows.append({"instruction": instruction + text, "output": answer(text)})
    return rows


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return str(path)


def exact_match(model_dir: str, rows: list[dict], batch: int = 50) -> float:
    """The share of ``rows`` whose greedy reply (up to ``[SEP]``) is exactly the answer, the
    prompts made by the chat template and left-padded into batches."""
    import torch

    from ..data.conversations import to_messages, with_chat_template
    from ..data.tokenizer import join_cjk, load_tokenizer
    from ..inference.generate import load_model

    model = load_model(model_dir)
    tokenizer = with_chat_template(load_tokenizer(model_dir, quiet=True))
    right = 0
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        prompts = [
            tokenizer.apply_chat_template(to_messages(r, "bench")[:1], add_generation_prompt=True)
            for r in chunk
        ]
        width = max(len(p["input_ids"]) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p["input_ids"])) + p["input_ids"] for p in prompts])
        mask = torch.tensor([[0] * (width - len(p["input_ids"])) + [1] * len(p["input_ids"])
                             for p in prompts])  # fmt: skip
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0,
                                 max_new_tokens=len(chunk[0]["output"]) + 2)  # fmt: skip
        for row, new in zip(chunk, out[:, width:], strict=True):
            reply = join_cjk(tokenizer.decode(new, skip_special_tokens=True)).replace(" ", "")
            right += reply == row["output"]
    return right / len(rows)


def finetune(args, method: str, files: dict, work: Path) -> dict:
    """One ``enigma finetune`` run of ``method``; its merged model's directory and figures."""
    from ..train.config import build_config
    from ..train.driver import train
    from ..train.finetune import DEFAULTS
    from ..train.tuning import build_model, trainable_share

    lr = args.lora_lr if method == "lora" else args.full_lr
    out = work / method
    shutil.rmtree(out, ignore_errors=True)  # an earlier benchmark's run: start afresh, not resume
    seq_len = max(32, 2 * args.length + 22)  # the template, the instruction, the string twice
    sets = [*DEFAULTS, f"lr={lr}", "micro_batch=16", f"seq_len={seq_len}", "eval_steps=100",
            "early_stop_patience=0", "shuffle_buffer=64", f"seed={args.seed}",
            f"lora_targets={args.lora_targets}", f"lora_r={args.lora_r}",
            f"lora_alpha={2 * args.lora_r}"]  # fmt: skip
    cfg = build_config(None, None, sets, base_model=files["model"], conversations=files["train"],
                       val_data=files["val"], full=method == "full", workers=args.workers,
                       max_steps=args.steps, output_dir=str(out),
                       data=str(out / "data"))  # fmt: skip
    start = time.perf_counter()
    summary = train(cfg, command=args.command_line)
    seconds = time.perf_counter() - start
    trained, total = trainable_share(build_model(cfg))
    return {"model": str(out / "model"), "seconds": round(seconds, 1), "steps": summary["steps"],
            "trainable": trained, "parameters": total, "share": trained / total,
            "best_val_ppl": summary["best_val_ppl"], "lr": lr}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    from ..train.config import base_model_dir

    if not (Path(args.model) / "config.json").is_file() and args.model == "runs/demo/model":
        raise InputError("runs/demo/model is missing: run `make demo` first, or give --model")
    model = str(base_model_dir(args.model))
    work = Path(args.output_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rng, seen = random.Random(args.seed), set()
    val = make_rows(args.val_rows, args.length, rng, seen, args.task)
    train_rows = make_rows(args.train_rows, args.length, rng, seen, args.task)
    files = {"model": model, "train": write_rows(work / "train.jsonl", train_rows),
             "val": write_rows(work / "val.jsonl", val)}  # fmt: skip
    result = {"benchmark": "finetune", "task": f"{args.task} {args.length} Chinese numerals",
              "base_model": args.model, "train_rows": len(train_rows), "val_rows": len(val),
              "before": exact_match(model, val), "methods": {}}  # fmt: skip
    print(f"held-out exact match before fine-tuning: {result['before']:.1%}", flush=True)
    for method in args.methods.split(","):
        tuned = finetune(args, method, files, work)
        tuned["after"] = exact_match(tuned["model"], val)
        result["methods"][method] = tuned
        print(f"{method}: held-out exact match {tuned['after']:.1%} after {tuned['steps']} steps "
              f"({tuned['seconds']:.0f} s), training {tuned['share']:.2%} of the parameters",
              flush=True)  # fmt: skip
    meta.save(result, args.json_out, args.command_line)
    return result
