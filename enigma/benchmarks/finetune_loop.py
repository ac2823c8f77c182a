"""One fine-tuning run of the benchmark, in this process, and exact match by the serving engine.

The model is what ``enigma finetune`` trains (:func:`enigma.train.tuning.build_model`: PEFT's
LoRA on the chosen targets with the final LayerNorm trained whole, or every weight), on rows
encoded as it encodes them (:func:`enigma.data.conversations.encode`: the loss on the assistant's
tokens), with its optimizer (AdamW, its weight decay) and its schedule (linear warmup, cosine
decay). What it leaves out is the distributed system around the step (Ray Train, DeepSpeed),
whose start would cost more than many of these runs: ``tests/test_finetune.py`` trains through
that system. Every ``eval_every`` steps the dev rows are decoded greedily; the state with the
best dev exact match is kept, and the test rows are decoded once, from it, at the end.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import torch


@dataclass
class Recipe:
    """What a run trains and how (the benchmark's defaults, or one point of its curve)."""

    method: str = "lora"  # lora or full
    lr: float = 3e-3
    steps: int = 600
    lora_r: int = 16
    lora_targets: str = "attention,mlp"
    batch: int = 32
    eval_every: int = 100


def exact_match(model, tokenizer, rows: list[dict], max_rows: int = 64) -> float:
    """The share of ``rows`` whose greedy reply (to the chat template's prompt) is exactly the
    answer, decoded by the serving engine, all rows in flight together."""
    from ..data.conversations import encode_chat, to_messages
    from ..serve.engine import Engine
    from ..serve.sampling import Sampling

    engine = Engine(model, tokenizer, max_rows=max_rows, max_queue=len(rows))
    replies: dict[str, str] = {}
    for i, row in enumerate(rows):
        prompt, _ = encode_chat(tokenizer, to_messages(row, "bench")[:1], True)
        greedy = Sampling(max_tokens=len(row["output"]) + 2, temperature=0)
        engine.submit([engine.request(str(i), prompt, greedy, continues_prompt=False)])
        replies[str(i)] = ""
    while engine.has_work():
        for out in engine.step():
            replies[out.id] += out.text
    return sum(replies[str(i)].strip() == r["output"] for i, r in enumerate(rows)) / len(rows)


def finetune(base: str, rows: dict[str, list], recipe: Recipe, seed: int) -> dict:
    """Train ``recipe`` on ``rows["train"]`` from the saved model ``base``; dev picks the
    checkpoint, test is scored once. Returns the figures and the run's seconds."""
    from ..data.conversations import encode, encode_chat, to_messages, with_chat_template
    from ..data.tokenizer import load_tokenizer
    from ..train.config import build_config
    from ..train.finetune import DEFAULTS
    from ..train.schedule import lr_at
    from ..train.tuning import build_model, trainable_share

    with tempfile.TemporaryDirectory(prefix="enigma-bench-ft-") as tmp:
        sets = [*DEFAULTS, f"lr={recipe.lr}", f"seed={seed}", f"lora_r={recipe.lora_r}",
                f"lora_alpha={2 * recipe.lora_r}",
                f"lora_targets={recipe.lora_targets}"]  # fmt: skip
        cfg = build_config(None, None, sets, base_model=base, conversations="-", output_dir=tmp,
                           data=tmp, full=recipe.method == "full")  # fmt: skip
    tokenizer = with_chat_template(load_tokenizer(base, quiet=True))
    conversations = [to_messages(r, "bench") for r in rows["train"]]
    seq_len = max(len(encode_chat(tokenizer, c)[0]) for c in conversations)
    arrays, _ = encode(tokenizer, conversations, seq_len)
    data = {k: torch.from_numpy(v).long() for k, v in arrays.items()}
    torch.manual_seed(seed)
    model = build_model(cfg)
    trained, total = trainable_share(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=cfg.weight_decay)
    order = torch.Generator().manual_seed(seed)
    warmup = max(1, int(cfg.warmup_ratio * recipe.steps))
    best, best_state, curve = -1.0, None, []
    start = time.perf_counter()
    for step in range(recipe.steps):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, recipe.steps, warmup)
        pick = torch.randint(len(data["input_ids"]), (recipe.batch,), generator=order)
        batch = {k: v[pick] for k, v in data.items()}
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            dev = exact_match(model, tokenizer, rows["dev"])
            curve.append({"step": step + 1, "loss": loss.item(), "dev": dev})
            if dev > best:
                best = dev
                best_state = {n: p.detach().clone() for n, p in model.named_parameters()
                              if p.requires_grad}  # fmt: skip
    seconds = time.perf_counter() - start
    with torch.no_grad():
        named = dict(model.named_parameters())
        for name, value in best_state.items():
            named[name].copy_(value)
    test = exact_match(model, tokenizer, rows["test"])
    return {"test": test, "dev": best, "best_step": max(curve, key=lambda c: c["dev"])["step"],
            "curve": curve, "seconds": round(seconds, 1), "trainable": trained,
            "parameters": total, "share": trained / total}  # fmt: skip
