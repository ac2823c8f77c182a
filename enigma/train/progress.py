"""Progress of a run: rank 0's :class:`Reporter` writes TensorBoard and sends lines to the driver,
whose :class:`ProgressPrinter` prints them (step, loss, ppl, tokens/s, ETA).

The two meet in a Ray queue; each message is a dict with a ``kind`` of ``train``, ``eval``,
``note``, ``tick`` (where rank 0 is, between log lines), ``error`` (any rank's failure, sent as
it happens) or ``done``. Whatever ``log_steps`` is, the console hears from the run at least every
:data:`HEARTBEAT_S` seconds: rank 0 ticks, and the printer says what it is waiting for when
nothing has come (workers being placed, engines being built, a first step being compiled).
"""

from __future__ import annotations

import math
import threading
import time

HEARTBEAT_S = 30.0  # the console hears from a run at least this often
TICK_S = 20.0  # rank 0 says where it is this often between log lines

# Every scalar sits under one of these prefixes, so TensorBoard groups them into five sections.
TRAIN_SCALARS = {"loss": "train/loss", "ppl": "train/ppl", "lr": "train/lr"}
TRAIN_SCALARS |= {"grad_norm": "train/grad_norm", "tokens_per_sec": "perf/tokens_per_sec"}
TRAIN_SCALARS |= {"memory_mb": "memory/worker_mb"}
TRAIN_SCALARS |= {"machine_reconstruction_error": "machine/reconstruction_error"}
TAG_PREFIXES = ("train/", "val/", "perf/", "memory/", "machine/")
# The Custom Scalars tab: train and val curves on one chart each.
LAYOUT = {
    "train and val": {
        "loss": ["Multiline", ["train/loss", "val/loss"]],
        "perplexity": ["Multiline", ["train/ppl", "val/ppl"]],
    }
}
# The HPARAMS tab's metric columns: scalars of the same run.
HPARAM_METRICS = ("val/best_ppl", "val/ppl", "perf/tokens_per_sec")


def run_hparams(cfg, zero_stage: int) -> dict:
    """What the HPARAMS tab shows of a run: the model's shape and knobs, and how it trained."""
    model = cfg.model_config()
    keys = ("d", "num_heads", "num_transformer_layers", "num_rev_blocks", "num_rotors")
    keys += ("rotor_offset", "rotor_matmul", "reversible_layers")
    values = {k: getattr(model, k) for k in keys}
    values.update(preset=cfg.preset, lr=cfg.lr, micro_batch=cfg.micro_batch)
    values.update(grad_accum=cfg.grad_accum, workers=cfg.workers, seq_len=cfg.resolved_seq_len)
    values.update(precision=cfg.precision, zero_stage=zero_stage, seed=cfg.seed)
    return values


class Reporter:
    """Owns the TensorBoard writer and the progress queue; on ranks other than 0 it does nothing,
    so the loop calls it unconditionally."""

    def __init__(
        self, rank: int, log_dir: str, queue=None, resumed_step: int = 0, upload=None, hparams=None
    ):
        """``log_dir``: the run's event directory; ``upload()``, when given, copies the events to
        the run's storage (before each checkpoint and at the end); ``hparams``: written at the
        end, with the final metrics, for the HPARAMS tab."""
        self.writer, self.queue = None, queue if rank == 0 else None
        self.sent = time.monotonic()
        self.upload = upload if rank == 0 else None
        self.hparams = hparams
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            # After a restart, drop the events logged past the checkpoint: those steps run again
            # (all of them when the restart begins from no checkpoint at all).
            purge = resumed_step + 1
            self.writer = SummaryWriter(log_dir, purge_step=purge)
            self.writer.add_custom_scalars(LAYOUT)

    def train(self, line: dict) -> None:
        if self.writer:
            for key, tag in TRAIN_SCALARS.items():
                self.writer.add_scalar(tag, line[key], line["step"])
        self._send({"kind": "train", **line})

    def eval(self, metrics: dict, improved: bool) -> None:
        if self.writer:
            self.writer.add_scalar("val/loss", metrics["val_loss"], metrics["step"])
            self.writer.add_scalar("val/ppl", metrics["val_ppl"], metrics["step"])
        self._send({"kind": "eval", **metrics, "improved": improved})

    def persist(self) -> None:
        """The events so far to disk and to the run's storage: called before each checkpoint, so
        a run resumed elsewhere from the bucket has the curve up to where it resumes (what it
        logs again after a restart, the writer's ``purge_step`` drops)."""
        if self.writer:
            self.writer.flush()
            if self.upload:
                self.upload()

    def write_hparams(self, step: int, best_val: float) -> None:
        """The run's knobs and its best val perplexity, in this run's own directory (torch's
        ``add_hparams`` would open another run for them)."""
        from torch.utils.tensorboard.summary import hparams

        if not self.hparams or not math.isfinite(best_val):
            return
        self.writer.add_scalar("val/best_ppl", math.exp(min(best_val, 50)), step)
        for summary in hparams(self.hparams, dict.fromkeys(HPARAM_METRICS, 0.0)):
            self.writer.file_writer.add_summary(summary)

    def note(self, text: str) -> None:
        self._send({"kind": "note", "text": text})

    def tick(self, step: int, total: int, tokens_per_sec: float) -> None:
        if time.monotonic() - self.sent >= TICK_S:
            self._send(
                {"kind": "tick", "step": step, "total": total, "tokens_per_sec": tokens_per_sec}
            )

    def done(self, summary: dict) -> None:
        if self.writer:
            self.write_hparams(summary["step"], summary["best_val"])
            self.writer.close()
            if self.upload:
                self.upload()
        self._send({"kind": "done", **summary})

    def _send(self, item: dict) -> None:
        if self.queue is not None:
            self.queue.put(item)
            self.sent = time.monotonic()


class ProgressPrinter(threading.Thread):
    """Prints rank 0's progress lines on the driver and keeps them for the summary."""

    def __init__(self, queue):
        super().__init__(daemon=True)
        self.queue, self.stopped = queue, threading.Event()
        self.start_time, self.trains, self.evals = time.perf_counter(), [], []
        self.errors: list[dict] = []
        self.printed, self.step = time.monotonic(), None

    def run(self) -> None:
        from ray.util.queue import Empty

        while not self.stopped.is_set():
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                self.heartbeat()
                continue
            self.show(item)
            self.printed = time.monotonic()
        # What is still queued at the stop is shown too (a failed run's last ranks' errors can
        # come in its final moments), not left unread.
        while True:
            try:
                item = self.queue.get_nowait()
            except Exception:  # Empty, or the queue's actor gone: nothing more to show
                break
            self.show(item)

    def heartbeat(self) -> None:
        """A line when nothing was printed for :data:`HEARTBEAT_S`, saying what the run waits
        for."""
        quiet = time.monotonic() - self.printed
        if quiet < HEARTBEAT_S:
            return
        if self.step is None:
            what = "starting: placing the workers, building their engines, the first step"
        else:
            what = f"at step {self.step}, nothing from rank 0 for {duration(quiet)}"
        elapsed = duration(time.perf_counter() - self.start_time)
        print(f"... still running ({elapsed} in): {what}", flush=True)
        self.printed = time.monotonic()

    def show(self, item: dict) -> None:
        if item["kind"] in ("train", "tick"):
            self.step = item["step"]
            elapsed = time.perf_counter() - self.start_time
            eta = elapsed / max(item["step"], 1) * (item["total"] - item["step"])
            progress = f"step {item['step']:>6}/{item['total']}"
            rate = f"{item['tokens_per_sec']:>8,.0f} tok/s"
            if item["kind"] == "tick":
                print(f"{progress} | {rate} | ETA {duration(eta)}", flush=True)
                return
            self.trains.append(item)
            print(
                f"{progress} | loss {item['loss']:.4f} | ppl {item['ppl']:>9.2f} | {rate} | "
                f"lr {item['lr']:.2e} | ETA {duration(eta)}",
                flush=True,
            )
        elif item["kind"] == "note":
            print(f"note: {item['text']}", flush=True)
        elif item["kind"] == "error":
            self.errors.append(item)
            lines = "\n".join(f"  | {line}" for line in item["lines"])
            print(f"worker rank {item['rank']} failed:\n{lines}", flush=True)
        elif item["kind"] == "eval":
            self.evals.append(item)
            mark = " (best, exported)" if item["improved"] else ""
            print(
                f"  eval @ {item['step']}: val loss {item['val_loss']:.4f} | "
                f"val ppl {item['val_ppl']:.2f}{mark}",
                flush=True,
            )


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


class PlacementWatchdog(threading.Thread):
    """Watches a run's workers while they wait to be placed (:class:`PlacementWatch`): says what
    waits and why every ``note_s`` seconds, and ends the run when they can never be placed (or
    have stalled for ``timeout_s`` with nothing of the job placed): it records why in ``reason``
    and kills the run's Train controller, so the ``fit()`` waiting on it returns (a signal would
    not reach a thread blocked in ``ray.get``, and Ray Train's own abort waits for the stuck
    controller)."""

    def __init__(self, timeout_s: float, every_s: float = 5.0, note_s: float = 30.0):
        super().__init__(daemon=True)
        self.timeout_s, self.every_s, self.note_s = timeout_s, every_s, note_s
        self.stopped, self.reason = threading.Event(), None

    def __enter__(self) -> PlacementWatchdog:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()

    def run(self) -> None:
        from ..cluster.placement import PlacementWatch, kill_train_controllers

        watch, noted = PlacementWatch(self.timeout_s), time.monotonic()
        while not self.stopped.wait(self.every_s):
            self.reason = watch.check()
            if self.reason:
                kill_train_controllers()
                return
            if time.monotonic() - noted >= self.note_s:
                waiting = watch.waiting()
                if waiting:
                    print(f"note: waiting for room: {waiting}", flush=True)
                noted = time.monotonic()
