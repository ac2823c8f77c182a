"""The engine in a process of its own, and the server's handle on it.

A replica's HTTP handlers and its engine would share one interpreter lock if they shared a
process: every streamed chunk the handlers build would be time the model's step waits for. So,
as vLLM splits its API server from its engine core, the replica starts the engine as a child
process (``python -m enigma.serve.engine_process``) that owns the model, the KV slots and the
sampler, and talks to it over a socket pair:

- server -> engine: ``("add", [choice, ...])``, ``("abort", id)``, ``("stats",)``;
- engine -> server: ``("ready", info)`` once the model is loaded, then after every step that
  produced any, ``("outputs", [Output, ...])``; ``("stats", dict)`` when asked.

The engine steps while any request waits or runs and blocks on the socket otherwise. It exits
when the server's end closes (the replica stopped or died: the socket reads end-of-file) and is
killed with it on Linux (``PR_SET_PDEATHSIG``). If the engine dies, every request in flight
fails with a 500 and ``/health`` answers 503, so Ray Serve replaces the replica.

On the server's side a reader thread posts each output into its request's :class:`Mailbox`,
waking the handler's event loop once per batch rather than per token; handlers only read their
mailboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing.connection import Connection

from .engine import Output
from .sampling import Sampling
from .scheduler import QueueFull

log = logging.getLogger(__name__)


@dataclass
class Choice:
    """One choice as the server hands it to the engine."""

    id: str
    index: int
    prompt: list[int]
    sampling: Sampling
    continues_prompt: bool


class EngineProcess:
    """The server's handle on its engine process."""

    def __init__(self, model_dir: str, *, device: str = "cpu", threads: int = 1,
                 max_rows: int = 16, max_queue: int = 256, policy: str = "continuous",
                 batch_wait_s: float = 0.02, start_timeout_s: float = 600):  # fmt: skip
        self.max_rows, self.max_queue = max_rows, max_queue
        ours, theirs = socket.socketpair()
        options = {"model": model_dir, "device": device, "threads": threads,
                   "max_rows": max_rows, "max_queue": max_queue, "policy": policy,
                   "batch_wait_s": batch_wait_s, "fd": theirs.fileno()}  # fmt: skip
        self.process = subprocess.Popen(
            [sys.executable, "-m", "enigma.serve.engine_process", json.dumps(options)],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        self.conn = Connection(ours.detach())
        if not self.conn.poll(start_timeout_s):
            self.process.kill()
            raise RuntimeError(f"the engine did not load {model_dir} in {start_timeout_s:.0f} s")
        try:
            kind, self.info = self.conn.recv()
        except EOFError:
            status = self.process.wait()
            raise RuntimeError(
                f"the engine process exited ({status}) while loading {model_dir}; its error is "
                "in the replica's log"
            ) from None
        self._send_lock = threading.Lock()
        self._boxes: dict[str, Mailbox] = {}
        self._in_flight = 0  # choices submitted and not yet finished (event loop only)
        self._streams = 0  # streamed requests open (event loop only)
        self._stats: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._dead: str | None = None
        self._stopping = False
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()

    def alive(self) -> bool:
        return self._dead is None and self.process.poll() is None

    def _send(self, message) -> None:
        with self._send_lock:
            self.conn.send(message)

    def submit(self, choices: list[Choice], stream: bool) -> Mailbox:
        """Hand over a request's choices; their outputs arrive in the mailbox returned (read it
        with :meth:`outputs`). :class:`QueueFull` when the choices waiting for a row would pass
        ``max_queue``."""
        if not self.alive():
            raise RuntimeError(f"the engine process has stopped ({self._dead or 'exited'})")
        waiting = max(0, self._in_flight - self.max_rows)
        free = max(0, self.max_rows - self._in_flight)
        if waiting + max(0, len(choices) - free) > self.max_queue:
            raise QueueFull(f"{waiting} choices wait for a row already (--max-queue "
                            f"{self.max_queue})")  # fmt: skip
        box = Mailbox(choices[0].id, asyncio.get_running_loop(), len(choices), stream)
        self._boxes[box.id] = box
        self._in_flight += len(choices)
        self._streams += stream
        self._send(("add", choices))
        return box

    async def outputs(self, box: Mailbox, chunks_per_s: float = 0.0
                      ) -> AsyncIterator[list[Output]]:  # fmt: skip
        """Lists of outputs until every choice has finished: a streamed request's first as soon
        as it comes, then at most one list per ``streams / chunks_per_s`` seconds holding all
        that came meanwhile (each list is one chunk on the wire, and a chunk costs the HTTP side
        far more than a token does: the open streams share ``chunks_per_s``; 0: no limit); the
        end is never held back. A request that is not streamed gets one list, at its end.
        Leaving early (the client went away) aborts the request."""
        loop, sent = box.loop, 0.0
        try:
            while box.open > 0:
                batch = await box.take()
                # an end already taken has set it (no await since): only a later end may wake
                # the wait below
                box.ended.clear()
                due = sent + (self._streams / chunks_per_s if chunks_per_s else 0) - loop.time()
                if due > 0 and not any(out.finish_reason for out in batch):
                    # held until due, or until a choice ends (an end is sent at once: its row
                    # is free, and a client waiting for it sends its next request)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(box.ended.wait(), due)
                    batch += box.take_ready()
                finished = sum(1 for out in batch if out.finish_reason)
                box.open -= finished
                self._in_flight -= finished
                sent = loop.time()
                yield batch
        finally:
            self._boxes.pop(box.id, None)
            self._in_flight -= box.open
            self._streams -= box.stream
            if box.open and self.alive():
                self._send(("abort", box.id))

    async def stats(self) -> dict:
        future = asyncio.get_running_loop().create_future()
        self._stats.append((asyncio.get_running_loop(), future))
        self._send(("stats",))
        return await asyncio.wait_for(future, 30)

    def stop(self) -> None:
        """End the engine: its socket shut down (not only closed: the reader thread's pending
        read holds the socket open, so the engine would see no end of file until the replica
        is killed), then its exit awaited."""
        self._stopping = True
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(self.conn.fileno())) as s:
            s.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def _read(self) -> None:
        """The reader thread: each message from the engine into its request's mailbox."""
        try:
            while True:
                kind, payload = self.conn.recv()
                if kind == "outputs":
                    for out in payload:
                        box = self._boxes.get(out.id)
                        if box is not None:
                            box.post(out)
                elif kind == "stats" and self._stats:
                    loop, future = self._stats.pop(0)
                    loop.call_soon_threadsafe(_resolve, future, payload)
        except (EOFError, OSError) as err:
            self._dead = (
                f"exit status {self.process.poll()}" if isinstance(err, EOFError) else str(err)
            )
            if self._stopping:  # stop() ended it
                return
            log.error("the engine process stopped (%s); failing the requests in flight", self._dead)
            error = f"the engine process stopped ({self._dead})"
            for box in list(self._boxes.values()):
                for index in range(box.choices):
                    box.post(Output(box.id, index, finish_reason="error", error=error))


class Mailbox:
    """One request's outputs between the reader thread, which posts them, and the handler's
    event loop, which takes them. The loop is woken once per batch of posts, not per output:
    for a streamed request when it is not already due to wake, otherwise only at the end; and
    ``ended`` is set at each choice's end, which a stream held to its chunk rate waits for."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, choices: int,
                 stream: bool):  # fmt: skip
        self.id, self.loop, self.choices, self.stream = request_id, loop, choices, stream
        self.open = choices  # choices not yet finished (event loop only)
        self._items: list[Output] = []
        self._lock = threading.Lock()
        self._event = asyncio.Event()
        self.ended = asyncio.Event()  # set when a choice's last output is posted
        self._waking = False
        self._ends = 0  # finished choices posted

    def post(self, out: Output) -> None:  # the reader thread
        with self._lock:
            self._items.append(out)
            self._ends += bool(out.finish_reason)
            wake = (self.stream or self._ends >= self.choices) and not self._waking
            self._waking = self._waking or wake
        if wake:
            self.loop.call_soon_threadsafe(self._wake)
        if out.finish_reason:
            self.loop.call_soon_threadsafe(self.ended.set)

    def _wake(self) -> None:
        with self._lock:
            self._waking = False
        self._event.set()

    async def take(self) -> list[Output]:
        """What has come, waiting for something if nothing has."""
        while True:
            items = self.take_ready()
            if items:
                return items
            await self._event.wait()
            self._event.clear()

    def take_ready(self) -> list[Output]:
        with self._lock:
            items, self._items = self._items, []
        return items


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


# the engine's side
def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the replica's dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main(options: dict) -> None:
    _die_with_parent()
    import torch

    from ..data.tokenizer import load_tokenizer
    from ..inference.generate import load_model
    from ..storage.mirror import local_model
    from .engine import Engine

    conn = Connection(options["fd"])
    torch.set_num_threads(options["threads"])
    where = local_model(options["model"])  # a URI: mirrored once on this replica's node
    model = load_model(where).to(options["device"])
    tokenizer = load_tokenizer(where, quiet=True)
    engine = Engine(model, tokenizer, max_rows=options["max_rows"],
                    max_queue=options["max_queue"] + options["max_rows"],
                    policy=options["policy"], batch_wait_s=options["batch_wait_s"])  # fmt: skip
    config = model.config
    info = {"vocab_size": config.vocab_size, "max_len": config.max_len,
            "device": str(options["device"]), "threads": torch.get_num_threads()}  # fmt: skip
    conn.send(("ready", info))
    try:
        while True:
            _take(conn, engine)
            outputs = _step(engine)
            if outputs:
                conn.send(("outputs", outputs))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the server has gone: so does its engine


def _take(conn: Connection, engine) -> None:
    """Every message waiting; blocks while the engine has nothing to do (a static batch may
    wait for its window)."""
    while True:
        if engine.has_work():
            hint = engine.scheduler.wait_hint()
            timeout = 0 if hint is None else hint
        else:
            timeout = None
        if not conn.poll(timeout):
            return
        kind, *payload = conn.recv()
        if kind == "add":
            _add(engine, payload[0])
        elif kind == "abort":
            engine.abort(payload[0])
        elif kind == "stats":
            from dataclasses import asdict

            scheduler = engine.scheduler
            conn.send(("stats", {**asdict(engine.stats), "running": len(scheduler.running),
                                 "waiting": len(scheduler.waiting)}))  # fmt: skip


def _add(engine, choices: list[Choice]) -> None:
    try:
        requests = [engine.request(c.id, c.prompt, c.sampling, c.index, c.continues_prompt)
                    for c in choices]  # fmt: skip
        engine.submit(requests)
    except (ValueError, QueueFull) as err:  # checked at the door already: a bug if it happens
        log.exception("a request the server accepted was refused by the engine")
        engine.pending_errors.extend(Output(c.id, c.index, finish_reason="error", error=str(err))
                                     for c in choices)  # fmt: skip


def _step(engine) -> list[Output]:
    outputs, engine.pending_errors = list(engine.pending_errors), []
    try:
        return outputs + engine.step()
    except Exception as err:  # the engine's own failure, not a row's: fail what is in flight
        log.exception("an engine step failed; every request in flight fails")
        return outputs + engine.fail_all(err)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="engine: %(levelname)s %(message)s")
    main(json.loads(sys.argv[1]))
