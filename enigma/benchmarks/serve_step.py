"""The yardstick of ``enigma bench serve``: the model's own cached decode step, and the engine's
step at the same batch and threads.

The ceiling is what the model alone does: ``rows`` left-padded prompts of different lengths
decoded through transformers' ``DynamicCache``, one token a row per step, the next token the
argmax (no sampling), timed per forward. The engine's step is the same rows through
:class:`~enigma.serve.engine.Engine` with the benchmark's sampling: its model call, its
sampling, and the rest (text, stop strings, bookkeeping), so what the engine adds to the model
is measured, not guessed. Under churn the engine keeps ``rows`` requests of 32 tokens running
that end at different steps, each replaced at once, as a server's rows are: the tokens/s it
keeps up counts what admitting new prompts costs, with the prompts in the running rows'
forward and in one of their own. All run in this process on the replica's threads, before any
server starts, with nothing else running; :func:`ceiling_meter` measures the ceiling again
before each served level, its server idle.
"""

from __future__ import annotations

import statistics
import time

import torch

PROMPTS = ["话说天下大势", "却说曹操", "孔明笑曰", "玄德大喜"]


def prompt_rows(tokenizer, rows: int) -> list[list[int]]:
    """The benchmark's prompts, one a row in turn, as token ids."""
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    return [ids[i % len(ids)] for i in range(rows)]


@torch.no_grad()
def ceiling_step(model, prompts: list[list[int]], steps: int = 40) -> float:
    """Median seconds of the model's own cached decode step over ``len(prompts)`` rows."""
    from transformers.cache_utils import DynamicCache

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    cache = DynamicCache(config=model.config)
    feed = model(ids, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        start = time.perf_counter()
        logits = model(feed, attention_mask=mask, cache=cache, use_cache=True).logits
        times.append(time.perf_counter() - start)
        feed = logits[:, -1:].argmax(-1)
    return statistics.median(times[3:])


def engine_step(model, tokenizer, prompts: list[list[int]], sampling, steps: int = 40) -> dict:
    """The engine decoding the same rows with ``sampling``: median seconds of its step and the
    mean of its model call and its sampling per step."""
    from dataclasses import replace

    from ..serve.engine import Engine

    engine = Engine(model, tokenizer, max_rows=len(prompts))
    long = replace(sampling, max_tokens=steps + 10)
    engine.submit([engine.request(f"r{i}", p, long) for i, p in enumerate(prompts)])
    engine.step()  # the prefill
    stats = engine.stats
    model_s, sampling_s, times = stats.model_s, stats.sampling_s, []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[3:]), "model_s": (stats.model_s - model_s) / steps,
            "sampling_s": (stats.sampling_s - sampling_s) / steps}  # fmt: skip


def churn(model, tokenizer, prompts: list[list[int]], sampling, mix_tokens: int | None = None,
          requests: int = 256, max_tokens: int = 32) -> float:  # fmt: skip
    """Tokens/s of the engine keeping ``len(prompts)`` rows busy: row ``i`` starts with a
    reply of ``2 i + 2`` tokens (so the rows end at different steps), and each request that
    ends is replaced by one of ``max_tokens`` until ``requests`` have been sent; timed until
    the last is sent (the rows drain after, which is not a steady state)."""
    from dataclasses import replace

    from ..serve.engine import Engine

    mixing = {} if mix_tokens is None else {"mix_tokens": mix_tokens}  # None: the engine's own
    engine = Engine(model, tokenizer, max_rows=len(prompts), **mixing)
    sent = 0

    def send(tokens: int) -> None:
        nonlocal sent
        prompt = prompts[sent % len(prompts)]
        settings = replace(sampling, max_tokens=tokens)
        engine.submit([engine.request(f"r{sent}", prompt, settings)])
        sent += 1

    for i in range(len(prompts)):
        send(2 * i + 2)
    made, start = 0, time.perf_counter()
    while sent < requests:
        for out in engine.step():
            made += len(out.tokens)
            if out.finish_reason and sent < requests:
                send(max_tokens)
    return made / (time.perf_counter() - start)


def _loaded(model_dir: str, rows: int, threads: int):
    """The saved model on ``threads`` threads, its tokenizer, and the benchmark's ``rows``
    prompts."""
    from ..data.tokenizer import load_tokenizer
    from ..inference.generate import load_model

    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(model_dir, quiet=True)
    return load_model(model_dir), tokenizer, prompt_rows(tokenizer, rows)


def ceiling_meter(model_dir: str, rows: int, threads: int, rounds: int = 2):
    """A function giving the ceiling in tokens/s as it is when called (the best of ``rounds``
    measurements), the model loaded once: a served figure is set against the ceiling measured
    just before it, as this machine's speed drifts over minutes."""
    model, _, prompts = _loaded(model_dir, rows, threads)

    def now() -> float:
        return rows / min(ceiling_step(model, prompts) for _ in range(rounds))

    return now


def measure(model_dir: str, rows: int, threads: int, sampling, rounds: int = 3) -> dict:
    """The ceiling and the engine's step, alternated ``rounds`` times (the best of each: the
    machine's noise only ever slows a run)."""
    model, tokenizer, prompts = _loaded(model_dir, rows, threads)
    ceilings, engines, mixed, apart = [], [], [], []
    for _ in range(rounds):
        ceilings.append(ceiling_step(model, prompts))
        engines.append(engine_step(model, tokenizer, prompts, sampling))
        mixed.append(churn(model, tokenizer, prompts, sampling))
        apart.append(churn(model, tokenizer, prompts, sampling, mix_tokens=0))
    ceiling = min(ceilings)
    engine = min(engines, key=lambda e: e["step_s"])
    return {
        "churn_tokens_per_s": max(mixed), "churn_apart_tokens_per_s": max(apart),
        "churn_over_ceiling": max(mixed) * ceiling / rows,
        "churn_apart_over_ceiling": max(apart) * ceiling / rows,
        "rows": rows, "threads": threads,
        "ceiling_step_ms": ceiling * 1e3, "ceiling_tokens_per_s": rows / ceiling,
        "engine_step_ms": engine["step_s"] * 1e3, "engine_tokens_per_s": rows / engine["step_s"],
        "engine_model_ms": engine["model_s"] * 1e3,
        "engine_sampling_ms": engine["sampling_s"] * 1e3,
        "sampling_share": engine["sampling_s"] / engine["step_s"],
        "engine_over_ceiling": ceiling / engine["step_s"],
    }  # fmt: skip
