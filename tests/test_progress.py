"""The console hears from a run at least every half minute, whatever ``log_steps`` is."""

from enigma.train import progress


class Queue:
    def __init__(self):
        self.items = []

    def put(self, item, timeout=None):
        self.items.append(item)


def test_rank_zero_ticks_between_log_lines_and_only_rank_zero(monkeypatch):
    monkeypatch.setattr(progress, "TICK_S", 0.0)
    queue = Queue()
    progress.Reporter(1, "unused", queue).tick(3, 10, 1234.0)
    assert queue.items == []  # other ranks send nothing
    reporter = progress.Reporter.__new__(progress.Reporter)  # rank 0 without TensorBoard
    reporter.queue, reporter.sent, reporter.writer = queue, 0.0, None
    reporter.tick(3, 10, 1234.0)
    assert queue.items == [{"kind": "tick", "step": 3, "total": 10, "tokens_per_sec": 1234.0}]
    monkeypatch.setattr(progress, "TICK_S", 3600.0)
    reporter.tick(4, 10, 1234.0)
    assert len(queue.items) == 1, "no more than one tick per TICK_S"


def test_the_printer_says_what_it_waits_for_when_nothing_comes(monkeypatch, capsys):
    printer = progress.ProgressPrinter(Queue())
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.0)
    printer.heartbeat()
    out = capsys.readouterr().out
    assert "still running" in out and "placing the workers" in out
    printer.show({"kind": "tick", "step": 7, "total": 20, "tokens_per_sec": 900.0})
    shown = capsys.readouterr().out
    assert shown.startswith("step      7/20 |") and "900 tok/s" in shown and "ETA" in shown
    printer.heartbeat()
    assert "at step 7, nothing from rank 0" in capsys.readouterr().out
    monkeypatch.setattr(progress, "HEARTBEAT_S", 3600.0)
    printer.heartbeat()
    assert capsys.readouterr().out == ""


def test_each_checkpoint_carries_the_curve_so_far_to_the_runs_storage(tmp_path):
    """A run killed outright and resumed on another machine from the bucket has the curve up to
    the checkpoint it resumes from (uploads came only with evaluations before)."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    local, remote = tmp_path / "local", tmp_path / "bucket"
    upload = lambda: shutil.copytree(local, remote, dirs_exist_ok=True)  # noqa: E731
    reporter = progress.Reporter(0, str(local), None, 0, upload)
    for step in range(1, 6):
        line = dict.fromkeys(progress.TRAIN_SCALARS, 1.0)
        reporter.train({**line, "step": step, "loss": 1.0 / step})
    reporter.persist()  # what the loop does before the checkpoint at step 5; then a SIGKILL
    acc = EventAccumulator(str(remote))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    progress.Reporter(1, "unused", None, 0, upload).persist()  # other ranks upload nothing
