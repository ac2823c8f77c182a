"""``enigma bench enwik8``: byte-level language modelling in bits per character.

Data: the real enwik8 (``--data PATH``, the file or its zip; or downloaded when the network allows)
with its standard 90M/5M/5M split; offline, the enwik8-format Wikipedia dump that ``gensim==4.4.0``
ships (about 6 MB, the same XML and first pages), split 90/5/5 the same way.

EnigmaLM (``enigma``; ``enigma-random`` with ``rotor_offset="random"``; ``enigma-rev`` with
reversible layers; ``enigma-bf16-rotors`` with ``rotor_matmul="bf16"``; ``enigma-coupling-half``
with coupling nets d/2 wide) and a parameter-matched
plain Transformer (no machine; a wider MLP makes up the machine's parameters) train for the
same steps on the same random windows, or for the same wall time (``--budget-s``: each model
stops at the first step past it, and the learning rate follows the same one-cycle schedule over
the budget's seconds, or over ``--steps`` if they run out first). Test bits per character are
scored with overlapping windows, so every scored byte has at least half a window of context.
gzip -9, bz2 -9 and xz -9 compress the same test bytes in the same run. With ``--seeds N``
every model trains N times (seed s: its start and its windows); rows give mean ± std and the
difference to the plain Transformer seed by seed.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import importlib.util
import lzma
import math
import os
import statistics
import time
import urllib.request
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from . import meta
from .seeds import summarize

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_BYTES = 100_000_000
GENSIM_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CACHE = Path(os.environ.get("ENIGMA_CACHE", Path.home() / ".cache" / "enigma"))
MODELS = ("enigma", "enigma-random", "enigma-rev", "enigma-bf16-rotors", "enigma-coupling-half",
          "transformer")  # fmt: skip
WARMUP = 0.05  # of the steps or the budget


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="enwik8 or enwik8.zip (default: download/gensim)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rev-blocks", type=int, default=2)
    p.add_argument("--rotors", type=int, default=2)
    p.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default="bf16",
        help="bf16: autocast for the Transformer layers and coupling nets (the machine's rotors "
        "and reflector stay fp32/fp64); about 1.6x faster on CPUs with AVX512-BF16",
    )
    p.add_argument("--no-download", action="store_true", help="never try the network")
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--seeds", type=int, default=1, help="seeds per model")
    p.add_argument("--budget-s", type=float, default=0.0, help="train seconds per model (0: none)")
    p.add_argument("--models", default="enigma,transformer", help=f"from {', '.join(MODELS)}")
    p.add_argument("--smoke", action="store_true", help="a few steps on a slice, to check it runs")
    p.add_argument("--json", dest="json_out", default=None)


# --------------------------------------------------------------------------------------------
# Data


def _from_zip(path: Path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read("enwik8")


def _download() -> bytes | None:
    """The real enwik8, cached; None when the network does not allow it (probed quickly)."""
    cached = CACHE / "enwik8.zip"
    if not cached.is_file():
        try:
            with urllib.request.urlopen(ENWIK8_URL, timeout=5) as response:
                payload = response.read()
        except OSError:
            return None
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, cached)
    return _from_zip(cached)


def gensim_dump_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    roots = list(spec.submodule_search_locations or []) if spec else []
    path = Path(roots[0]) / GENSIM_DUMP if roots else None
    if path is None or not path.is_file():
        raise InputError(
            "no enwik8 here and none downloadable; pass --data PATH/enwik8, or install the "
            "offline dump with `pip install --no-deps gensim==4.4.0`"
        )
    return path


def load_bytes(path: str | None, allow_download: bool) -> tuple[bytes, str]:
    if path:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"--data {path} does not exist")
        data = _from_zip(p) if zipfile.is_zipfile(p) else p.read_bytes()
        return data, f"enwik8 ({p})" if len(data) == ENWIK8_BYTES else str(p)
    if allow_download:
        data = _download()
        if data is not None:
            return data, "enwik8 (downloaded)"
    dump = gensim_dump_path()
    return bz2.decompress(dump.read_bytes()), f"gensim enwiki dump ({dump.name})"


def split(data: bytes) -> dict[str, bytes]:
    """90/5/5 in order: exactly enwik8's 90M/5M/5M on the real file."""
    n = len(data)
    a, b = n * 90 // 100, n * 95 // 100
    return {"train": data[:a], "val": data[a:b], "test": data[b:]}


def compressor_bpc(test: bytes) -> dict[str, float]:
    sizes = {
        "gzip -9": len(gzip.compress(test, compresslevel=9)),
        "bz2 -9": len(bz2.compress(test, compresslevel=9)),
        "xz -9": len(lzma.compress(test, preset=9)),
    }
    return {name: 8 * size / len(test) for name, size in sizes.items()}


# --------------------------------------------------------------------------------------------
# Models


def build_models(args, names: list[str], seed: int) -> dict[str, nn.Module]:
    from enigma.models.lm import EnigmaLM
    from enigma.models.lm_config import EnigmaConfig

    from .lm import matched_plain_transformer

    shape = dict(
        vocab_size=256, d=args.d, num_heads=args.heads, num_transformer_layers=args.layers,
        num_rev_blocks=args.rev_blocks, num_rotors=args.rotors, max_len=args.seq_len,
        rotor_positions=min(16, args.d), bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    variants = {"enigma": {}, "enigma-random": {"rotor_offset": "random"}}
    variants["enigma-rev"] = {"reversible_layers": True}
    variants["enigma-bf16-rotors"] = {"rotor_matmul": "bf16"}
    variants["enigma-coupling-half"] = {"coupling_hidden": args.d // 2}
    models = {}
    for name in names:
        torch.manual_seed(seed)
        if name in variants:
            models[name] = EnigmaLM(EnigmaConfig(**shape, **variants[name]))
        elif name == "transformer":
            target = sum(p.numel() for p in EnigmaLM(EnigmaConfig(**shape)).parameters())
            models[name] = matched_plain_transformer(shape, target, seed)
        else:
            raise InputError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return models


# --------------------------------------------------------------------------------------------
# Training and scoring


def windows(data: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    return data[starts[:, None] + torch.arange(length)]


def scoring_windows(n: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window starts, and for each window which of its seq_len - 1 targets it scores."""
    last = max(0, n - seq_len)
    starts = torch.arange(0, last + 1, seq_len // 2)
    if starts[-1] != last:
        starts = torch.cat([starts, torch.tensor([last])])
    # Target byte s + 1 + j of window s is new when it lies past the previous window's end.
    new_from = torch.cat([torch.tensor([1]), starts[:-1] + seq_len])
    targets = starts[:, None] + 1 + torch.arange(seq_len - 1)
    return starts, targets >= new_from[:, None]


@torch.no_grad()
def bits_per_char(model, data: torch.Tensor, seq_len: int, bf16: bool, limit: int = 0) -> float:
    """Windows every seq_len/2 bytes (the last one flush with the end); each window scores the
    bytes the windows before it did not reach, so every byte after the first is scored exactly
    once, and all but the first half-window with at least seq_len/2 bytes of context."""
    model.eval()
    if limit:
        data = data[:limit]
    starts, scored = scoring_windows(len(data), seq_len)
    total, count = 0.0, 0
    for rows in torch.arange(len(starts)).split(64):
        ids = windows(data, starts[rows], seq_len).long()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids).logits.float()
        nll = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1), reduction="none"
        ).view(len(rows), -1)
        mask = scored[rows]
        total += nll[mask].sum().item()
        count += int(mask.sum())
    model.train()
    return total / count / math.log(2)


def one_cycle(peak: float, now: float, end: float, warmup_end: float) -> tuple[float, float]:
    """OneCycleLR's learning rate and Adam beta1 at ``now`` of ``end`` (steps, or fractions of a
    time budget, so that a run cut by time ends annealed): the rate rises from peak/25 to peak
    until ``warmup_end`` and falls to peak/25e4 by ``end`` while beta1 falls from 0.95 to 0.85
    and rises back, both on cosines; the same arithmetic as OneCycleLR, so equal to it in steps."""
    low = peak / 25
    if now <= warmup_end:
        pct, lr, beta = now / warmup_end, (low, peak), (0.95, 0.85)
    else:
        pct = (now - warmup_end) / (end - warmup_end)
        lr, beta = (peak, low / 1e4), (0.85, 0.95)
    cos_out = math.cos(math.pi * pct) + 1
    return lr[1] + (lr[0] - lr[1]) / 2.0 * cos_out, beta[1] + (beta[0] - beta[1]) / 2.0 * cos_out


def train(model, train_data: torch.Tensor, args, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)  # the same windows for every model of a seed
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    high = len(train_data) - args.seq_len
    losses, start, report_at = [], time.perf_counter(), 0.1
    for step in range(args.steps):
        elapsed = time.perf_counter() - start
        if args.budget_s and elapsed > args.budget_s:
            print(f"    budget of {args.budget_s:.0f} s spent at step {step}", flush=True)
            break
        if args.budget_s:  # fractions of the steps or of the seconds, whichever run out first
            done = max(step / max(1, args.steps - 1), elapsed / args.budget_s)
            lr, beta1 = one_cycle(args.lr, done, 1.0, WARMUP)
        else:
            lr, beta1 = one_cycle(args.lr, step, args.steps - 1, WARMUP * args.steps - 1)
        for group in opt.param_groups:
            group["lr"], group["betas"] = lr, (beta1, group["betas"][1])
        ids = windows(
            train_data, torch.randint(0, high, (args.batch,), generator=gen), args.seq_len
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(ids.long(), labels=ids.long()).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        seconds = time.perf_counter() - start
        progress = (step + 1) / args.steps
        if args.budget_s:
            progress = max(progress, seconds / args.budget_s)
        if progress >= report_at:  # every tenth of the steps or of the budget
            report_at = math.floor(progress * 10 + 1) / 10
            recent = sum(losses[-50:]) / len(losses[-50:]) / math.log(2)
            print(f"    step {step + 1:>5} ({seconds:.0f} s): train {recent:.3f} bpc", flush=True)
    return {
        "train_seconds": time.perf_counter() - start,
        "final_train_bpc": losses[-1] / math.log(2),
        "steps": len(losses),
    }


def train_seeds(args, names: list[str], seeds: list[int], tensors: dict, limit: int) -> dict:
    """Each model trained and scored once per seed: ``{name: [run, ...]}``."""
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for seed in seeds:
        for name, model in build_models(args, names, seed).items():
            params = sum(p.numel() for p in model.parameters())
            print(f"  seed {seed} {name}: {params:,} params, up to {args.steps} steps of "
                  f"{args.batch} x {args.seq_len}")  # fmt: skip
            stats = train(model, tensors["train"], args, seed)
            test_bpc = bits_per_char(model, tensors["test"], args.seq_len, args.bf16, limit)
            val_bpc = bits_per_char(model, tensors["val"], args.seq_len, args.bf16, limit)
            runs[name].append({"seed": seed, "bpc": test_bpc, "val_bpc": val_bpc,
                               "params": params, "steps": stats["steps"],
                               "train_seconds": stats["train_seconds"]})  # fmt: skip
            print(f"  seed {seed} {name:<13} {test_bpc:.3f} bpc (val {val_bpc:.3f}) after "
                  f"{stats['train_seconds']:.0f} s of training", flush=True)  # fmt: skip
    return runs


def run(args: argparse.Namespace) -> dict:
    args.bf16 = args.precision == "bf16"
    if args.seeds < 1:
        raise InputError(f"--seeds {args.seeds}: must be at least 1")
    if args.smoke:
        args.steps, args.batch, args.seq_len = 4, 4, 64
        args.d, args.layers = 32, 1
    if args.seq_len < 8 or args.seq_len % 2:
        raise InputError(f"--seq-len {args.seq_len}: must be even and at least 8")
    data, source = load_bytes(args.data, allow_download=not args.no_download and not args.smoke)
    parts = split(data)
    tensors = {k: torch.frombuffer(bytearray(v), dtype=torch.uint8) for k, v in parts.items()}
    limit = 20_000 if args.smoke else 0
    test_bytes = parts["test"][:limit] if limit else parts["test"]
    compressors = compressor_bpc(test_bytes)
    print(
        f"enwik8-style bits/char on {source}: train {len(parts['train']):,} / val "
        f"{len(parts['val']):,} / test {len(test_bytes):,} bytes"
    )
    for name, bpc in compressors.items():
        print(f"  {name:<12} {bpc:.3f} bpc")
    rows = [
        {"model": n, "bpc": round(b, 4), "params": 0, "steps": 0} for n, b in compressors.items()
    ]
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    build_models(argparse.Namespace(**{**vars(args), "d": 8, "heads": 2, "layers": 1}), names, 0)
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs = train_seeds(args, names, seeds, tensors, limit)
    for name in names:
        per_seed = runs[name]
        plain = runs.get("transformer") if name != "transformer" else None
        row = {"model": name, **summarize(per_seed, ("bpc", "val_bpc"), plain)}
        row.update(params=per_seed[0]["params"], seeds=per_seed)
        row["steps"] = round(statistics.fmean(r["steps"] for r in per_seed))
        rows.append(row)
    result = {
        "benchmark": "enwik8",
        "source": source,
        "seeds": seeds,
        "budget_s": args.budget_s,
        "bytes": {k: len(v) for k, v in parts.items()},
        "seq_len": args.seq_len,
        "batch": args.batch,
        "lr": args.lr,
        "precision": args.precision,
        "models": rows,
    }
    return meta.save(result, args.json_out, args.command_line)
