"""``enigma report``: every published figure, generated from the JSON in ``docs/results/``.

Each JSON carries its command, git commit, machine and date (``meta.save``), and may carry
``notes``: sentences written when it was measured. The report renders one section per benchmark
into ``docs/results.md`` (with plots) and into the README between the ``results`` markers, so the
README's Results are never typed by hand. ``--check`` regenerates both in memory and fails when a
committed copy differs from what the artifacts give (CI runs it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InputError
from .report_after import section_eval, section_finetune, section_roofline, section_serve

DOCS = "@docs@/"  # the docs/ folder, as each output's links reach it
BEGIN, END = "<!-- results:begin (enigma report) -->", "<!-- results:end -->"
# The order sections appear in; unknown benchmarks follow, listed key by key.
ORDER = ["core", "memory", "rebuild", "lm", "flow", "train", "data-scale", "train-overhead", "copy"]
ORDER += ["enwik8", "sweep", "faults", "eval", "finetune", "serve", "roofline", "gpu"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", default=["docs/results"], help="JSON files or directories")
    p.add_argument("--out", default="docs/results.md")
    p.add_argument(
        "--readme",
        default=None,
        help="README whose Results block is rewritten (default: README.md with the default --out)",
    )
    p.add_argument(
        "--check", action="store_true", help="fail if the committed outputs are out of date"
    )


def _load(inputs: list[str]) -> list[dict]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(path.glob("*.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{item} does not exist")
    results = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{f} is not valid JSON: {err}") from err
        if isinstance(data, dict) and "benchmark" in data:
            results.append({**data, "_file": f.name})
    if not results:
        raise InputError(f"no benchmark JSON found in {' '.join(inputs)}")
    return results


def table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def provenance(r: dict) -> list[str]:
    m = r.get("machine", {})
    where = f"{m.get('cpu_count', '?')} CPUs, torch {m.get('torch', '?')}"
    if m.get("gpu"):
        where += f", {m['gpu']}"
    commit = str(r.get("git_commit") or "?")[:12]
    return [
        f"`{r.get('command', '?')}` · commit `{commit}` · {where} · {r.get('date', '?')} · "
        f"[`{r['_file']}`]({DOCS}results/{r['_file']})",
        "",
    ]


def notes(r: dict) -> list[str]:
    """The sentences recorded with the measurement, one paragraph each."""
    return [line for note in r.get("notes", []) for line in (note, "")]


MODEL_NAMES = {"enigma": "EnigmaLM", "transformer": "plain Transformer", "lstm": "LSTM"}
MODEL_NAMES["enigma-random"] = "EnigmaLM, random rotor offsets"
MODEL_NAMES["enigma-rev"] = "EnigmaLM, reversible layers"
MODEL_NAMES["enigma-bf16-rotors"] = "EnigmaLM, bf16 rotor products"
MODEL_NAMES["enigma-coupling-half"] = "EnigmaLM, coupling nets d/2"


def _rate(x: float) -> str:
    return f"{x:,.0f}"


def section_core(r: dict) -> tuple[str, list[str]]:
    s, m, tps = r["shape"], r["parts"], r["tokens_per_sec"]
    title = (
        f"The machine (`enigma bench core`: d={s['d']}, B={s['batch']}, L={s['length']}, "
        f"{m['rev_blocks']} RevBlocks, {m['rotors']} rotors)"
    )
    mlp = f"residual MLP stack of equal FLOPs ({r['mlp_layers']} × Linear)"
    rows = [
        ["machine, memory-efficient backprop", _rate(tps["machine_memory_efficient"])],
        ["machine, plain autograd", _rate(tps["machine_plain_autograd"])],
        [mlp, _rate(tps["mlp_equal_flops"])],
    ]
    recon = ", ".join(f"{k} {v:.1e}" for k, v in r["reconstruction"].items())
    lines = table(["forward + backward", "tokens/s"], rows) + [
        f"Ratios to the MLP: {r['ratio_memory_efficient_vs_mlp']:.2f} (memory-efficient), "
        f"{r['ratio_plain_vs_mlp']:.2f} (plain autograd). Reconstruction ‖x − x'‖/‖x‖ after the "
        f"benchmark's AdamW steps: {recon}.",
        "",
    ]
    return title, lines


def section_memory(r: dict) -> tuple[str, list[str]]:
    s = r["shape"]
    env = " ".join(f"{k}={v}" for k, v in r.get("child_env", {}).items())
    title = (
        f"Memory by depth (`enigma bench memory`: d={s['d']}, B={s['batch']}, L={s['length']}, "
        f"one fresh process per point, peak RSS{f' with {env}' if env else ''})"
    )
    lines = []
    if r.get("points"):
        by_blocks: dict[int, dict] = {}
        for p in r["points"]:
            key = "efficient" if p["memory_efficient"] else "plain"
            by_blocks.setdefault(p["blocks"], {})[key] = p["peak_rss_mb"]
        rows = [
            [b, f"{v.get('efficient', 0):,.0f} MB", f"{v.get('plain', 0):,.0f} MB"]
            for b, v in sorted(by_blocks.items())
        ]
        lines += ["The machine alone, forward + backward:", ""]
        lines += table(["RevBlocks", "memory-efficient", "plain autograd"], rows)
    if r.get("lm"):
        lines += memory_lm_lines(r["lm"])
    return title, lines


def section_rebuild(r: dict) -> tuple[str, list[str]]:
    s = r["shape"]
    title = (
        f"Exactness of the reversible backward (`enigma bench rebuild`: EnigmaLM with reversible "
        f"layers, d={s['d']}, B={s['batch']}, L={s['length']}, {s['rev_blocks']} RevBlocks, "
        f"{s['rotors']} rotors)"
    )
    pair = lambda d: f"{d['max']:.1e} / {d['median']:.1e}"  # noqa: E731
    rows = [
        [p["layers"], p["dtype"], f"{p['reconstruction']:.1e}", pair(p["rebuilt_vs_stored"]),
         pair(p["stored_vs_float64"]), pair(p["rebuilt_vs_float64"])]
        for p in r["points"]
    ]  # fmt: skip
    head = ["layers", "weights", "reconstruction ‖x − x'‖/‖x‖", "gradients: rebuilt vs stored",
            "stored vs float64", "rebuilt vs float64"]  # fmt: skip
    note = (
        "Gradient columns: largest / median of ‖g − g'‖/‖g'‖ over every parameter and the "
        "embedded input. bf16 weights keep fp32 streams."
    )
    return title, table(head, rows) + [note, ""]


MEMORY_MODES = {
    "plain": "plain autograd",
    "checkpointing": "activation checkpointing",
    "reversible": "reversible layers",
}


def memory_lm_lines(
    lm: dict, peak_key: str = "peak_rss_mb", what: str = "peak RSS", plot: bool = True
) -> list[str]:
    by_layers: dict[int, dict] = {}
    for p in lm["points"]:
        by_layers.setdefault(p["layers"], {})[p["mode"]] = p
    head = ["layers"] + [f"{name}: peak, tokens/s" for name in MEMORY_MODES.values()]
    if any(p[peak_key] is None for p in lm["points"]):
        return []  # measured on a CPU by bench gpu's own test: no peak to show
    rows = [
        [layers] + [
            f"{m[k][peak_key]:,.0f} MB, {_rate(m[k]['tokens_per_sec'])}" if k in m else ""
            for k in MEMORY_MODES
        ]
        for layers, m in sorted(by_layers.items())
    ]  # fmt: skip
    lines = [
        f"EnigmaLM ({lm.get('blocks', 4)} RevBlocks, 2 rotors, vocabulary 21,128), one training "
        f"step (forward + backward; the second of two is timed), {what}:",
        "",
        *table(head, rows),
    ]
    low, high = min(by_layers), max(by_layers)
    peak = lambda n, k: by_layers[n][k][peak_key]  # noqa: E731
    growth = [
        f"{MEMORY_MODES[k]} {peak(high, k) / peak(low, k):.2f}x"
        for k in MEMORY_MODES
        if k in by_layers[low] and k in by_layers[high]
    ]
    summary = f"Peak growth from {low} to {high} layers: {', '.join(growth)}."
    if 8 in by_layers and {"reversible", "checkpointing"} <= set(by_layers[8]):
        m = by_layers[8]
        ratio = m["reversible"]["tokens_per_sec"] / m["checkpointing"]["tokens_per_sec"]
        summary += f" Reversible / checkpointing tokens/s at 8 layers: {ratio:.2f}."
    deepest = lm.get("deepest_reversible_within_plain_4")
    if lm.get("plain_4_layers_peak_mb"):
        fit = (
            f"{deepest['layers']} layers ({deepest['peak_rss_mb']:,.0f} MB)" if deepest else "none"
        )
        summary += (
            f" Deepest reversible model within the plain 4-layer model's "
            f"{lm['plain_4_layers_peak_mb']:,.0f} MB (tried up to {lm['search_limit_layers']}): "
            f"{fit}."
        )
    image = [f"![peak memory by depth]({DOCS}{PLOTS}/memory_lm.png)", ""] if plot else []
    return lines + [summary, "", *image]


def plot_memory_lm(lm: dict, path: Path) -> bool:
    figure = _figure()
    if figure is None:
        return False
    plt, fig, ax = figure
    for key, name in MEMORY_MODES.items():
        points = sorted((p["layers"], p["peak_rss_mb"]) for p in lm["points"] if p["mode"] == key)
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
    if lm.get("plain_4_layers_peak_mb"):
        ax.axhline(
            lm["plain_4_layers_peak_mb"], color="grey", linestyle=":", label="plain, 4 layers"
        )
    ax.set_xlabel("Transformer layers")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_xscale("log", base=2)
    return _save(plt, fig, ax, path)


def section_lm(results: list[dict]) -> tuple[str, list[str]]:
    title = "EnigmaLM vs the plain Transformer (`enigma bench lm`, train step = fwd + bwd + AdamW)"
    rows, lines = [], []
    for r in sorted(results, key=lambda r: r["params"]["enigma"]):
        mode = "reversible machine" if r["machine_memory_efficient"] else "plain machine"
        tps = r["tokens_per_sec"]
        name = f"{r['preset']} (B={r['batch']}, L={r['seq_len']}, {mode})"
        rows.append([name, _rate(tps["enigma"]), _rate(tps["baseline"]), f"{r['ratio']:.3f}"])
        lines += provenance(r) + notes(r)
    head = ["preset", "EnigmaLM tokens/s", "plain Transformer tokens/s", "ratio"]
    return title, table(head, rows) + lines


def section_flow(r: dict) -> tuple[str, list[str]]:
    title = f"EnigmaFlow density (`enigma bench flow`: {r['dataset']})"
    rows = [
        [m["model"], f"{m['params']:,}", f"{m['test_bits_per_dim']:.3f}", m["best_step"],
         m["train_seconds"]]
        for m in r["models"]
    ]  # fmt: skip
    head = ["model", "params", "test bits/dim", "best val step", "train s"]
    return title, table(head, rows)


def section_train(r: dict) -> tuple[str, list[str]]:
    title = f"Pretraining run `{r['name']}` (`enigma train`)"
    s = r["summary"]
    rows = [[r["plan"], s["steps"], f"{s['first_val_ppl']:.2f}", f"{s['last_val_ppl']:.2f}",
             f"{s['best_val_ppl']:.2f}", f"{r['wall_seconds']:.0f}"]]  # fmt: skip
    head = ["run", "steps", "val ppl, first eval", "last eval", "best", "wall s"]
    lines = table(head, rows)
    if s.get("sample"):
        lines += [f"Sample from the exported best model: {s['sample']}", ""]
    return title, lines


def section_data_scale(r: dict) -> tuple[str, list[str]]:
    title = f"`enigma data prepare` at scale (`enigma bench data-scale`, seq {r['seq_len']})"
    if "tokenizer_limit_mb_per_sec" not in r:  # before the tasks wrote their own shards
        rows = [[f"{r['corpus_mb']:.0f} MB", f"{r['wall_seconds']:.1f}",
                 f"{r['mb_per_sec_wall']:.2f}", f"{r['mb_per_sec_pipeline']:.2f}",
                 f"{r['peak_rss_mb']:,.0f}", f"{r['peak_pss_mb']:,.0f}"]]  # fmt: skip
        head = ["corpus", "wall s", "MB/s wall", "MB/s pipeline", "peak RSS sum MB",
                "peak PSS sum MB"]  # fmt: skip
        return title, table(head, rows)
    head = ["corpus", "units", "wall s", "MB/s wall", "MB/s after start-up",
            "tokenizer's limit MB/s", "ratio wall / after start-up", "driver CPU share",
            "peak RSS / PSS sum MB", "shard bytes a token"]  # fmt: skip
    rows = [[f"{r['corpus_mb']:.0f} MB", str(r["units"]), f"{r['wall_seconds']:.1f}",
             f"{r['mb_per_sec_wall']:.2f}", f"{r['mb_per_sec_pipeline']:.2f}",
             f"{r['tokenizer_limit_mb_per_sec']:.2f} ({r['tokenizer_mb_per_sec_per_core']:.2f} "
             f"a core x {r['cpus']})", f"{r['ratio_wall']:.2f} / {r['ratio_pipeline']:.2f}",
             f"{100 * r['driver_share']:.2f} % ({r['driver_cpu_seconds']:.1f} s of "
             f"{r['task_cpu_seconds']:.0f} s)",
             f"{r['peak_rss_mb']:,.0f} / {r['peak_pss_mb']:,.0f}",
             f"{r['shard_bytes_per_token']:.3f} ({r['ids_dtype']})"]]  # fmt: skip
    return title, table(head, rows)


def section_train_overhead(r: dict) -> tuple[str, list[str]]:
    title = (
        f"Ray Train + DeepSpeed overhead (`enigma bench train-overhead`: {r['preset']}, "
        f"micro-batch {r['micro_batch']} × {r['seq_len']}, {r['precision']}, "
        f"{r['threads']} threads)"
    )
    tps = r["tokens_per_sec"]
    halves = " / ".join(_rate(x) for x in r["plain_halves_tokens_per_sec"])
    plain = "plain PyTorch loop (AdamW, clipping, same lr schedule)"
    ray = "Ray Train + DeepSpeed ZeRO-2, 1 worker, Ray Data streaming"
    rows = [
        [plain, f"{_rate(tps['plain'])} (halves {halves})"],
        [ray, _rate(tps["ray+deepspeed"])],
    ]
    return title, table(["loop", "tokens/s"], rows) + [f"Ratio **{r['ratio']:.3f}**.", ""]


def copy_plot_name(r: dict) -> str:
    variant = r.get("variant", "teacher")
    return (
        f"copy_T{r['delay']}.png" if variant == "teacher" else f"copy_{variant}_T{r['delay']}.png"
    )


def section_copy(r: dict) -> tuple[str, list[str]]:
    base = r["memoryless_baseline"]
    seeds = len(r.get("seeds", [0]))

    def pm(m: dict, key: str, fmt: str) -> str:
        spread = f" ± {format(m[key + '_std'], fmt)}" if seeds > 1 and key + "_std" in m else ""
        return format(m[key], fmt) + spread

    rows = []
    for m in r["models"]:
        delta = ""
        if seeds > 1 and "accuracy_vs_transformer" in m:
            delta = f"{m['accuracy_vs_transformer']:+.2%} ± {m['accuracy_vs_transformer_std']:.2%}"
        row = [MODEL_NAMES.get(m["model"], m["model"]), f"{m['params']:,}", m["steps"],
               pm(m, "accuracy", ".2%"), pm(m, "ce_recall", ".2g"), f"{m['ce_task']:.2g}",
               f"{m['train_seconds']:.0f}"]  # fmt: skip
        rows.append(row + ([delta] if seeds > 1 else []))
    rows.append(["memoryless baseline", "", "", "12.50%", f"{base['ce_recall']:.4f}",
                 f"{base['ce_task']:.4f}", ""] + ([""] if seeds > 1 else []))  # fmt: skip
    head = ["model", "params", "steps", "recall accuracy", "CE / recalled symbol",
            "CE / position (T+20)", "train s"]  # fmt: skip
    if seeds > 1:
        head.append("accuracy − plain Transformer")
    lines = table(head, rows)
    if any(m.get("curve") for m in r["models"]):
        image = f"{DOCS}{PLOTS}/{copy_plot_name(r)}"
        lines += [f"![recall accuracy during training]({image})", ""]
    variant = r.get("variant", "teacher")
    what = "blanks at the recall positions" if variant == "blank" else "teacher-forced recall"
    many = f", mean ± std over {seeds} seeds" if seeds > 1 else ""
    return f"Copy memory, T = {r['delay']}, {what}{many} (`enigma bench copy`)", lines


PLOTS = "results_plots"


def _figure():
    """``(plt, fig, ax)`` of a small Agg figure, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    return plt, fig, ax


def _save(plt, fig, ax, path: Path) -> bool:
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_copy_curves(r: dict, path: Path) -> bool:
    figure = _figure()
    if figure is None:
        return False
    plt, fig, ax = figure
    for m in r["models"]:
        curve = m.get("curve") or []
        ax.plot([c["step"] for c in curve], [c["accuracy"] for c in curve], label=m["model"])
    ax.axhline(1 / 8, color="grey", linestyle=":", label="chance")
    ax.set_xlabel("step")
    ax.set_ylabel("recall accuracy (held-out)")
    return _save(plt, fig, ax, path)


def section_enwik8(r: dict) -> tuple[str, list[str]]:
    lines = []
    sizes = r.get("bytes", {})
    if sizes:
        lines += [f"Split (bytes): train {sizes.get('train', 0):,}, val {sizes.get('val', 0):,}, "
                  f"test {sizes.get('test', 0):,}.", ""]  # fmt: skip
    rows = sorted(r["models"], key=lambda m: m["bpc"])
    many = len(r.get("seeds", [0])) > 1
    paired = many and any("bpc_vs_transformer" in m for m in rows)

    def bpc(m: dict) -> str:
        spread = f" ± {m['bpc_std']:.3f}" if many and "bpc_std" in m else ""
        return f"{m['bpc']:.3f}{spread}"

    def delta(m: dict) -> str:
        if "bpc_vs_transformer" not in m:
            return ""
        return f"{m['bpc_vs_transformer']:+.3f} ± {m['bpc_vs_transformer_std']:.3f}"

    cells = [
        [MODEL_NAMES.get(m["model"], m["model"]), bpc(m),
         f"{m['params']:,}" if m["params"] else "", m["steps"] or "", m.get("train_seconds", "")]
        + ([delta(m)] if paired else [])
        for m in rows
    ]  # fmt: skip
    head = ["model", "test bpc", "params", "steps", "train s"]
    lines += table(head + (["bpc − plain Transformer"] if paired else []), cells)
    seeds = f", mean ± std over {len(r['seeds'])} seeds" if many else ""
    budget = f", {r['budget_s'] / 60:.0f} min of training per model" if r.get("budget_s") else ""
    title = f"enwik8-style bits per character (`enigma bench enwik8`, {r['source']}{seeds}{budget})"
    return title, lines


def _pm(mean: float | None, std: float | None, n: int | None = None) -> str:
    if n == 0 or mean is None or mean != mean:  # no trial reached this point
        return "–"
    return f"{mean:.1f} ± {std:.1f}" + (f" ({n})" if n is not None else "")


def section_sweep(r: dict) -> tuple[str, list[str]]:
    knobs, configs = r["knobs"], r["configurations"]
    head = [*knobs, "params", f"val ppl at step {r['at_step']} (mean ± std, n)"]
    with_best = all("best_mean" in c for c in configs)
    if with_best:
        head += ["best val ppl (mean ± std)", "stopped by ASHA"]
    rows = []
    order = "best_mean" if with_best else "mean"
    for c in sorted(configs, key=lambda c: (c[order] is None, c[order] or 0.0)):
        row = [*[c[k] for k in knobs], f"{c['params']:,}", _pm(c["mean"], c["std"], c["n"])]
        if with_best:
            row += [_pm(c["best_mean"], c["best_std"]), f"{c['stopped']}/{c['trials']}"]
        rows.append(row)
    return f"Sweep `{r['name']}` (`enigma tune`)", table(head, rows)


def section_faults(r: dict) -> tuple[str, list[str]]:
    plan = r["faults_planned"]
    title = (
        f"Faults survived (`enigma bench faults`: tiny, {r['workers']} workers, {r['steps']} "
        f"steps, {r['precision']}, a checkpoint every {r['save_every']} steps)"
    )
    sigterms = plan.get("sigterm_at_steps") or [plan["sigterm_at_step"]]
    rows = [
        ["worker kills at steps", ", ".join(map(str, plan["kill_at_steps"]))],
        [
            "driver SIGTERM at steps, each followed by the same command",
            ", ".join(map(str, sigterms)),
        ],
        ["newest checkpoint truncated before the first rerun", r["corrupted_checkpoint"]],
    ]
    if "killed_in_set_aside" in r:
        rows.append(["driver SIGKILLed while setting the truncated checkpoint aside, then rerun",
                     "killed, resumed" if r["killed_in_set_aside"] else "not reached"])  # fmt: skip
    if "checkpoint_without_model_states" in r:
        rows.append(["newest checkpoint's model states removed before the second rerun",
                     r["checkpoint_without_model_states"]])  # fmt: skip
    if "other_job" in r:
        kept = all(r["other_job"].values())
        rows.append(["another job's placement groups (one orphaned, one pending) afterwards",
                     "intact" if kept else "removed or changed"])  # fmt: skip
    rows += [
        ["faults injected / survived", f"{r['faults_injected']} / {r['faults_survived']}"],
        ["steps missing from the final curve", len(r["steps_lost"])],
        ["steps logged twice in the final curve", len(r["steps_logged_twice"])],
        ["steps trained again after restarts", r["steps_trained_again"]],
        ["largest per-step loss difference vs the undisturbed run", r["max_loss_diff"]],
    ]
    if "s3" in r:
        s3 = r["s3"]
        yes = lambda ok: "yes" if ok else "no"  # noqa: E731
        rows += [
            ["S3 (moto's server, the endpoint in the URI's query): driver SIGKILLed at step",
             r["faults_planned"]["sigterm_at_steps"][0] if s3["driver_sigkilled"] else "no"],
            ["its lock, left as another host's, taken over once its lease lapsed",
             yes(s3["lease_taken_over"])],
            ["resumed from the bucket by a driver with another output directory",
             yes(s3["resumed_from_bucket"])],
            ["rank 0 SIGKILLed inside its first model swap; the run finished, the model loads",
             yes(s3["killed_in_model_swap"] and s3["finished"] and s3["model_loads"])],
            ["S3: steps missing / largest per-step loss difference vs the undisturbed run",
             f"{len(s3['steps_lost'])} / {s3['max_loss_diff']}"],
        ]  # fmt: skip
    if "stalled_store" in r.get("lease", {}):
        rows += _lease_rows(r["lease"])
    rows.append(["wall s (all runs)", r["wall_seconds"]])
    return title, table(["", ""], rows)


def _lease_rows(lease: dict) -> list[list]:
    stalled, paused = lease["stalled_store"], lease["paused_past_its_term"]
    yes = lambda ok: "yes" if ok else "no"  # noqa: E731
    term = lease["lease_term_s"]
    return [
        [f"lease ({term} s term), store stalled: the driver ended, s after the stall (exit)",
         f"{stalled['a_ended_s_after_the_stall']} ({stalled['a_exit_code']})"],
        ["taken over, resumed and finished from another directory; the old run's objects "
         "landed after the stall", f"{yes(stalled['b_finished'] and stalled['b_resumed'])}; "
         f"{stalled['objects_from_a_after_the_stall']}"],
        ["the stalled run's held requests, released after the taker finished: objects landed; "
         "in checkpoints a reader trusts",
         f"{len(stalled['held_requests_released_after_the_taker_finished']['keys'])}; "
         f"{len(stalled['held_requests_released_after_the_taker_finished']['in_trusted_checkpoints'])}"],
        [f"lease, driver paused {paused['a_paused_s']} s: taken over as generation 2, finished",
         yes(paused["b_took_over_as_generation_2"] and paused["b_finished"])],
        ["the paused run: refused by the fence (times); trusted up to step; its checkpoints "
         "past it (never read); the newest trusted checkpoint",
         f"{paused['a_refused_by_the_fence']}; {paused['fence']['cuts'].get('1')}; "
         f"{', '.join(paused['a_checkpoints_after_the_cut']) or 'none'}; "
         f"{paused['newest_trusted_checkpoint']}"],
        ["the model in the bucket is the taker's; the paused driver's exit once continued",
         f"{yes(paused['model_is_b_s'])}; {paused['a_exit_code']}"],
    ]  # fmt: skip


def section_gpu(r: dict) -> tuple[str, list[str]]:
    checks = r["checks"]
    t = checks.get("throughput", {})
    shape = f", {t['preset']}, B={t['batch']}, L={t['seq_len']}" if t else ""
    precision = "bf16 weights" if t.get("weights") == "bf16" else "bf16 autocast"
    title = f"One GPU (`enigma bench gpu`: {r['gpu']}{shape}, {precision})"
    rows = []
    for key in [k for k in t if k == "plain"] + [k for k in t if k.startswith("enigma_")]:
        if isinstance(t[key], dict):
            m, label = t[key], gpu_variant_label(key)
            ratio = m["tokens_per_sec"] / t["plain"]["tokens_per_sec"]
            mfu = f"{m['mfu']:.1%}" if m.get("mfu") is not None else "n/a"
            memory = f"{m['peak_memory_mb']:,.0f}" if m.get("peak_memory_mb") else "n/a"
            rows.append([label, _rate(m["tokens_per_sec"]), f"{ratio:.2f}", mfu, memory])
    lines = table(["model", "tokens/s", "vs plain", "MFU", "peak MB"], rows) if rows else []
    if checks.get("machine_cost", {}).get("parts"):
        lines += machine_cost_lines(checks["machine_cost"])
    shown = {k: c for k, c in checks.items() if k not in ("throughput", "memory", "machine_cost")}
    if shown:
        lines += table(["check", "result"], [[k, _check(c)] for k, c in shown.items()])
    m = checks.get("memory")
    if m and m.get("points"):
        lines += memory_lm_lines(m, peak_key="peak_mb", what="peak CUDA memory", plot=False)
    return title, lines


def gpu_variant_label(key: str) -> str:
    """The row label of a throughput pass: ``enigma_graphs_bf16_rotors`` reads "EnigmaLM,
    machine compiled + CUDA graphs, bf16 rotor products"."""
    if key == "plain":
        return "plain Transformer"
    if key == "enigma_coupling_half":
        return "EnigmaLM, coupling nets d/2, machine compiled"
    modes = {"eager": "eager", "compiled": "compiled", "graphs": "compiled + CUDA graphs"}
    mode = key.removeprefix("enigma_").removesuffix("_bf16_rotors")
    low = ", bf16 rotor products" if key.endswith("_bf16_rotors") else ""
    return f"EnigmaLM, machine {modes.get(mode, mode)}{low}"


def machine_cost_lines(c: dict) -> list[str]:
    """The machine's forward + backward by part: operations, ms, GPU-busy ms."""
    rows = []
    for name, p in c["parts"].items():
        busy = f"{p['busy_ms']:.2f}" if p.get("busy_ms") is not None else "n/a"
        rows.append([name, p["uses"], p["ops"], f"{p['ms']:.2f}", busy])
    head = ["machine part (fwd + bwd)", "uses per pass", "ops", "ms", "GPU-busy ms"]
    shape = f"B={c['batch']}, L={c['seq_len']}, d={c['d']}"
    return table(head, rows) + [f"The machine's cost by part at {shape}, bf16 autocast.", ""]


def _check(c: dict) -> str:
    mark = "ok" if c.get("ok") else "FAILED"
    keys = ("optimizer", "first_loss", "last_loss", "loss_scale", "logits_max_rel_diff", "fp32",
            "bf16_autocast", "bf16_rotors", "fp32_tf32", "summary", "error")  # fmt: skip
    shown = [f"{k} {c[k]:.4g}" if isinstance(c[k], float) else f"{k}: {c[k]}" for k in keys
             if k in c]  # fmt: skip
    return f"{mark}: " + "; ".join(shown)


def section_generic(r: dict) -> tuple[str, list[str]]:
    skip = {"benchmark", "command", "git_commit", "machine", "date", "_file", "notes"}
    rows = [[k, json.dumps(v, ensure_ascii=False)] for k, v in r.items() if k not in skip]
    return r["benchmark"], table(["key", "value"], rows)


SECTIONS = {
    "core": section_core,
    "memory": section_memory,
    "rebuild": section_rebuild,
    "flow": section_flow,
    "train": section_train,
    "data-scale": section_data_scale,
    "train-overhead": section_train_overhead,
    "copy": section_copy,
    "enwik8": section_enwik8,
    "sweep": section_sweep,
    "faults": section_faults,
    "gpu": section_gpu,
    "eval": section_eval,
    "finetune": section_finetune,
    "serve": section_serve,
    "roofline": section_roofline,
}


def sections(results: list[dict]) -> list[tuple[str, list[str]]]:
    """(title, lines) per section, in :data:`ORDER`; lines end with provenance and notes."""
    rank = {name: i for i, name in enumerate(ORDER)}
    ordered = sorted(results, key=lambda r: (rank.get(r["benchmark"], len(ORDER)), r["_file"]))
    out = []
    lm = [r for r in ordered if r["benchmark"] == "lm"]
    for r in ordered:
        kind = r["benchmark"]
        if kind == "lm":
            if r is lm[0]:
                out.append(section_lm(lm))
            continue
        title, lines = SECTIONS.get(kind, section_generic)(r)
        out.append((title, lines + provenance(r) + notes(r)))
    return out


def render(parts: list[tuple[str, list[str]]], level: str, docs: str) -> str:
    """Markdown with ``level`` headings; ``docs`` is the path from the output to ``docs/``."""
    lines = []
    for title, body in parts:
        lines += [f"{level} {title}", "", *body]
    return ("\n".join(lines).rstrip() + "\n").replace(DOCS, docs)


def results_page(parts) -> str:
    head = (
        "# Benchmark results\n\nGenerated by `enigma report docs/results` from the JSON files in "
        "`docs/results/`; each section names the command, commit, machine and date that produced "
        "it.\n\n"
    )
    return head + render(parts, "##", "")


def readme_with_results(readme: str, parts) -> str:
    if BEGIN not in readme or END not in readme:
        raise InputError(f"the README has no results block ({BEGIN} ... {END})")
    before, rest = readme.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    return f"{before}{BEGIN}\n{render(parts, '###', 'docs/')}{END}{after}"


def run(args: argparse.Namespace) -> str:
    results = _load(args.inputs)
    out = Path(args.out)
    readme = Path(args.readme or ("README.md" if args.out == "docs/results.md" else ""))
    parts = sections(results)
    page = results_page(parts)
    new_readme = readme_with_results(readme.read_text(), parts) if readme.is_file() else None
    if args.check:
        stale = [str(out)] if not out.is_file() or out.read_text() != page else []
        if new_readme is not None and readme.read_text() != new_readme:
            stale.append(str(readme))
        if stale:
            raise InputError(
                f"{' and '.join(stale)} differ from docs/results/*.json: run `enigma report "
                f"{' '.join(args.inputs)}` and commit the result"
            )
        print(f"{out}{f' and {readme}' if new_readme else ''} match {len(results)} benchmark files")
        return page
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in results:
        if r["benchmark"] == "copy":
            plot_copy_curves(r, out.parent / PLOTS / copy_plot_name(r))
        if r["benchmark"] == "memory" and r.get("lm"):
            plot_memory_lm(r["lm"], out.parent / PLOTS / "memory_lm.png")
    out.write_text(page)
    if new_readme is not None:
        readme.write_text(new_readme)
    print(f"wrote {out} and the Results of {readme} ({len(results)} benchmark files)")
    return page
