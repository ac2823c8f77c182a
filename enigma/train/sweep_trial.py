"""One sweep trial, run inside a Tune trial actor: a ``TorchTrainer`` of the ordinary training loop
(Ray Train V2) whose reports reach Tune through ``TuneReportCallback``, and a log of those reports
that survives a killed driver. Everything that lasts goes to the sweep's storage (its output
directory, or ``--storage-path``: a URI every node reaches): the log, the trial's Train
checkpoints, TensorBoard events and model; its node's output directory is scratch.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from ray.train import UserCallback

from ..storage.store import Storage
from .config import TrainConfig, apply_overrides

REPORTS = "reports.json"


def trial_label(knobs: dict, lr: float, seed: int) -> str:
    """A trial's name in TensorBoard and the tables' plots: its knobs, lr and seed."""
    shown = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    return ",".join(f"{k}={shown(v)}" for k, v in {**knobs, "lr": lr, "seed": seed}.items())


def trial_config(base: dict, params: dict) -> TrainConfig:
    """The sweep's base config (``TrainConfig.to_dict``) with one trial's knobs set."""
    return apply_overrides(TrainConfig.from_dict(base), params)


class ReportLog(UserCallback):
    """Every report of a trial's Train run, with the trial's wall time, kept in its directory.

    Tune saves its experiment state every few seconds, so a killed driver can lose a trial's
    last results or even its completion. This file is rewritten (atomically) at each report and
    marked complete at the last step; a restored trial replays it instead of training again.
    The callback runs in the Train controller, not in the trial function, so it keeps no state
    between reports: the file is the state."""

    def __init__(self, store: Storage, trial: str, max_steps: int):
        self.store, self.trial, self.max_steps = store, trial, max_steps
        self.start, self.offset = time.perf_counter(), None

    def after_report(self, run_context, metrics, checkpoint):
        state = read_reports(self.store, self.trial)
        if self.offset is None:  # wall time carries on across a restore
            self.offset = state["reports"][-1]["wall_s"] if state["reports"] else 0.0
        report = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float, str))}
        report["wall_s"] = self.offset + time.perf_counter() - self.start
        # A resumed run repeats the steps after its checkpoint: keep the later reports.
        kept = [r for r in state["reports"] if r.get("step", -1) < report.get("step", 0)]
        complete = report.get("step", 0) >= self.max_steps
        write_reports(self.store, self.trial, [*kept, report], complete)


def read_reports(store: Storage, trial: str) -> dict:
    """Trial ``trial``'s report log in the sweep's storage."""
    text = store.read_text("trials", trial, REPORTS)
    return json.loads(text) if text else {"complete": False, "reports": []}


def write_reports(store: Storage, trial: str, reports: list[dict], complete: bool) -> None:
    body = json.dumps({"complete": complete, "reports": reports}, indent=1)
    store.write_text(body, "trials", trial, REPORTS)


def sweep_storage(config: dict) -> Storage:
    """The sweep's storage, from a trial's config."""
    return Storage.of(config.get("sweep_storage", ""), config["sweep_dir"])


def sweep_trial(config: dict) -> None:
    """The Tune function trainable: ``config`` holds the sweep's base, knobs, seed and lr."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .driver import build_trainer, prepare_run

    name = ray.tune.get_context().get_trial_id()  # stable across a restore
    store = sweep_storage(config)
    # This node's scratch: the sweep's output directory, or with --storage-path a directory of
    # this node's own (a restored sweep's configs name the first machine's output directory).
    apart = bool(config.get("sweep_storage"))
    scratch = Path(tempfile.gettempdir()) / "enigma-sweeps" if apart else None
    out = (scratch or Path(config["sweep_dir"])) / "trials" / name
    # After a restore, give Tune whatever this trial already reported (Tune may have lost it);
    # a finished trial stops there, an unfinished one resumes from its last checkpoint.
    done = read_reports(store, name)
    for report in done["reports"]:
        ray.tune.report({k: v for k, v in report.items() if k != "wall_s"})
    if done["complete"]:
        return
    knobs = {k: config[k] for k in config["knob_keys"]}
    params = {**knobs, "seed": config["seed"], "lr": config["lr"], "output_dir": str(out)}
    params["run_name"] = trial_label(knobs, config["lr"], config["seed"])
    # Without --storage-path: the trial's own directory; with it: its place there.
    params["storage_path"] = store.uri("trials", name) if apart else ""
    cfg = trial_config(config["base"], params)
    trainer = build_trainer(
        prepare_run(cfg),
        name=name,  # a restored trial finds its Train run by name and resumes it
        storage_path=store.uri("train"),
        callbacks=[TuneReportCallback(), ReportLog(store, name, cfg.max_steps)],
    )
    trainer.fit()
    # Early stopping ends a run before max_steps: it is complete all the same.
    write_reports(store, name, read_reports(store, name)["reports"], complete=True)
