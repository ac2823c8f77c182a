"""Which requests run in the engine's next step (iteration-level scheduling).

Requests wait in arrival order (at most ``max_queue``: past that a new one is refused at once,
never left to wait without bound). Before each step the scheduler admits waiting requests while
a slot is free and the step's prefill stays within ``prefill_tokens`` (at least one request
whatever its length), so a long prompt cannot stall the rows already decoding for long. A
finished or aborted request leaves at the end of its step, and its slot is taken by the last
running row, so the running rows stay packed in slots ``0 .. R - 1``.

``policy="static"`` is the batching this engine replaced, kept to measure against: nothing is
admitted while any row runs, and an idle engine waits up to ``batch_wait_s`` for a full batch.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .sampling import Sampling
from .text import TextStream


class QueueFull(Exception):
    """The engine's queue holds ``max_queue`` requests already."""


@dataclass(eq=False)
class Request:
    """One completion (a choice) as the engine runs it."""

    id: str
    prompt: list[int]
    sampling: Sampling
    seed: int
    text: TextStream
    index: int = 0  # the choice's index in its answer
    arrival: float = field(default_factory=time.monotonic)
    slot: int | None = None
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    aborted: bool = False

    @property
    def length(self) -> int:
        """Tokens in its KV slot: the prompt and every generated token fed back so far."""
        return len(self.prompt) + max(0, len(self.generated) - 1)


class Scheduler:
    def __init__(self, max_rows: int, max_queue: int, prefill_tokens: int = 4096,
                 policy: str = "continuous", batch_wait_s: float = 0.02):  # fmt: skip
        if policy not in ("continuous", "static"):
            raise ValueError(f"policy must be continuous or static, got {policy!r}")
        self.max_rows, self.max_queue = max_rows, max_queue
        self.prefill_tokens, self.policy, self.batch_wait_s = prefill_tokens, policy, batch_wait_s
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # index = slot

    def add(self, requests: list[Request]) -> None:
        """Queue a request's choices together, or refuse them all (:class:`QueueFull`)."""
        if len(self.waiting) + len(requests) > self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests wait already (--max-queue "
                            f"{self.max_queue})")  # fmt: skip
        self.waiting.extend(requests)

    def abort(self, request_id: str) -> list[Request]:
        """Mark a request's choices aborted; those still waiting leave now (returned)."""
        gone = [r for r in self.waiting if r.id == request_id]
        for r in gone:
            self.waiting.remove(r)
            r.aborted = True
        for r in self.running:
            if r.id == request_id:
                r.aborted = True
        return gone

    def admit(self) -> list[Request]:
        """The waiting requests that join at this step, their slots assigned."""
        free = self.max_rows - len(self.running)
        if not self.waiting or free <= 0:
            return []
        if self.policy == "static":
            if self.running:
                return []
            full = len(self.waiting) >= self.max_rows
            if not full and time.monotonic() - self.waiting[0].arrival < self.batch_wait_s:
                return []
        admitted, budget = [], self.prefill_tokens
        while self.waiting and len(admitted) < free:
            cost = len(self.waiting[0].prompt)
            if admitted and cost > budget:
                break
            request = self.waiting.popleft()
            request.slot = len(self.running)
            self.running.append(request)
            admitted.append(request)
            budget -= cost
        return admitted

    def wait_hint(self) -> float | None:
        """Seconds an idle static engine may sleep before its batch is due (None: no wait)."""
        if self.policy != "static" or self.running or not self.waiting:
            return None
        return max(0.0, self.batch_wait_s - (time.monotonic() - self.waiting[0].arrival))

    def release(self, leaving: list[Request]) -> list[tuple[int, int, Request]]:
        """Take finished requests out; returns the slot moves ``(from, to, request moved)``
        that keep the running rows packed, in the order to apply them."""
        moves = []
        for request in sorted(leaving, key=lambda r: r.slot, reverse=True):
            slot, last = request.slot, len(self.running) - 1
            if slot != last:
                mover = self.running[last]
                self.running[slot], mover.slot = mover, slot
                moves.append((last, slot, mover))
            self.running.pop()
            request.slot = None
        return moves
