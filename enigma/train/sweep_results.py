"""A sweep's results: a row per trial (:func:`trial_row`), ``results.csv``, ``results.md`` (mean ±
std over seeds, at equal steps and at equal wall time), the plot, the TensorBoard hparams view and
``best.json`` for ``enigma train --config``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
from pathlib import Path

from .config import TrainConfig
from .sweep_trial import read_reports, trial_config, trial_label


def count_params(cfg: TrainConfig) -> int:
    import torch

    from ..models.lm import EnigmaLM

    with torch.device("meta"):
        model = EnigmaLM(cfg.model_config())
    # Tied embeddings are one tensor: count each parameter once.
    return sum(p.numel() for p in model.parameters())


def trial_row(result, knob_keys: list[str], base: dict, store, params: int) -> dict:
    """One trial's row: its knobs, lr, seed, size, last and best val ppl, speed, wall time, and
    its history of evaluations (from the trial's own report log, which survives a restore)."""
    c = result.config
    trial_id = (result.metrics or {}).get("trial_id", "")
    reports = read_reports(store, trial_id)["reports"]
    history = [
        {k: r.get(k, math.nan) for k in ("step", "val_loss", "wall_s", "tokens_per_sec")}
        for r in reports
        if r.get("val_loss") is not None
    ]
    last = history[-1] if history else {}
    best = min((h["val_loss"] for h in history), default=math.nan)
    return {
        "trial": trial_id,
        **{k: c[k] for k in knob_keys},
        "lr": c["lr"],
        "seed": c["seed"],
        "params": params,
        "steps": last.get("step", 0),
        "val_ppl": math.exp(last["val_loss"]) if last else math.nan,
        "best_val_ppl": math.exp(best) if history else math.nan,
        "tokens_per_sec": last.get("tokens_per_sec", math.nan),
        "wall_s": last.get("wall_s", math.nan),
        "asha_stopped": bool(history) and last["step"] < base["max_steps"],
        "error": result.error is not None,
        "history": history,
    }


def collect(grid_result, knob_keys: list[str], cfg: TrainConfig, store) -> list[dict]:
    """A row per trial (its reports read from the sweep's storage, ``store``); each
    configuration's parameters are counted once."""
    rows, params_cache = [], {}
    base = cfg.to_dict()
    for result in grid_result:
        knobs = {k: result.config[k] for k in knob_keys}
        key = json.dumps(knobs, sort_keys=True)
        if key not in params_cache:
            params_cache[key] = count_params(trial_config(base, knobs))
        rows.append(trial_row(result, knob_keys, base, store, params_cache[key]))
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(values: list[float]) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "-"
    n = len([v for v in values if not math.isnan(v)])
    return f"{mean:.1f} ± {std:.1f} (n={n})" if n > 1 else f"{mean:.1f} (n=1)"


def ppl_at_step(row: dict, step: int) -> float:
    for h in row["history"]:
        if h["step"] == step:
            return math.exp(h["val_loss"])
    return math.nan


def ppl_by_wall(row: dict, seconds: float) -> float:
    """Best val ppl among the evaluations done within ``seconds`` of the trial's start."""
    done = [h["val_loss"] for h in row["history"] if h["wall_s"] <= seconds]
    return math.exp(min(done)) if done else math.nan


def write_csv(out: Path, rows: list[dict], knob_keys: list[str]) -> None:
    fields = ["trial", *knob_keys, "lr", "seed", "params", "steps", "val_ppl", "best_val_ppl"]
    fields += ["tokens_per_sec", "wall_s", "asha_stopped", "error"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "trials.json").write_text(json.dumps(rows, indent=2))


def group_by_knobs(rows: list[dict], knob_keys: list[str]) -> list[tuple[tuple, list[dict]]]:
    """Configurations with their trials, best mean best-val-ppl first."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in knob_keys), []).append(r)

    def sort_key(item):
        mean = _mean_std([r["best_val_ppl"] for r in item[1]])[0]
        return math.inf if math.isnan(mean) else mean

    return sorted(groups.items(), key=sort_key)


def _cell(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def summary_table(ordered: list, knob_keys: list[str]) -> list[str]:
    head = [*knob_keys, "lr", "params", "best val ppl", "tokens/s", "steps", "wall s", "ASHA"]
    rows = []
    for knobs, members in ordered:
        lrs = sorted({m["lr"] for m in members})
        lr = f"{lrs[0]:.2g}" if len(lrs) == 1 else f"{lrs[0]:.2g}–{lrs[-1]:.2g}"
        stopped = sum(m["asha_stopped"] for m in members)
        cells = [*map(_cell, knobs), lr, f"{members[0]['params']:,}"]
        cells += [_pm([m["best_val_ppl"] for m in members])]
        cells += [f"{_mean_std([m['tokens_per_sec'] for m in members])[0]:,.0f}"]
        cells += [",".join(str(m["steps"]) for m in members)]
        cells += [f"{_mean_std([m['wall_s'] for m in members])[0]:.0f}"]
        cells += [f"{stopped}/{len(members)} stopped"]
        rows.append(cells)
    return _markdown(head, rows)


def equal_steps_table(ordered: list, knob_keys: list[str], rows: list[dict]) -> list[str]:
    steps = sorted({h["step"] for r in rows for h in r["history"]})
    head = [*knob_keys, *[f"step {s}" for s in steps]]
    cells = [
        [*map(_cell, knobs)] + [_pm([ppl_at_step(m, s) for m in members]) for s in steps]
        for knobs, members in ordered
    ]
    return _markdown(head, cells)


def equal_wall_table(ordered: list, knob_keys: list[str], budget: float) -> list[str]:
    head = [*knob_keys, f"≤ {budget:.0f} s"]
    cells = [
        [*map(_cell, knobs), _pm([ppl_by_wall(m, budget) for m in members])]
        for knobs, members in ordered
    ]
    return _markdown(head, cells)


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    for rank, i in enumerate(order):
        ranks[i] = float(rank)
    return ranks


def ordering_settled(ordered: list, rows: list[dict]) -> str | None:
    """Whether the configurations' order by mean val ppl holds between the last two evaluations:
    Spearman's rank correlation of the two columns (1: the same order)."""
    steps = sorted({h["step"] for r in rows for h in r["history"]})
    if len(steps) < 2 or len(ordered) < 3:
        return None
    columns = [
        [_mean_std([ppl_at_step(m, step) for m in members])[0] for _, members in ordered]
        for step in steps[-2:]
    ]
    if any(math.isnan(v) for column in columns for v in column):
        return None
    a, b = (_ranks(column) for column in columns)
    n = len(a)
    rho = 1 - 6 * sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / (n * (n * n - 1))
    return (
        f"Order of the configurations at step {steps[-2]} against step {steps[-1]}: Spearman "
        f"ρ = {rho:.2f} (1: the same order)."
    )


def results_markdown(rows: list[dict], ordered: list, knob_keys: list[str], cfg, max_steps) -> str:
    lines = [
        f"# Sweep: {cfg.preset}, {max_steps} steps, {len(rows)} trials",
        "",
        "Val perplexity, mean ± std over the trials of each configuration (seeds, lr draws). "
        "Differences smaller than the spread are not evidence.",
        "",
        *summary_table(ordered, knob_keys),
        "",
        "## At equal steps (val ppl at each evaluation; ASHA-stopped trials drop out)",
        "",
        *equal_steps_table(ordered, knob_keys, rows),
    ]
    settled = ordering_settled(ordered, rows)
    if settled:
        lines += ["", settled]
    finished = [r["wall_s"] for r in rows if r["steps"] >= max_steps and not r["error"]]
    if finished:
        budget = min(finished)  # the fastest finished trial's time
        lines += [
            "",
            f"## At equal wall time (best val ppl within {budget:.0f} s of each trial's start, "
            "the fastest finished trial's time)",
            "",
            *equal_wall_table(ordered, knob_keys, budget),
        ]
    return "\n".join(lines) + "\n"


def sweep_record(ordered: list, knob_keys: list[str], cfg, max_steps: int, out: Path) -> dict:
    """The sweep as a benchmark JSON for ``enigma report``: val ppl at the last step."""
    configurations = []
    for knobs, members in ordered:
        mean, std = _mean_std([ppl_at_step(m, max_steps) for m in members])
        n = sum(not math.isnan(ppl_at_step(m, max_steps)) for m in members)
        best_mean, best_std = _mean_std([m["best_val_ppl"] for m in members])
        entry = {**dict(zip(knob_keys, knobs, strict=True)), "params": members[0]["params"]}
        entry.update(mean=mean, std=std, n=n, best_mean=best_mean, best_std=best_std)
        entry.update(trials=len(members), stopped=sum(m["asha_stopped"] for m in members))
        # JSON has no NaN: a figure no trial reached is null.
        configurations.append({k: None if v != v else v for k, v in entry.items()})
    return {
        "benchmark": "sweep",
        "name": out.name,
        "preset": cfg.preset,
        "knobs": knob_keys,
        "at_step": max_steps,
        "trials": sum(len(m) for _, m in ordered),
        "configurations": configurations,
    }


def write_outputs(
    out: Path, rows: list[dict], knob_keys: list[str], cfg, max_steps, command: str = ""
) -> dict:
    """Every output of a sweep, then where they are."""
    from ..benchmarks import meta

    write_csv(out, rows, knob_keys)
    ordered = group_by_knobs(rows, knob_keys)
    record = sweep_record(ordered, knob_keys, cfg, max_steps, out)
    meta.save(record, str(out / "sweep-summary.json"), command)
    (out / "results.md").write_text(results_markdown(rows, ordered, knob_keys, cfg, max_steps))
    plot(out / "val_ppl_vs_knobs.png", rows, knob_keys)
    hparams(out / "tensorboard", rows, knob_keys)
    best = best_config(out, ordered, knob_keys, cfg)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.csv'}, {out / 'results.md'}, {out / 'val_ppl_vs_knobs.png'}")
    print(f"summary for enigma report: {out / 'sweep-summary.json'}")
    print(f"best configuration: {out / 'best.json'} (enigma train --config {out / 'best.json'})")
    print(f"TensorBoard (curves and hparams): tensorboard --logdir {out}")
    return {"rows": rows, "best": best}


def plot(path: Path, rows: list[dict], knob_keys: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [*knob_keys, *(["lr"] if len({r["lr"] for r in rows}) > 1 else [])]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        scored = [r for r in rows if not math.isnan(r["best_val_ppl"])]
        values = sorted({r[key] for r in rows}, key=lambda v: (str(type(v)), v))
        if len(values) > 8 and all(isinstance(v, float) for v in values):  # a continuous knob
            ax.scatter([r[key] for r in scored], [r["best_val_ppl"] for r in scored], alpha=0.6)
            if key == "lr":
                ax.set_xscale("log")
        else:  # discrete values (numbers, strings, booleans) side by side, each with its mean
            for i, v in enumerate(values):
                ys = [r["best_val_ppl"] for r in scored if r[key] == v]
                ax.scatter([i] * len(ys), ys, alpha=0.6)
                if ys:
                    ax.plot([i], [statistics.fmean(ys)], "k_", markersize=20)
            ax.set_xticks(range(len(values)), [_cell(v) for v in values])
        ax.set_xlabel(key)
        ax.set_ylabel("best val perplexity")
    fig.suptitle("each dot a trial; bars are means")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def hparams(directory: Path, rows: list[dict], knob_keys: list[str]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(directory, ignore_errors=True)
    with SummaryWriter(str(directory)) as writer:
        for r in rows:
            if math.isnan(r["best_val_ppl"]):
                continue
            writer.add_hparams(
                {**{k: r[k] for k in knob_keys}, "lr": r["lr"], "seed": r["seed"]},
                {
                    "val/best_ppl": r["best_val_ppl"],
                    "train/steps": r["steps"],
                    "perf/tokens_per_sec": r["tokens_per_sec"],
                },
                run_name=f"{trial_label({k: r[k] for k in knob_keys}, r['lr'], r['seed'])}"
                f"-{r['trial']}",
            )


def best_config(out: Path, ordered: list, knob_keys: list[str], cfg: TrainConfig) -> dict:
    """The first of the configurations ``write_outputs`` sorted by mean best val ppl, as an
    ``enigma train`` config, with the lr of its best trial."""
    knobs, members = ordered[0]
    members = [m for m in members if not math.isnan(m["best_val_ppl"])]
    if not members:
        raise RuntimeError(f"no trial of the sweep in {out} reported a val loss")
    lead = min(members, key=lambda m: m["best_val_ppl"])
    knobs = dict(zip(knob_keys, knobs, strict=True))
    best = trial_config(cfg.to_dict(), {**knobs, "lr": lead["lr"], "output_dir": str(out / "best")})
    config = best.to_dict()
    tmp = out / "best.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, out / "best.json")
    return config
