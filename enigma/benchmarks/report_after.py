"""Report sections for a model's life after pretraining (``enigma bench finetune``, ``enigma
bench serve``) and for the GPU step's count (``enigma bench roofline``), rendered by
:mod:`enigma.benchmarks.report`."""

from __future__ import annotations


def _table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def section_finetune(r: dict) -> tuple[str, list[str]]:
    title = (f"Fine-tuning (`enigma bench finetune`: {r['task']}, {r['train_rows']} rows, "
             f"{r['val_rows']} held out, base `{r['base_model']}`)")  # fmt: skip
    rows = [["before fine-tuning", f"{r['before']:.1%}", "", "", ""]]
    for name, m in r["methods"].items():
        label = "LoRA (attention, MLP)" if name == "lora" else "full"
        rows.append([label, f"{m['after']:.1%}", f"{m['share']:.2%} ({m['trainable']:,})",
                     f"{m['steps']} (lr {m['lr']:g})", f"{m['seconds']:.0f}"])  # fmt: skip
    head = ["model", "held-out exact match", "trained parameters", "steps", "seconds"]
    return title, _table(head, rows)


def section_serve(r: dict) -> tuple[str, list[str]]:
    rows_n = r["max_batch_size"]
    title = (f"Serving (`enigma bench serve`: {r['max_tokens']} tokens per request, "
             f"{r['requests_per_stream']} requests per stream, up to {rows_n} rows, "
             f"temperature {r['temperature']:g})")  # fmt: skip
    names = {"enigma": "EnigmaLM", "plain": "plain Transformer"}
    steps = []
    for name, s in r["steps"].items():
        steps.append([names[name], f"{s['ceiling_step_ms']:.2f}",
                      f"{s['ceiling_tokens_per_s']:,.0f}", f"{s['engine_step_ms']:.2f}",
                      f"{s['sampling_share']:.0%}", f"{s['engine_over_ceiling']:.2f}"])  # fmt: skip
    head = [f"model ({rows_n} rows, 1 thread)", "its own cached step ms", "ceiling tokens/s",
            "engine step ms", "sampling share", "ceiling / engine step"]  # fmt: skip
    lines = _table(head, steps)
    served = []
    for name, data in r["results"].items():
        for m in data["levels"]:
            cpu = m["cpu_s_per_request"]
            split = " / ".join(f"{cpu[k] * 1e3:.1f}" for k in ("proxy", "replica", "engine"))
            latency = f"{m['latency_p50_s']:.2f} / {m['latency_p95_s']:.2f}"
            served.append([names[name], m["streams"], f"{m['tokens_per_s']:,.0f}",
                           f"{m['served_over_ceiling']:.2f}", f"{m['ttft_p50_s']:.3f}", latency,
                           split])  # fmt: skip
    head = ["model", "streams", "tokens/s", "served / ceiling", "TTFT p50 s",
            "latency p50 / p95 s", "CPU ms a request: proxy / replica / engine"]  # fmt: skip
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
