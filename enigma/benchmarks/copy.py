"""``enigma bench copy``: the copy-memory task (Arjovsky, Shah and Bengio, 2016).

A sequence is 10 symbols drawn from 8, then T blanks, then a marker, and the model must then
recall the 10 symbols in order; the loss is on the 10 recalled symbols only. Two variants:
``--variant teacher`` feeds the true previous symbols at the recall positions (next-token
prediction of ``s1..s10, 0 x T, 9, s1..s10``), ``--variant blank`` feeds blanks there, as the
original task does, so the model must hold all ten symbols. Models of similar size train for
the same steps on the same freshly drawn batches: EnigmaLM (``enigma``; ``enigma-random`` with
``rotor_offset="random"``; ``enigma-rev`` with reversible layers), the plain Transformer
(EnigmaLM without its machine, its MLP widened to the same parameter count) and a 2-layer LSTM of
the same size. The Transformers use learned positions (copying needs an exact offset, which
ALiBi's distance penalty cannot express).

Reported per model: accuracy on the recalled symbols of 2,048 held-out sequences, and
cross-entropy against the memoryless baseline, which guesses uniformly among the 8 symbols:
ln 8 per recalled symbol, 10·ln 8/(T+20) averaged over the T+20 positions of the original task.
With ``--seeds N`` every model trains N times (seed s: its start, its batches and its held-out
set), and the figures are mean ± standard deviation, with each model's difference to the plain
Transformer taken seed by seed (the same batches).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from ..errors import InputError
from . import meta
from .seeds import summarize

SYMBOLS, BLANK, MARKER, VOCAB, RECALL = 8, 0, 9, 10, 10
VARIANTS = ("teacher", "blank")
MODELS = ("enigma", "enigma-random", "enigma-rev", "transformer", "lstm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--delay", type=int, default=50, help="T, the blanks between symbols and marker")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--seeds", type=int, default=1, help="seeds per model")
    p.add_argument("--variant", choices=VARIANTS, default="teacher")
    p.add_argument("--models", default="enigma,transformer,lstm", help=f"from {', '.join(MODELS)}")
    p.add_argument("--smoke", action="store_true", help="a few steps, to check that it runs")
    p.add_argument("--json", dest="json_out", default=None)


def make_batch(
    batch: int, delay: int, generator: torch.Generator, variant: str = "teacher"
) -> torch.Tensor:
    """``(batch, T + 30)``: the inputs (``T + 20`` tokens) then the 10 target symbols. At the
    recall positions the inputs are the previous symbols (``teacher``) or blanks (``blank``)."""
    symbols = torch.randint(1, SYMBOLS + 1, (batch, RECALL), generator=generator)
    blanks = torch.full((batch, delay), BLANK)
    marker = torch.full((batch, 1), MARKER)
    recall = symbols[:, :-1] if variant == "teacher" else torch.full((batch, RECALL - 1), BLANK)
    return torch.cat([symbols, blanks, marker, recall, symbols], dim=1)


def split(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return seq[:, :-RECALL], seq[:, -RECALL:]


def recall_logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Logits that predict the 10 recalled symbols: the last 10 input positions (marker on)."""
    return model(inputs)[:, -RECALL:]


class LSTMModel(nn.Module):
    def __init__(self, hidden: int, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(ids))[0])


class LMLogits(nn.Module):
    """An EnigmaLM that returns logits only."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids).logits


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_models(names: list[str], d: int, delay: int, seed: int = 0) -> dict[str, nn.Module]:
    from enigma.models.lm import EnigmaLM
    from enigma.models.lm_config import EnigmaConfig

    from .lm import matched_plain_transformer

    shape = dict(
        vocab_size=VOCAB, d=d, num_heads=4, num_transformer_layers=2, num_rev_blocks=2,
        num_rotors=2, use_alibi=False, max_len=delay + 2 * RECALL,
        rotor_positions=min(16, d), bos_token_id=MARKER, eos_token_id=MARKER, pad_token_id=0,
    )  # fmt: skip
    variants = {"enigma": {}, "enigma-random": {"rotor_offset": "random"}}
    variants["enigma-rev"] = {"reversible_layers": True}
    models: dict[str, nn.Module] = {}
    for name in names:
        torch.manual_seed(seed)
        if name in variants:
            models[name] = LMLogits(EnigmaLM(EnigmaConfig(**shape, **variants[name])))
        elif name == "transformer":  # a wider MLP makes up the machine's parameters
            target = params(EnigmaLM(EnigmaConfig(**shape)))
            torch.manual_seed(seed)
            models[name] = LMLogits(matched_plain_transformer(shape, target))
        elif name == "lstm":
            target = params(LMLogits(EnigmaLM(EnigmaConfig(**shape))))
            # 2-layer LSTM: about 8h² per layer (+ embedding and head); match the machine LM.
            hidden = max(8, int(math.sqrt(target / 16)))
            while params(LSTMModel(hidden + 1)) <= target:
                hidden += 1
            torch.manual_seed(seed)
            models[name] = LSTMModel(hidden)
        else:
            raise InputError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return models


@torch.no_grad()
def evaluate(model: nn.Module, test: torch.Tensor) -> dict:
    model.eval()
    correct, ce = 0, 0.0
    for chunk in test.split(256):
        inputs, target = split(chunk)
        logits = recall_logits(model, inputs).float()
        correct += (logits.argmax(-1) == target).sum().item()
        ce += nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), target.reshape(-1), reduction="sum"
        ).item()
    model.train()
    n = test.shape[0] * RECALL
    return {"accuracy": correct / n, "ce_recall": ce / n}


def train(model: nn.Module, args, test: torch.Tensor, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)  # the same batches for every model of a seed
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1
    )
    curve, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        inputs, target = split(make_batch(args.batch, args.delay, gen, args.variant))
        logits = recall_logits(model, inputs)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            curve.append({"step": step, **evaluate(model, test[:512])})
    seconds = time.perf_counter() - start
    return {**evaluate(model, test), "train_seconds": seconds, "curve": curve}


def run(args: argparse.Namespace) -> dict:
    if args.delay < 1:
        raise InputError(f"--delay {args.delay}: must be at least 1")
    if args.seeds < 1:
        raise InputError(f"--seeds {args.seeds}: must be at least 1")
    if args.smoke:
        args.steps, args.batch = 6, 8
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    build_models(names, 8, 1)  # unknown names fail here, before any training
    baseline = {
        "ce_recall": math.log(SYMBOLS),
        "ce_task": RECALL * math.log(SYMBOLS) / (args.delay + 20),
    }
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(
        f"copy memory ({args.variant}), T={args.delay}: {args.steps} steps of {args.batch} "
        f"sequences, lr {args.lr}, seeds {seeds}; memoryless baseline ln 8 = "
        f"{baseline['ce_recall']:.3f} per recalled symbol, 10 ln 8/(T+20) = "
        f"{baseline['ce_task']:.4f} per position"
    )
    runs: dict[str, list[dict]] = {name: [] for name in names}
    sizes: dict[str, int] = {}
    for seed in seeds:
        test = make_batch(2048, args.delay, torch.Generator().manual_seed(10_000 + seed),
                          args.variant)  # fmt: skip
        for name, model in build_models(names, args.d, args.delay, seed).items():
            sizes[name] = params(model)
            r = train(model, args, test, seed)
            runs[name].append({"seed": seed, **r})
            print(
                f"  seed {seed} {name:<13} {sizes[name]:>8,} params  accuracy "
                f"{r['accuracy']:7.2%}  CE {r['ce_recall']:.4f}/symbol  "
                f"{r['train_seconds']:.0f} s",
                flush=True,
            )
    results = []
    for name in names:
        per_seed = runs[name]
        plain = runs.get("transformer") if name != "transformer" else None
        row = {"model": name, "params": sizes[name], "steps": args.steps,
               **summarize(per_seed, ("accuracy", "ce_recall"), plain)}  # fmt: skip
        row["ce_task"] = row["ce_recall"] * RECALL / (args.delay + 20)
        row["curve"] = per_seed[0]["curve"]
        row["seeds"] = [{k: v for k, v in r.items() if k != "curve"} for r in per_seed]
        results.append(row)
        spread = f" ± {row['accuracy_std']:.2%}" if len(seeds) > 1 else ""
        print(f"  {name:<13} accuracy {row['accuracy']:.2%}{spread} over {len(seeds)} seed(s)")
    result = {
        "benchmark": "copy",
        "variant": args.variant,
        "delay": args.delay,
        "batch": args.batch,
        "lr": args.lr,
        "d": args.d,
        "seeds": seeds,
        "memoryless_baseline": baseline,
        "models": results,
    }
    return meta.save(result, args.json_out, args.command_line)
