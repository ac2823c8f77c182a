"""``enigma tune`` (and ``ray_jobs/sweep.py``): Ray Tune sweeps over layers, blocks and rotors.

Each trial is a Tune function trainable that runs one ``TorchTrainer`` of the ordinary training
loop (Ray Train V2), whose reports reach Tune through ``TuneReportCallback``. The trial function
itself holds no CPU; its Train workers do, and ``max_concurrent_trials`` is sized so that the
running trials' workers fit the cluster. ASHA stops trials on ``val_loss`` at the evaluation
steps. Rerunning the same command on the same output directory restores an interrupted sweep with
``Tuner.restore``: finished trials are kept, unfinished ones resume from their last checkpoint.

Outputs: ``results.csv`` (a row per trial), ``results.md`` (a row per configuration, mean ± std
over seeds, at equal steps and at equal wall time), ``val_ppl_vs_knobs.png``, a TensorBoard hparams
view under ``tensorboard/``, and ``best.json`` for ``enigma train --config``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from ray.train import UserCallback
from ray.tune import Callback

from .train_config import MODEL_KEYS, TrainConfig, apply_overrides, build_config

SPEC_FILE = "sweep.json"
EXPERIMENT = "tune"
DEFAULT_GRID = ["num_transformer_layers=1,2", "num_rev_blocks=0,2", "num_rotors=0,2"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="tiny, small, base or large")
    p.add_argument("--config", default=None, help="a JSON training config to start from")
    p.add_argument("--data", default=None, help="a directory written by `enigma data prepare`")
    p.add_argument("--ds-config", default=None, help="DeepSpeed JSON (default zero2_bf16)")
    p.add_argument("--output-dir", default="runs/sweep")
    p.add_argument(
        "--grid",
        nargs="+",
        default=None,
        metavar="KEY=V1,V2",
        help=f"values to cross (default: {' '.join(DEFAULT_GRID)})",
    )
    p.add_argument("--lr", default=None, help="a value, or loguniform:LOW:HIGH")
    p.add_argument("--num-samples", type=int, default=1, help="draws of --lr per grid point")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    p.add_argument("--workers-per-trial", type=int, default=1)
    p.add_argument("--max-concurrent", type=int, default=None, help="default: what the CPUs fit")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--force", action="store_true", help="start over instead of restoring")


# ---------------------------------------------------------------------------------------------
# The search space


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["num_rotors=0,2", ...]`` -> ``{"num_rotors": [0, 2]}``, keys and values checked."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not values:
            raise ValueError(f"--grid {item!r}: expected key=v1,v2,...")
        if key in ("seed", "lr"):
            raise ValueError(f"--grid {key}: use --{'seeds' if key == 'seed' else 'lr'} instead")
        parsed = []
        for raw in values.split(","):
            probe = apply_overrides(TrainConfig(), {key: raw.strip()})  # unknown key: named
            parsed.append(probe.model[key] if key in MODEL_KEYS else getattr(probe, key))
        grid[key] = parsed
    return grid


def parse_lr(spec: str | None):
    """None, a float, or ``loguniform:LOW:HIGH`` -> (tune domain or value, description)."""
    if spec is None:
        return None
    kind, _, rest = spec.partition(":")
    if kind == "loguniform":
        try:
            low, high = (float(x) for x in rest.split(":"))
        except ValueError:
            raise ValueError(f"--lr {spec!r}: expected loguniform:LOW:HIGH") from None
        if not 0 < low < high:
            raise ValueError(f"--lr {spec!r}: need 0 < LOW < HIGH")
        from ray import tune

        return tune.loguniform(low, high)
    try:
        value = float(spec)
    except ValueError:
        raise ValueError(f"--lr {spec!r}: expected a number or loguniform:LOW:HIGH") from None
    if value <= 0:
        raise ValueError(f"--lr {spec!r} must be positive")
    return value


def trial_config(base: dict, params: dict) -> TrainConfig:
    cfg = TrainConfig(**{**base, "betas": tuple(base["betas"]), "model": dict(base["model"])})
    return apply_overrides(cfg, params)


def count_params(cfg: TrainConfig) -> int:
    import torch

    from .lm import EnigmaLM

    with torch.device("meta"):
        model = EnigmaLM(cfg.model_config())
    # Tied embeddings are one tensor: count each parameter once.
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# One trial (runs inside a Tune trial actor)


REPORTS = "reports.json"


class ReportLog(UserCallback):
    """Every report of a trial's Train run, with the trial's wall time, kept in its directory.

    Tune saves its experiment state every few seconds, so a killed driver can lose a trial's
    last results or even its completion. This file is rewritten (atomically) at each report and
    marked complete at the last step; a restored trial replays it instead of training again.
    The callback runs in the Train controller, not in the trial function, so it keeps no state
    between reports: the file is the state."""

    def __init__(self, path: Path, max_steps: int):
        self.path, self.max_steps = path, max_steps
        self.start, self.offset = time.perf_counter(), None

    def after_report(self, run_context, metrics, checkpoint):
        state = read_reports(self.path)
        if self.offset is None:  # wall time carries on across a restore
            self.offset = state["reports"][-1]["wall_s"] if state["reports"] else 0.0
        report = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float, str))}
        report["wall_s"] = self.offset + time.perf_counter() - self.start
        # A resumed run repeats the steps after its checkpoint: keep the later reports.
        kept = [r for r in state["reports"] if r.get("step", -1) < report.get("step", 0)]
        write_reports(self.path, [*kept, report], report.get("step", 0) >= self.max_steps)


def read_reports(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"complete": False, "reports": []}


def write_reports(path: Path, reports: list[dict], complete: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"complete": complete, "reports": reports}, indent=1))
    os.replace(tmp, path)


def sweep_trial(config: dict) -> None:
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .trainer import build_trainer, prepare_run

    knobs = {k: config[k] for k in config["knob_keys"]}
    cfg = trial_config(config["base"], {**knobs, "seed": config["seed"], "lr": config["lr"]})
    name = ray.tune.get_context().get_trial_id()  # stable across a restore
    sweep_dir = Path(config["sweep_dir"])
    out = sweep_dir / "trials" / name
    # After a restore, give Tune whatever this trial already reported (Tune may have lost it);
    # a finished trial stops there, an unfinished one resumes from its last checkpoint.
    done = read_reports(out / REPORTS)
    for report in done["reports"]:
        ray.tune.report({k: v for k, v in report.items() if k != "wall_s"})
    if done["complete"]:
        return
    cfg.output_dir = str(out)
    run = prepare_run(cfg)
    trainer = build_trainer(
        cfg,
        run,
        out,
        name=name,  # a restored trial finds its Train run by name and resumes it
        storage_path=str(sweep_dir / "train"),
        callbacks=[TuneReportCallback(), ReportLog(out / REPORTS, cfg.max_steps)],
    )
    trainer.fit()
    # Early stopping ends a run before max_steps: it is complete all the same.
    write_reports(out / REPORTS, read_reports(out / REPORTS)["reports"], complete=True)


class ConsoleLines(Callback):
    """A line per evaluation and per finished trial, instead of Tune's status tables."""

    def __init__(self, knob_keys: list[str], max_steps: int):
        self.knob_keys, self.max_steps, self.done = knob_keys, max_steps, 0

    def _label(self, trial) -> str:
        c = trial.config
        knobs = " ".join(f"{k}={c[k]}" for k in self.knob_keys)
        return f"{trial.trial_id} [{knobs} lr={c['lr']:.2g} seed={c['seed']}]"  # id first

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("val_ppl") is not None:
            print(
                f"  {self._label(trial)} step {result['step']:>5}: val ppl {result['val_ppl']:.2f}",
                flush=True,
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        last = trial.last_result or {}
        how = "finished" if last.get("step", 0) >= self.max_steps else "stopped by ASHA"
        print(f"trial done: {self._label(trial)} {how} at step {last.get('step')}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"trial FAILED: {self._label(trial)}; see {trial.local_path}", flush=True)


# ---------------------------------------------------------------------------------------------
# The driver


def sweep_spec(args, cfg: TrainConfig, grid: dict) -> dict:
    return {
        "base": cfg.to_dict(),
        "grid": grid,
        "lr": args.lr,
        "num_samples": args.num_samples,
        "seeds": args.seeds,
        "scheduler": args.scheduler,
    }


def run(args: argparse.Namespace) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from .trainer import prepare_run

    if args.seeds < 1 or args.num_samples < 1 or args.workers_per_trial < 1:
        raise ValueError("--seeds, --num-samples and --workers-per-trial must be at least 1")
    grid = parse_grid(args.grid or DEFAULT_GRID)
    lr_space = parse_lr(args.lr)
    out = Path(args.output_dir).resolve()
    cfg = build_config(
        args.preset,
        args.config,
        ["save_steps=1000000000", *args.sets],  # checkpoints come with the evaluations
        data=args.data,
        ds_config=args.ds_config,
        workers=args.workers_per_trial,
        max_steps=args.max_steps,
        output_dir=str(out),
    )
    # Trials run in other working directories: every path absolute.
    cfg.data = str(Path(cfg.data).resolve())
    cfg.ds_config = str(Path(cfg.ds_config).resolve())
    combos = [{}]
    for key, values in grid.items():
        combos = [{**c, key: v} for c in combos for v in values]
    for combo in combos:  # every model shape is valid before anything starts
        trial_config(cfg.to_dict(), combo).model_config()
    run_info = prepare_run(cfg)  # data, tokenizer, seq_len and DeepSpeed JSON checked here
    max_steps = run_info["plan"]["total_steps"]
    cfg.max_steps = max_steps
    spec = sweep_spec(args, cfg, grid)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    per_trial = cfg.workers * cfg.cpus_per_worker
    if per_trial > cpus:
        raise ValueError(
            f"a trial needs {per_trial} CPUs ({cfg.workers} workers x {cfg.cpus_per_worker}) but "
            f"the cluster has {cpus}; lower --workers-per-trial"
        )

    out.mkdir(parents=True, exist_ok=True)
    experiment = out / EXPERIMENT
    spec_path = out / SPEC_FILE
    if args.force:
        for path in (experiment, out / "train", out / "trials"):
            shutil.rmtree(path, ignore_errors=True)
        spec_path.unlink(missing_ok=True)
    restoring = experiment.is_dir() and tune.Tuner.can_restore(str(experiment))
    if restoring:
        saved = json.loads(spec_path.read_text()) if spec_path.is_file() else None
        if saved != json.loads(json.dumps(spec)):
            raise ValueError(
                f"{out} holds a different sweep; use another --output-dir, or --force to start over"
            )
    spec_path.write_text(json.dumps(spec, indent=2))

    fits = max(1, cpus // per_trial)
    concurrent = min(args.max_concurrent or fits, fits)
    knob_keys = list(grid)
    param_space = {
        "base": cfg.to_dict(),
        "knob_keys": knob_keys,
        "sweep_dir": str(out),
        "seed": tune.grid_search(list(range(cfg.seed, cfg.seed + args.seeds))),
        "lr": lr_space if lr_space is not None else cfg.lr,
        **{k: tune.grid_search(v) for k, v in grid.items()},
    }
    eval_steps = min(cfg.eval_steps, max_steps)
    if args.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="step", max_t=max_steps, grace_period=eval_steps, reduction_factor=2
        )
    else:
        scheduler = FIFOScheduler()
    trials = len(combos) * args.seeds * args.num_samples
    print(
        f"sweep: {trials} trials ({len(combos)} configurations x {args.seeds} seeds x "
        f"{args.num_samples} samples), {max_steps} steps each, {args.scheduler.upper()}, "
        f"{concurrent} at a time ({cfg.workers} worker(s) x {cfg.cpus_per_worker} CPU each)"
        + (" - restoring the interrupted sweep" if restoring else ""),
        flush=True,
    )
    # The trial function only drives its Train run: no CPU (its workers hold those), and a
    # token of memory because Tune needs a non-empty bundle.
    trainable = tune.with_resources(sweep_trial, {"CPU": 0, "memory": 64 * 2**20})
    lines = ConsoleLines(knob_keys, max_steps)
    if restoring:
        tuner = tune.Tuner.restore(
            str(experiment),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric="val_loss",
                mode="min",
                scheduler=scheduler,
                num_samples=args.num_samples,
                max_concurrent_trials=concurrent,
            ),
            run_config=tune.RunConfig(
                name=EXPERIMENT, storage_path=str(out), verbose=0, callbacks=[lines]
            ),
        )
    grid_result = tuner.fit()
    rows = collect(grid_result, knob_keys, cfg, out)
    return write_outputs(out, rows, knob_keys, cfg, max_steps)


# ---------------------------------------------------------------------------------------------
# Results


def collect(grid_result, knob_keys: list[str], cfg: TrainConfig, sweep_dir: Path) -> list[dict]:
    """A row per trial, with its history of evaluations."""
    rows, params_cache = [], {}
    base = cfg.to_dict()
    for result in grid_result:
        c = result.config
        knobs = {k: c[k] for k in knob_keys}
        key = json.dumps(knobs, sort_keys=True)
        if key not in params_cache:
            params_cache[key] = count_params(trial_config(base, knobs))
        trial_id = (result.metrics or {}).get("trial_id", "")
        reports = read_reports(sweep_dir / "trials" / trial_id / REPORTS)["reports"]
        history = [
            {k: r.get(k, math.nan) for k in ("step", "val_loss", "wall_s", "tokens_per_sec")}
            for r in reports
            if r.get("val_loss") is not None
        ]
        last = history[-1] if history else {}
        best = min((h["val_loss"] for h in history), default=math.nan)
        rows.append(
            {
                "trial": trial_id,
                **knobs,
                "lr": c["lr"],
                "seed": c["seed"],
                "params": params_cache[key],
                "steps": last.get("step", 0),
                "val_ppl": math.exp(last["val_loss"]) if last else math.nan,
                "best_val_ppl": math.exp(best) if history else math.nan,
                "tokens_per_sec": last.get("tokens_per_sec", math.nan),
                "wall_s": last.get("wall_s", math.nan),
                "asha_stopped": bool(history) and last["step"] < cfg.max_steps,
                "error": result.error is not None,
                "history": history,
            }
        )
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


def write_outputs(out: Path, rows: list[dict], knob_keys: list[str], cfg, max_steps) -> dict:
    fields = ["trial", *knob_keys, "lr", "seed", "params", "steps", "val_ppl", "best_val_ppl"]
    fields += ["tokens_per_sec", "wall_s", "asha_stopped", "error"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "trials.json").write_text(json.dumps(rows, indent=2))

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in knob_keys), []).append(r)
    eval_steps = sorted({h["step"] for r in rows for h in r["history"]})
    finished = [r["wall_s"] for r in rows if r["steps"] >= max_steps and not r["error"]]
    budget = min(finished) if finished else None

    def sort_key(item):
        mean = _mean_std([r["best_val_ppl"] for r in item[1]])[0]
        return math.inf if math.isnan(mean) else mean

    ordered = sorted(groups.items(), key=sort_key)
    lines = [
        f"# Sweep: {cfg.preset}, {max_steps} steps, {len(rows)} trials",
        "",
        "Val perplexity, mean ± std over the trials of each configuration (seeds, lr draws). "
        "Differences smaller than the spread are not evidence.",
        "",
    ]
    head = [*knob_keys, "lr", "params", "best val ppl", "tokens/s", "steps", "wall s", "ASHA"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for knobs, members in ordered:
        lrs = sorted({m["lr"] for m in members})
        lr = f"{lrs[0]:.2g}" if len(lrs) == 1 else f"{lrs[0]:.2g}–{lrs[-1]:.2g}"
        stopped = sum(m["asha_stopped"] for m in members)
        cells = [*map(str, knobs), lr, f"{members[0]['params']:,}"]
        cells += [_pm([m["best_val_ppl"] for m in members])]
        cells += [f"{_mean_std([m['tokens_per_sec'] for m in members])[0]:,.0f}"]
        cells += [",".join(str(m["steps"]) for m in members)]
        cells += [f"{_mean_std([m['wall_s'] for m in members])[0]:.0f}"]
        cells += [f"{stopped}/{len(members)} stopped"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## At equal steps (val ppl at each evaluation; ASHA-stopped trials drop out)",
        "",
    ]
    head = [*knob_keys, *[f"step {s}" for s in eval_steps]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for knobs, members in ordered:
        cells = [*map(str, knobs)] + [_pm([ppl_at_step(m, s) for m in members]) for s in eval_steps]
        lines.append("| " + " | ".join(cells) + " |")
    if budget is not None:
        lines += [
            "",
            f"## At equal wall time (best val ppl within {budget:.0f} s of each trial's start, "
            "the fastest finished trial's time)",
            "",
        ]
        head = [*knob_keys, f"≤ {budget:.0f} s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for knobs, members in ordered:
            cells = [*map(str, knobs), _pm([ppl_by_wall(m, budget) for m in members])]
            lines.append("| " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    plot(out / "val_ppl_vs_knobs.png", rows, knob_keys)
    hparams(out / "tensorboard", rows, knob_keys)
    best = best_config(out, ordered, knob_keys, cfg)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.csv'}, {out / 'results.md'}, {out / 'val_ppl_vs_knobs.png'}")
    print(f"best configuration: {out / 'best.json'} (enigma train --config {out / 'best.json'})")
    print(f"TensorBoard (curves and hparams): tensorboard --logdir {out}")
    return {"rows": rows, "best": best}


def plot(path: Path, rows: list[dict], knob_keys: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(knob_keys), figsize=(4 * len(knob_keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], knob_keys, strict=True):
        values = sorted({r[key] for r in rows})
        for v in values:
            ys = [
                r["best_val_ppl"] for r in rows if r[key] == v and not math.isnan(r["best_val_ppl"])
            ]
            ax.scatter([v] * len(ys), ys, alpha=0.6)
            if ys:
                ax.plot([v], [statistics.fmean(ys)], "k_", markersize=20)
        ax.set_xlabel(key)
        ax.set_xticks(values)
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
                    "hparam/best_val_ppl": r["best_val_ppl"],
                    "hparam/steps": r["steps"],
                    "hparam/tokens_per_sec": r["tokens_per_sec"],
                },
                run_name=r["trial"],
            )


def best_config(out: Path, ordered: list, knob_keys: list[str], cfg: TrainConfig) -> dict:
    """The first of the configurations ``write_outputs`` sorted by mean best val ppl, as an
    ``enigma train`` config, with the lr of its best trial."""
    knobs, members = ordered[0]
    members = [m for m in members if not math.isnan(m["best_val_ppl"])]
    if not members:
        raise RuntimeError(f"no trial of the sweep in {out} reported a val loss")
    lead = min(members, key=lambda m: m["best_val_ppl"])
    best = trial_config(
        cfg.to_dict(), {**dict(zip(knob_keys, knobs, strict=True)), "lr": lead["lr"]}
    )
    best.output_dir = str(out / "best")
    config = best.to_dict()
    config["betas"] = list(config["betas"])
    tmp = out / "best.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, out / "best.json")
    return config


def main(argv: list[str] | None = None) -> int:
    """Entry point shared by ``enigma tune`` and ``ray_jobs/sweep.py``."""
    from .cli import main as cli_main

    return cli_main(["tune", *(sys.argv[1:] if argv is None else argv)])
