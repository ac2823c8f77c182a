"""``enigma bench copy``: the copy-memory task (Arjovsky, Shah and Bengio, 2016).

A sequence is 10 symbols drawn from 8, then T blanks, then a marker, and the model must then
recall the 10 symbols in order. As next-token prediction: ``s1..s10, 0 x T, 9, s1..s10`` with the
loss on the last 10 tokens only. Three models of similar size train for the same steps on the
same freshly drawn batches: EnigmaLM, the plain Transformer (EnigmaLM without its machine, its
MLP widened to the same parameter count) and a 2-layer LSTM of the same size. Both Transformers
use learned positions (copying needs an exact offset, which ALiBi's distance penalty cannot
express).

Reported per model: accuracy on the recalled symbols of 2,048 held-out sequences, and
cross-entropy against the memoryless baseline, which guesses uniformly among the 8 symbols:
ln 8 per recalled symbol, 10·ln 8/(T+20) averaged over the T+20 positions of the original task.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from ..errors import InputError
from . import meta

SYMBOLS, BLANK, MARKER, VOCAB, RECALL = 8, 0, 9, 10, 10


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--delay", type=int, default=50, help="T, the blanks between symbols and marker")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default="enigma,transformer,lstm")
    p.add_argument("--smoke", action="store_true", help="a few steps, to check that it runs")
    p.add_argument("--json", dest="json_out", default=None)


def make_batch(batch: int, delay: int, generator: torch.Generator) -> torch.Tensor:
    symbols = torch.randint(1, SYMBOLS + 1, (batch, RECALL), generator=generator)
    blanks = torch.full((batch, delay), BLANK)
    marker = torch.full((batch, 1), MARKER)
    return torch.cat([symbols, blanks, marker, symbols], dim=1)


def recall_logits(model: nn.Module, seq: torch.Tensor) -> torch.Tensor:
    """Logits that predict the 10 recalled symbols: positions marker .. end - 1."""
    logits = model(seq)
    return logits[:, -RECALL - 1 : -1]


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


def build_models(names: list[str], d: int, delay: int) -> dict[str, nn.Module]:
    from enigma.lm import EnigmaLM
    from enigma.lm_config import EnigmaConfig

    from .lm import matched_plain_transformer

    shape = dict(
        vocab_size=VOCAB, d=d, num_heads=4, num_transformer_layers=2, num_rev_blocks=2,
        num_rotors=2, use_alibi=False, max_len=delay + 2 * RECALL + 1,
        rotor_positions=min(16, d), bos_token_id=MARKER, eos_token_id=MARKER, pad_token_id=0,
    )  # fmt: skip
    models: dict[str, nn.Module] = {}
    for name in names:
        torch.manual_seed(0)
        if name == "enigma":
            models[name] = LMLogits(EnigmaLM(EnigmaConfig(**shape)))
        elif name == "transformer":  # a wider MLP makes up the machine's parameters
            target = params(EnigmaLM(EnigmaConfig(**shape)))
            models[name] = LMLogits(matched_plain_transformer(shape, target))
        elif name == "lstm":
            target = params(LMLogits(EnigmaLM(EnigmaConfig(**shape))))
            # 2-layer LSTM: about 8h² per layer (+ embedding and head); match the machine LM.
            hidden = max(8, int(math.sqrt(target / 16)))
            while params(LSTMModel(hidden + 1)) <= target:
                hidden += 1
            models[name] = LSTMModel(hidden)
        else:
            raise InputError(f"unknown model {name!r}; choose from enigma, transformer, lstm")
    return models


@torch.no_grad()
def evaluate(model: nn.Module, test: torch.Tensor) -> dict:
    model.eval()
    correct, ce = 0, 0.0
    for chunk in test.split(256):
        logits = recall_logits(model, chunk).float()
        target = chunk[:, -RECALL:]
        correct += (logits.argmax(-1) == target).sum().item()
        ce += nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), target.reshape(-1), reduction="sum"
        ).item()
    model.train()
    n = test.shape[0] * RECALL
    return {"accuracy": correct / n, "ce_recall": ce / n}


def train(model: nn.Module, args, test: torch.Tensor) -> dict:
    gen = torch.Generator().manual_seed(args.seed)  # the same batches for every model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1
    )
    curve, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        seq = make_batch(args.batch, args.delay, gen)
        logits = recall_logits(model, seq)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), seq[:, -RECALL:].reshape(-1))
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
    if args.smoke:
        args.steps, args.batch = 6, 8
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    models = build_models(names, args.d, args.delay)
    test = make_batch(2048, args.delay, torch.Generator().manual_seed(10_000 + args.seed))
    baseline = {
        "ce_recall": math.log(SYMBOLS),
        "ce_task": RECALL * math.log(SYMBOLS) / (args.delay + 20),
    }
    print(
        f"copy memory, T={args.delay}: {args.steps} steps of {args.batch} sequences, lr "
        f"{args.lr}; memoryless baseline ln 8 = {baseline['ce_recall']:.3f} per recalled symbol, "
        f"10 ln 8/(T+20) = {baseline['ce_task']:.4f} per position"
    )
    results = []
    for name, model in models.items():
        r = train(model, args, test)
        row = {
            "model": name,
            "params": params(model),
            "steps": args.steps,
            "accuracy": r["accuracy"],
            "ce_recall": r["ce_recall"],
            "ce_task": r["ce_recall"] * RECALL / (args.delay + 20),
            "train_seconds": round(r["train_seconds"], 1),
            "curve": r["curve"],
        }
        results.append(row)
        print(
            f"  {name:<12} {row['params']:>8,} params  accuracy {row['accuracy']:7.2%}  CE "
            f"{row['ce_recall']:.4f}/symbol = {row['ce_task']:.4f}/position "
            f"(baseline {baseline['ce_task']:.4f})  {row['train_seconds']:.0f} s"
        )
    result = {
        "benchmark": "copy",
        "delay": args.delay,
        "batch": args.batch,
        "lr": args.lr,
        "d": args.d,
        "memoryless_baseline": baseline,
        "models": results,
    }
    return meta.save(result, args.json_out, args.command_line)
