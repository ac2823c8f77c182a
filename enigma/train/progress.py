"""Progress of a run: rank 0's :class:`Reporter` writes TensorBoard and sends lines to the driver,
whose :class:`ProgressPrinter` prints them (step, loss, ppl, tokens/s, ETA).

The two meet in a Ray queue; each message is a dict with a ``kind`` of ``train``, ``eval``,
``note``, ``error`` (any rank's failure, sent as it happens) or ``done``.
"""

from __future__ import annotations

import threading
import time

TRAIN_SCALARS = {"loss": "train/loss", "ppl": "train/ppl", "lr": "lr", "grad_norm": "grad_norm"}
TRAIN_SCALARS |= {"tokens_per_sec": "tokens_per_sec", "memory_mb": "memory/worker_mb"}
TRAIN_SCALARS |= {"machine_reconstruction_error": "machine/reconstruction_error"}


class Reporter:
    """Owns the TensorBoard writer and the progress queue; on ranks other than 0 it does nothing,
    so the loop calls it unconditionally."""

    def __init__(self, rank: int, log_dir: str, queue=None, resumed_step: int = 0, upload=None):
        """``log_dir``: where the events are written; ``upload()``, when given, copies them to the
        run's storage (after each evaluation and at the end)."""
        self.writer, self.queue = None, queue if rank == 0 else None
        self.upload = upload if rank == 0 else None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            # After a restart, drop the events logged past the checkpoint: those steps run again
            # (all of them when the restart begins from no checkpoint at all).
            purge = resumed_step + 1
            self.writer = SummaryWriter(log_dir, purge_step=purge)

    def train(self, line: dict) -> None:
        if self.writer:
            for key, tag in TRAIN_SCALARS.items():
                self.writer.add_scalar(tag, line[key], line["step"])
        self._send({"kind": "train", **line})

    def eval(self, metrics: dict, improved: bool) -> None:
        if self.writer:
            self.writer.add_scalar("val/loss", metrics["val_loss"], metrics["step"])
            self.writer.add_scalar("val/ppl", metrics["val_ppl"], metrics["step"])
            self.writer.flush()
            if self.upload:
                self.upload()
        self._send({"kind": "eval", **metrics, "improved": improved})

    def note(self, text: str) -> None:
        self._send({"kind": "note", "text": text})

    def done(self, summary: dict) -> None:
        if self.writer:
            self.writer.close()
            if self.upload:
                self.upload()
        self._send({"kind": "done", **summary})

    def _send(self, item: dict) -> None:
        if self.queue is not None:
            self.queue.put(item)


class ProgressPrinter(threading.Thread):
    """Prints rank 0's progress lines on the driver and keeps them for the summary."""

    def __init__(self, queue):
        super().__init__(daemon=True)
        self.queue, self.stopped = queue, threading.Event()
        self.start_time, self.trains, self.evals = time.perf_counter(), [], []
        self.errors: list[dict] = []

    def run(self) -> None:
        from ray.util.queue import Empty

        while not self.stopped.is_set():
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                continue
            self.show(item)

    def show(self, item: dict) -> None:
        if item["kind"] == "train":
            self.trains.append(item)
            elapsed = time.perf_counter() - self.start_time
            eta = elapsed / max(item["step"], 1) * (item["total"] - item["step"])
            print(
                f"step {item['step']:>6}/{item['total']} | loss {item['loss']:.4f} | "
                f"ppl {item['ppl']:>9.2f} | {item['tokens_per_sec']:>8,.0f} tok/s | "
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
    """Ends a run whose workers cannot be placed: after ``timeout_s`` with a placement group
    still pending it records why in ``reason`` and kills the run's Train controller, so the
    ``fit()`` waiting on it returns (a signal would not reach a thread blocked in ``ray.get``,
    and Ray Train's own abort waits for the stuck controller)."""

    def __init__(self, timeout_s: float, every_s: float = 5.0):
        super().__init__(daemon=True)
        self.timeout_s, self.every_s = timeout_s, every_s
        self.stopped, self.reason = threading.Event(), None

    def __enter__(self) -> PlacementWatchdog:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()

    def run(self) -> None:
        from ..ray_setup import PlacementWatch, kill_train_controllers

        watch = PlacementWatch(self.timeout_s)
        while not self.stopped.wait(self.every_s):
            self.reason = watch.check()
            if self.reason:
                kill_train_controllers()
                return
