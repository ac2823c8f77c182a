"""One sweep trial, run inside a Tune trial actor: a ``TorchTrainer`` of the ordinary training loop
(Ray Train V2) whose reports reach Tune through ``TuneReportCallback``, and a log of those reports
that survives a killed driver.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ray.train import UserCallback

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
    """The Tune function trainable: ``config`` holds the sweep's base, knobs, seed and lr."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .driver import build_trainer, prepare_run

    name = ray.tune.get_context().get_trial_id()  # stable across a restore
    out = Path(config["sweep_dir"]) / "trials" / name
    # After a restore, give Tune whatever this trial already reported (Tune may have lost it);
    # a finished trial stops there, an unfinished one resumes from its last checkpoint.
    done = read_reports(out / REPORTS)
    for report in done["reports"]:
        ray.tune.report({k: v for k, v in report.items() if k != "wall_s"})
    if done["complete"]:
        return
    knobs = {k: config[k] for k in config["knob_keys"]}
    params = {**knobs, "seed": config["seed"], "lr": config["lr"], "output_dir": str(out)}
    params["run_name"] = trial_label(knobs, config["lr"], config["seed"])
    cfg = trial_config(config["base"], params)
    trainer = build_trainer(
        prepare_run(cfg),
        name=name,  # a restored trial finds its Train run by name and resumes it
        storage_path=str(Path(config["sweep_dir"]) / "train"),
        callbacks=[TuneReportCallback(), ReportLog(out / REPORTS, cfg.max_steps)],
    )
    trainer.fit()
    # Early stopping ends a run before max_steps: it is complete all the same.
    write_reports(out / REPORTS, read_reports(out / REPORTS)["reports"], complete=True)
