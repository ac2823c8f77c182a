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
