"""Report sections for a model's life after pretraining (``enigma bench finetune``, ``enigma
bench serve``) and for the GPU step's count (``enigma bench roofline``), rendered by
:mod:`enigma.benchmarks.report`."""

from __future__ import annotations


def _table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _pm(stats: dict, percent: bool = True) -> str:
    if percent:
        return f"{stats['mean']:.1%} ± {stats['std']:.1%}"
    return f"{stats['mean']:.2f} ± {stats['std']:.2f}"


def section_finetune(r: dict) -> tuple[str, list[str]]:
    rows = r["rows"]
    seeds = len(r["before"]) // max(1, len(r["tasks"]) * len(r["bases"]))
    title = (f"Fine-tuning (`enigma bench finetune`: {', '.join(r['tasks'])} of {r['length']} "
             f"numerals, split by answer, {rows['train']} train / {rows['dev']} dev / "
             f"{rows['test']} test rows, {seeds} seeds, mean ± std)")  # fmt: skip
    names = {"enigma": "EnigmaLM", "plain": "plain Transformer"}
    table = []
    for task, models in r["summary"].items():
        for model, m in models.items():
            lora, full = m.get("lora"), m.get("full")
            seconds = " / ".join(f"{x['seconds']['mean']:.0f}" for x in (lora, full) if x)
            table.append([task, names[model], _pm(m["before"]),
                          _pm(lora["test"]) if lora else "", _pm(full["test"]) if full else "",
                          f"{lora['share']:.2%}" if lora else "", f"{(lora or full)['steps']}",
                          seconds])  # fmt: skip
    head = ["task", "base model", "test exact match before", "LoRA", "full", "LoRA trains",
            "steps", "seconds LoRA / full"]  # fmt: skip
    lines = _table(head, table)
    if r.get("curve"):
        first = min(x["seed"] for x in r["runs"])
        default = {(x["task"], x["model"]): x for x in r["runs"]
                   if x["variant"] == "lora" and x["seed"] == first}  # fmt: skip
        curve = []
        for (task, model), x in sorted(default.items()):
            if task not in {c["task"] for c in r["curve"]}:
                continue
            curve.append([task, names[model], "LoRA r16, attention + MLP (the default)",
                          f"{x['dev']:.1%}", f"{x['test']:.1%}"])  # fmt: skip
            for c in r["curve"]:
                if (c["task"], c["model"]) == (task, model):
                    curve.append([task, names[model], c["variant"].removeprefix("lora, "),
                                  f"{c['dev']:.1%}", f"{c['test']:.1%}"])  # fmt: skip
        head = ["position task", "base model", "LoRA given (seed 0)", "dev exact match",
                "test exact match"]  # fmt: skip
        lines += _table(head, curve)
    return title, lines


def section_eval(r: dict) -> tuple[str, list[str]]:
    title = (f"Perplexity beyond the training length (`enigma bench eval`: tiny, pretrained "
             f"{r['steps']} steps on 三国 at {r['train_length']} tokens, {len(r['seeds'])} seeds, "
             "mean ± std)")  # fmt: skip
    rows = []
    for source, entries in r["table"].items():
        for e in entries:
            rows.append([source, f"{e['window']} ({e['multiple']}x)", f"{e['tokens']:,}",
                         _pm(e["enigma"], False), _pm(e["plain"], False),
                         _pm(e["enigma_minus_plain"], False)])  # fmt: skip
    head = ["text", "window (x training)", "tokens scored", "EnigmaLM", "plain Transformer",
            "EnigmaLM - plain, seed by seed"]  # fmt: skip
    return title, _table(head, rows)


def section_serve(r: dict) -> tuple[str, list[str]]:
    rows_n = r["max_batch_size"]
    rounds = f", the median of {r['rounds']} rounds" if r.get("rounds", 1) > 1 else ""
    title = (f"Serving (`enigma bench serve`: {r['max_tokens']} tokens per request, "
             f"{r['requests_per_stream']} requests per stream{rounds}, up to {rows_n} rows, "
             f"temperature {r['temperature']:g})")  # fmt: skip
    names = {"enigma": "EnigmaLM", "plain": "plain Transformer"}
    steps = []
    for name, s in r["steps"].items():
        churn = f"{s['churn_over_ceiling']:.2f} ({s['churn_apart_over_ceiling']:.2f})"
        steps.append([names[name], f"{s['ceiling_step_ms']:.2f}",
                      f"{s['ceiling_tokens_per_s']:,.0f}", f"{s['engine_step_ms']:.2f}",
                      f"{s['sampling_share']:.0%}", f"{s['engine_over_ceiling']:.2f}",
                      churn])  # fmt: skip
    head = [f"model ({rows_n} rows, 1 thread)", "its own cached step ms", "ceiling tokens/s",
            "engine step ms", "sampling share", "ceiling / engine step",
            "engine under churn / ceiling (prompts in a forward of their own)"]  # fmt: skip
    lines = _table(head, steps)
    served = []
    for ingress, by_model in r["ingresses"].items():
        for name, data in by_model.items():
            for m in data["levels"]:
                cpu = m["cpu_s_per_request"]
                front = cpu["proxy"] + cpu["haproxy"]
                split = " / ".join(f"{v * 1e3:.1f}" for v in (front, cpu["replica"],
                                                              cpu["engine"]))  # fmt: skip
                latency = f"{m['latency_p50_s']:.2f} / {m['latency_p95_s']:.2f}"
                ceiling = m.get("ceiling_tokens_per_s")
                ceiling = f"{ceiling:,.0f}" if ceiling else "the table above's"
                ratio = f"{m['served_over_ceiling']:.2f}"
                if len(m.get("rounds", [])) > 1:
                    ratio += f" ({', '.join(f'{x:.2f}' for x in m['rounds'])})"
                served.append([names[name], ingress, m["streams"], f"{m['tokens_per_s']:,.0f}",
                               ceiling, ratio,
                               f"{m['ttft_p50_s']:.3f}", latency, split])  # fmt: skip
    head = ["model", "ingress", "streams", "tokens/s", "ceiling tokens/s, just before",
            "served / ceiling (each round)", "TTFT p50 s", "latency p50 / p95 s",
            "CPU ms a request: ingress / replica / engine"]  # fmt: skip
    lines += _table(head, served)
    policies = []
    for policy, p in r.get("policies", {}).items():
        late, mixed = p["short_behind_long"], p["mixed"]
        ratio = f"({late['ratio']:.1%})"
        short = f"{late['short_ttft_s']:.3f} s of {late['long_latency_s']:.2f} s {ratio}"
        ttft = f"{mixed['ttft_p50_s']:.3f} / {mixed['ttft_p95_s']:.3f}"
        latency = f"{mixed['latency_p50_s']:.2f} / {mixed['latency_p95_s']:.2f}"
        policies.append([policy, short, f"{mixed['tokens_per_s']:,.0f}", ttft, latency])
    if policies:
        head = ["EnigmaLM, batching", "short request's first token, behind a long one",
                "mixed 8-256 tokens: tokens/s", "TTFT p50 / p95 s",
                "latency p50 / p95 s"]  # fmt: skip
        lines += _table(head, policies)
    return title, lines


def section_roofline(r: dict) -> tuple[str, list[str]]:
    title = (f"A training step counted (`enigma bench roofline`: {r['preset']}, "
             f"{r['precision']}, {r['mode']}, forward + backward, FakeTensorMode)")  # fmt: skip
    names = {"plain": "plain Transformer", "enigma": "EnigmaLM",
             "enigma_coupling_half": "EnigmaLM, coupling nets d/2"}  # fmt: skip
    rows = []
    for row in r["rows"]:
        for name, m in row["models"].items():
            rows.append([f"{row['batch']} x {row['seq_len']}", names.get(name, name), m["ops"],
                         f"{m['bytes'] / 1e9:.1f}", f"{m['flops'] / 1e12:.2f}",
                         m["full_logits_tensors"], f"{m['flops_ratio']:.3f}"])  # fmt: skip
    head = ["B x L", "model", "ops", "GB moved", "TFLOP", "logit-sized tensors",
            "FLOPs plain / this"]  # fmt: skip
    lines = _table(head, rows)
    if r.get("long_sequences"):
        long = [[f"{x['batch']} x {x['seq_len']}", f"{x['tokens_per_sec']:,.0f}",
                 f"{x['step_s']:.2f}", f"{x['peak_rss_mb']:,.0f}"]
                for x in r["long_sequences"]]  # fmt: skip
        head = ["B x L (one base EnigmaLM step, fp32, CPU)", "tokens/s", "step s", "peak MB"]
        lines += _table(head, long)
    return title, lines
