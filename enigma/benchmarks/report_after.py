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
    title = (f"Serving (`enigma bench serve`: {r['max_tokens']} tokens per request, "
             f"{r['requests_per_stream']} requests per stream, batches up to "
             f"{r['max_batch_size']})")  # fmt: skip
    rows = []
    for name, data in r["results"].items():
        label = "EnigmaLM" if name == "enigma" else "plain Transformer"
        for m in data["levels"]:
            rows.append([label, m["streams"], f"{m['tokens_per_s']:,.0f}",
                         f"{m['requests_per_s']:.2f}", f"{m['ttft_p50_s']:.2f}",
                         f"{m['latency_p50_s']:.2f} / {m['latency_p95_s']:.2f}"])  # fmt: skip
    head = ["model", "streams", "tokens/s", "requests/s", "TTFT p50 s", "latency p50 / p95 s"]
    return title, _table(head, rows)


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
