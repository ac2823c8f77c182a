"""``enigma tune`` (and ``ray_jobs/sweep.py``): Ray Tune sweeps over layers, blocks and rotors.

Each trial is a Tune function trainable that runs one ``TorchTrainer`` of the ordinary training
loop (Ray Train V2), whose reports reach Tune through ``TuneReportCallback``. The trial function
itself holds no CPU; its Train workers do, and ``max_concurrent_trials`` is sized so that the
running trials' workers fit the cluster. ASHA stops trials on ``val_loss`` at the evaluation
steps. Rerunning the same command on the same output directory restores an interrupted sweep with
``Tuner.restore``: finished trials are kept, unfinished ones resume from their last checkpoint.

The trial itself is :mod:`enigma.train.sweep_trial`; the tables, plot and ``best.json`` are
:mod:`enigma.train.sweep_results`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from ray.tune import Callback

from ..errors import InputError
from ..storage.locks import DirectoryLock
from ..storage.store import Storage
from .config import (
    MODEL_KEYS,
    TRAIN_KEYS,
    TrainConfig,
    apply_overrides,
    build_config,
    check_model,
)
from .sweep_results import collect, write_outputs
from .sweep_trial import sweep_trial, trial_config

SPEC_FILE = "sweep.json"
# What a sweep writes in its output directory and, with --storage-path, also puts there.
RESULT_FILES = ("results.csv", "results.md", "trials.json", "sweep-summary.json",
                "val_ppl_vs_knobs.png", "best.json")  # fmt: skip
EXPERIMENT = "tune"
DEFAULT_GRID = ["num_transformer_layers=1,2", "num_rev_blocks=0,2", "num_rotors=0,2"]
SEARCHES = ("grid", "random", "optuna")
DEFAULT_SAMPLES = 8  # trials of a random or Optuna search


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="tiny, small, base or large")
    p.add_argument("--config", default=None, help="a JSON training config to start from")
    p.add_argument("--data", default=None, help="a directory written by `enigma data prepare`")
    p.add_argument(
        "--ds-config", default=None, help="DeepSpeed JSON (default ds_configs/zero2.json)"
    )
    p.add_argument("--output-dir", default="runs/sweep")
    p.add_argument("--storage-path", default=None,
                   help="where the sweep lasts: a local or NFS path, or a storage URI every node "
                   "reaches (s3://, gs://); the same command on any machine restores it from "
                   "there (default: --output-dir)")  # fmt: skip
    p.add_argument(
        "--grid",
        nargs="+",
        default=None,
        metavar="KEY=V1,V2",
        help=f"values to cross (default: {' '.join(DEFAULT_GRID)})",
    )
    p.add_argument(
        "--search",
        choices=SEARCHES,
        default="grid",
        help="grid: every combination of --grid; random: --num-samples draws; optuna: "
        "--num-samples trials chosen by Optuna's TPE from the results so far",
    )
    p.add_argument("--lr", default=None, help="a value, or loguniform:LOW:HIGH")
    p.add_argument(
        "--range",
        dest="ranges",
        nargs="+",
        default=[],
        metavar="KEY=loguniform:LOW:HIGH",
        help="continuous training knobs (lr, warmup_ratio, weight_decay, ...): "
        "loguniform:LOW:HIGH or uniform:LOW:HIGH",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help=f"grid: draws of the ranges per grid point (default 1); random and optuna: trials in "
        f"all (default {DEFAULT_SAMPLES})",
    )
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    p.add_argument("--workers-per-trial", type=int, default=1)
    p.add_argument("--max-concurrent", type=int, default=None, help="default: what the CPUs fit")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--force", action="store_true", help="start over instead of restoring")


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["num_rotors=0,2", ...]`` -> ``{"num_rotors": [0, 2]}``, keys and values checked."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not values:
            raise InputError(f"--grid {item!r}: expected key=v1,v2,...")
        if key in ("seed", "lr"):
            raise InputError(f"--grid {key}: use --{'seeds' if key == 'seed' else 'lr'} instead")
        parsed = []
        for raw in values.split(","):
            probe = apply_overrides(TrainConfig(), {key: raw.strip()})  # unknown key: named
            parsed.append(probe.model[key] if key in MODEL_KEYS else getattr(probe, key))
        grid[key] = parsed
    return grid


def parse_range(key: str, spec: str, flag: str):
    """``loguniform:LOW:HIGH`` or ``uniform:LOW:HIGH`` -> a Tune domain for ``key``."""
    kind, _, rest = spec.partition(":")
    if kind not in ("loguniform", "uniform"):
        raise InputError(f"{flag} {spec!r}: expected loguniform:LOW:HIGH or uniform:LOW:HIGH")
    try:
        low, high = (float(x) for x in rest.split(":"))
    except ValueError:
        raise InputError(f"{flag} {spec!r}: expected {kind}:LOW:HIGH") from None
    if not (0 < low < high if kind == "loguniform" else low < high):
        need = "0 < LOW < HIGH" if kind == "loguniform" else "LOW < HIGH"
        raise InputError(f"{flag} {spec!r}: need {need}")
    if key not in TRAIN_KEYS:
        apply_overrides(TrainConfig(), {key: str(low)})  # names the unknown key, or its neighbour
    if TRAIN_KEYS[key].type != "float":
        raise InputError(f"{flag}: {key} is not a continuous knob; give its values with --grid")
    from ray import tune

    return (tune.loguniform if kind == "loguniform" else tune.uniform)(low, high)


def parse_lr(spec: str | None):
    """None, a float, or ``loguniform:LOW:HIGH`` -> a tune domain or a value."""
    if spec is None:
        return None
    if ":" in spec:
        return parse_range("lr", spec, "--lr")
    try:
        value = float(spec)
    except ValueError:
        raise InputError(f"--lr {spec!r}: expected a number or loguniform:LOW:HIGH") from None
    if value <= 0:
        raise InputError(f"--lr {spec!r} must be positive")
    return value


def parse_ranges(items: list[str]) -> dict:
    """``["warmup_ratio=uniform:0:0.2", ...]`` -> ``{"warmup_ratio": domain}``: training knobs
    only (a model's shape takes discrete values: ``--grid``)."""
    ranges = {}
    for item in items:
        key, sep, spec = item.partition("=")
        key = key.strip()
        if not sep:
            raise InputError(f"--range {item!r}: expected KEY=loguniform:LOW:HIGH")
        if key in MODEL_KEYS:
            raise InputError(f"--range {key}: a model key takes discrete values; use --grid")
        if key == "seed":
            raise InputError("--range seed: use --seeds instead")
        ranges[key] = parse_range(key, spec.strip(), f"--range {key}")
    return ranges


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


class ReleaseStoppedTrials(Callback):
    """Frees the placement groups of trials that ended without shutting their Train run down
    (stopped by ASHA, failed, killed), so the next wave of trials can be placed; re-plans how
    many trials run at once from the room free; says every 30 s what waits for room; and ends
    the sweep only when a trial's workers can never be placed, or waited ``timeout_s`` (> 0)
    with none of the sweep's placed (:class:`~enigma.cluster.placement.PlacementWatch`)."""

    def __init__(self, timeout_s: float, concurrent: Concurrency | None = None,
                 every_s: float = 2.0, note_s: float = 30.0):  # fmt: skip
        from ..cluster.placement import PlacementWatch

        self.every_s, self.last, self.watch = every_s, 0.0, PlacementWatch(timeout_s)
        self.concurrent, self.note_s, self.noted = concurrent, note_s, time.monotonic()

    @staticmethod
    def _release() -> None:
        from ..cluster.placement import remove_orphaned_placement_groups

        freed = remove_orphaned_placement_groups()
        if freed:
            print(f"  released {freed} placement group(s) left by ended trials", flush=True)

    def _sweep(self) -> None:
        self.last = time.monotonic()
        self._release()

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last < self.every_s:
            return
        self._sweep()
        reason = self.watch.check()
        if reason:
            raise InputError(f"sweep stopped: {reason}")
        if self.concurrent is not None:
            from ..cluster.placement import job_groups

            self.concurrent.replan(sum(g.by_actor for g in job_groups(("CREATED",))))
        if time.monotonic() - self.noted >= self.note_s:
            self.noted = time.monotonic()
            waiting = self.watch.waiting()
            if waiting:
                print(f"  waiting for room: {waiting}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._sweep()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._sweep()


def release_leftovers(wait_s: float = 15.0) -> None:
    """After the last trial: no Train controller of this sweep may live on, and no placement
    group of a dead one may keep its CPUs (the last trials' controllers die after Tune is done)."""
    from ..cluster.placement import actor_placement_groups, kill_train_controllers

    kill_train_controllers()
    deadline = time.monotonic() + wait_s
    while actor_placement_groups(dead_creator_only=False) and time.monotonic() < deadline:
        time.sleep(0.5)
        ReleaseStoppedTrials._release()


SWEEP_DEFAULTS = ["save_steps=1000000000"]  # checkpoints come with the evaluations


def sweep_config(args: argparse.Namespace) -> TrainConfig:
    """The base config of every trial; paths absolute (trials run in other directories)."""
    if args.num_samples is None:
        args.num_samples = 1 if args.search == "grid" else DEFAULT_SAMPLES
    if args.seeds < 1 or args.num_samples < 1 or args.workers_per_trial < 1:
        raise InputError("--seeds, --num-samples and --workers-per-trial must be at least 1")
    if args.search != "grid" and args.seeds > 1:
        # Tune draws a fresh sample for every seed: seeds would not repeat one configuration.
        name = {"optuna": "Optuna", "random": "random"}[args.search]
        raise InputError(
            f"--seeds repeats grid points, but each {name} trial is its own sample: drop "
            "--seeds, or use --search grid to repeat configurations over seeds"
        )
    cfg = build_config(
        args.preset,
        args.config,
        [*SWEEP_DEFAULTS, *args.sets],
        data=args.data,
        ds_config=args.ds_config,
        workers=args.workers_per_trial,
        max_steps=args.max_steps,
        output_dir=str(Path(args.output_dir).resolve()),
    )
    data = cfg.data if "://" in cfg.data else str(Path(cfg.data).resolve())
    return cfg.replace(data=data, ds_config=str(Path(cfg.ds_config).resolve()))


def grid_points(grid: dict[str, list]) -> list[dict]:
    combos = [{}]
    for key, values in grid.items():
        combos = [{**c, key: v} for c in combos for v in values]
    return combos


class Concurrency:
    """How many trials run at once, planned from what is *free* and re-planned as that changes:
    on a shared cluster the trials that do not fit wait for room, queued by Tune, and start as
    other jobs (or ours) let go. ``most``: what the whole cluster fits (and ``--max-concurrent``
    allows); ``per_trial``: one trial's workers' CPUs and GPUs. A trial larger than the cluster
    was already refused by ``prepare_run``'s ``check_fits``."""

    def __init__(self, cfg: TrainConfig, max_concurrent: int | None):
        import ray

        gpus = cfg.gpus_per_worker if cfg.gpus_per_worker > 0 else 0
        self.per_trial = {"CPU": cfg.workers * cfg.cpus_per_worker, "GPU": cfg.workers * gpus}
        self.most = max(1, self.fits(ray.cluster_resources()))
        if max_concurrent:
            self.most = min(self.most, max_concurrent)
        self.alg = None  # the search algorithm whose limit re-planning moves

    def fits(self, resources: dict) -> int:
        return min(int(resources.get(k, 0) + 1e-9) // v for k, v in self.per_trial.items() if v)

    def now(self, placed: int = 0) -> int:
        """What runs at once now: the trials of ours placed, and as many more as the free room
        holds (at least one: a trial that does not fit waits for room)."""
        import ray

        return max(1, min(self.most, placed + self.fits(ray.available_resources())))

    def replan(self, placed: int) -> None:
        if self.alg is not None:
            self.alg.max_concurrent = self.now(placed)


def claim_directory(store: Storage, spec: dict, force: bool) -> bool:
    """Make the storage ``store`` this sweep's; True when it holds this sweep, interrupted."""
    from ray import tune

    if not store.remote:
        Path(store.root).mkdir(parents=True, exist_ok=True)
    if force:
        for part in (EXPERIMENT, "train", "trials", SPEC_FILE):
            store.delete(part)
    restoring = tune.Tuner.can_restore(store.uri(EXPERIMENT))
    if restoring:
        saved = store.read_text(SPEC_FILE)
        if (json.loads(saved) if saved else None) != json.loads(json.dumps(spec)):
            where = "--storage-path" if store.remote else "--output-dir"
            raise InputError(
                f"{store} holds a different sweep; use another {where}, or --force to start over"
            )
    store.write_text(json.dumps(spec, indent=2), SPEC_FILE)
    return restoring


def make_scheduler(name: str, max_steps: int, eval_steps: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if name == "asha":
        grace = min(eval_steps, max_steps)
        return ASHAScheduler(
            time_attr="step", max_t=max_steps, grace_period=grace, reduction_factor=2
        )
    return FIFOScheduler()


def search_space(args, cfg: TrainConfig, grid: dict, ranges: dict) -> dict:
    """The trial's config: the sweep's constants, and the knobs as the search wants them (crossed
    for a grid, drawn for random and Optuna), the lr among them when it is a range."""
    from ray import tune

    seeds = list(range(cfg.seed, cfg.seed + args.seeds))
    discrete = tune.grid_search if args.search == "grid" else tune.choice
    space = {
        "base": cfg.to_dict(),
        "knob_keys": [*grid, *(k for k in ranges if k != "lr")],
        "sweep_dir": cfg.output_dir,
        "sweep_storage": args.storage_path or "",
        "seed": tune.grid_search(seeds) if args.search == "grid" else seeds[0],
        "lr": cfg.lr,
    }
    space.update({k: discrete(v) for k, v in grid.items()})
    space.update(ranges)
    return space


def trial_dirname(trial) -> str:
    """Tune's default spells the whole config (the sweep's base among it) into the name."""
    return trial.trial_id


def make_searcher(search: str, seed: int, concurrent: int):
    """The search algorithm, holding the concurrency limit (``max_concurrent``, which the
    sweep re-plans as the cluster's free room changes)."""
    if search != "optuna":  # Tune's variant generator: grid_search crossed, domains drawn
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=concurrent)
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    # TPE; metric and mode come from the TuneConfig
    return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=concurrent)


def build_tuner(args, store: Storage, cfg: TrainConfig, space: dict, concurrent: Concurrency,
                restoring: bool):  # fmt: skip
    """A new ``Tuner`` over ``space``, or the interrupted one restored (with its searcher), its
    experiment in the sweep's storage."""
    from ray import tune

    # The trial function only drives its Train run: no CPU (its workers hold those), and a
    # token of memory because Tune needs a non-empty bundle.
    trainable = tune.with_resources(sweep_trial, {"CPU": 0, "memory": 64 * 2**20})
    if restoring:
        return tune.Tuner.restore(
            store.uri(EXPERIMENT), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    concurrent.alg = make_searcher(args.search, cfg.seed, concurrent.now())
    callbacks = [
        ConsoleLines(space["knob_keys"], cfg.max_steps),
        ReleaseStoppedTrials(cfg.placement_timeout_s, concurrent),
    ]
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="val_loss",
            mode="min",
            search_alg=concurrent.alg,
            scheduler=make_scheduler(args.scheduler, cfg.max_steps, cfg.eval_steps),
            num_samples=args.num_samples,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=store.uri(), verbose=0, callbacks=callbacks
        ),
    )


def run(args: argparse.Namespace) -> dict:
    """``enigma tune``: one sweep per output directory at a time (it is locked while it runs)."""
    grid = parse_grid(args.grid or DEFAULT_GRID)
    ranges = parse_ranges(args.ranges)
    lr = parse_lr(args.lr)
    if lr is not None and "lr" in ranges:
        raise InputError("--lr and --range lr=...: give the learning rate once")
    if lr is not None and not isinstance(lr, float):
        ranges["lr"] = lr
    elif lr is not None:
        args.sets = [*args.sets, f"lr={lr}"]
    cfg = sweep_config(args)
    store = Storage.of(args.storage_path or "", cfg.output_dir)
    apart = store.root != str(Path(cfg.output_dir).resolve())
    if apart:
        store.check()  # reachable and writable, before Ray starts
    with (
        DirectoryLock(Path(cfg.output_dir) / ".lock", "enigma tune"),
        contextlib.ExitStack() as held,
    ):
        if apart:  # one sweep at a time there too, whichever machine runs it
            held.enter_context(store.lock("enigma tune"))
        return _run_locked(args, store, cfg, grid, ranges)


def _run_locked(args, store: Storage, cfg: TrainConfig, grid: dict, ranges: dict) -> dict:
    from .driver import prepare_run

    combos = grid_points(grid)
    for combo in combos:  # every model shape is valid before anything starts
        check_model(trial_config(cfg.to_dict(), combo))
    # Data, tokenizer, seq_len, DeepSpeed JSON and the trial's size against the cluster.
    spec = prepare_run(cfg, workers_flag="--workers-per-trial")
    cfg = spec.train.replace(max_steps=spec.plan.total_steps)
    concurrent = Concurrency(cfg, args.max_concurrent)
    space = search_space(args, cfg, grid, ranges)
    # What makes it the same sweep (the output directory not among it: with --storage-path
    # another machine's disk restores it).
    base = {k: v for k, v in cfg.to_dict().items() if k != "output_dir"}
    sweep = {"base": base, "grid": grid, "ranges": args.ranges, "lr": args.lr}
    sweep.update(search=args.search, num_samples=args.num_samples, seeds=args.seeds)
    sweep.update(scheduler=args.scheduler)
    restoring = claim_directory(store, sweep, args.force)
    print(
        f"sweep: {describe_trials(args, len(combos))}, {cfg.max_steps} steps each, "
        f"{args.scheduler.upper()}, {concurrent.now()} at a time ({cfg.workers} worker(s) x "
        f"{cfg.cpus_per_worker} CPU each; {concurrent.most} when the cluster is free)"
        + (" - restoring the interrupted sweep" if restoring else ""),
        flush=True,
    )
    tuner = build_tuner(args, store, cfg, space, concurrent, restoring)
    # Tune's console output engine prints its configuration box and paths even at verbose=0;
    # ConsoleLines prints what a user needs. The classic engine is silent at verbose=0.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    grid_result = tuner.fit()
    release_leftovers()
    knob_keys = space["knob_keys"]
    rows = collect(grid_result, knob_keys, cfg, store)
    out = Path(cfg.output_dir)
    outputs = write_outputs(out, rows, knob_keys, cfg, cfg.max_steps, args.command_line)
    if store.root != str(out.resolve()):
        for name in RESULT_FILES:
            if (out / name).is_file():
                store.write_bytes((out / name).read_bytes(), name)
        print(f"results also in {store}", flush=True)
    return outputs


def describe_trials(args, combos: int) -> str:
    if args.search == "grid":
        trials = combos * args.seeds * args.num_samples
        return (
            f"{trials} trials ({combos} configurations x {args.seeds} seeds x "
            f"{args.num_samples} samples)"
        )
    return f"{args.num_samples} trials chosen by {args.search} search over {combos} grid points"


def main(argv: list[str] | None = None) -> int:
    """Entry point shared by ``enigma tune`` and ``ray_jobs/sweep.py``."""
    from ..cli import main as cli_main

    return cli_main(["tune", *(sys.argv[1:] if argv is None else argv)])
