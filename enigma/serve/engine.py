"""The serving engine: one model, its KV slots, and a step that advances every running row.

Each :meth:`Engine.step`:

1. lets go of rows whose requests were aborted (a client that left);
2. admits waiting requests (:mod:`enigma.serve.scheduler`) into free slots
   (:mod:`enigma.serve.kv_cache`);
3. runs one forward over every row, packed one token a batch row: a running row's last token,
   every token of a new prompt, each at its own slot and position (:meth:`SlotCache.packed`);
   new prompts whose gathered keys would pass ``mix_tokens``, or that want their prompt's
   log-probabilities, get a forward of their own first, as a step with no running rows does;
4. samples every row with its own settings in one vectorised pass (:mod:`enigma.serve.sampling`),
   a new row its first token, turns tokens into text and checks stop strings
   (:mod:`enigma.serve.text`);
5. releases finished rows, whose slots the last running rows take.

A failure inside a step (a forward or a sampling that raises) is retried one row at a time, so
it ends only the rows that fail alone; the others go on. Parameters are checked before a
request reaches the engine (:meth:`Sampling.problem`), so this is the last line, not the first.

The engine is synchronous and owns nothing but tensors: ``enigma chat`` and ``enigma generate``
drive it directly (:meth:`generate`), the HTTP server in a process of its own
(:mod:`enigma.serve.engine_process`).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .kv_cache import SlotCache
from .sampling import Draw, Sampler, Sampling
from .scheduler import QueueFull, Request, Scheduler
from .text import TextStream

log = logging.getLogger(__name__)

__all__ = ["Engine", "Output", "QueueFull", "Request"]

MASK63 = (1 << 63) - 1


@dataclass
class Output:
    """What one step did for one choice of a request (``id``, ``index``): new text and tokens
    (with their log-probabilities where asked: ``(token, logprob, [(alternative, logprob),
    ...])``), the prompt's log-probabilities on its first output where asked, and how it ended,
    if it did. Plain data: it crosses from the engine's process to the server's."""

    id: str
    index: int = 0
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple] = field(default_factory=list)
    prompt_logprobs: list[tuple] | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Stats:
    requests: int = 0
    steps: int = 0
    model_calls: int = 0
    prefills: int = 0  # forwards that took new prompts
    mixed: int = 0  # of those, forwards that also decoded running rows
    tokens: int = 0
    largest_batch: int = 0
    aborted: int = 0
    failed: int = 0
    model_s: float = 0.0
    sampling_s: float = 0.0
    step_s: float = 0.0


class Engine:
    def __init__(self, model, tokenizer, *, max_rows: int = 16, max_queue: int = 256,
                 prefill_tokens: int = 4096, mix_tokens: int = 1 << 14,
                 policy: str = "continuous", batch_wait_s: float = 0.02):  # fmt: skip
        self.model, self.tokenizer = model.eval(), tokenizer
        config = model.config
        weights = next(model.parameters())
        self.device = weights.device
        self.vocab, self.eos, self.pad = config.vocab_size, config.eos_token_id, config.pad_token_id
        self.max_len, self.max_rows, self.mix_tokens = config.max_len, max_rows, mix_tokens
        self.cache = SlotCache(config, max_rows, self.device, weights.dtype)
        self.sampler = Sampler(max_rows, self.vocab, self.device, config.max_len)
        self.scheduler = Scheduler(max_rows, max_queue, prefill_tokens, policy, batch_wait_s)
        self.last = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        self.stats = Stats()
        self.pending_errors: list[Output] = []  # choices refused after the door (a bug)
        self.pieces: dict[int, str] = {}  # each token's text alone (see TextStream)

    # requests in and out
    def request(self, request_id: str, prompt: list[int], sampling: Sampling, index: int = 0,
                continues_prompt: bool = True) -> Request:  # fmt: skip
        """A choice ready to submit. Its seed: ``sampling.seed`` spread by the choice's index,
        or a fresh random one. ``continues_prompt``: its text continues the prompt's (a
        completion) rather than starting afresh (a chat reply)."""
        problem = sampling.problem(self.vocab)
        if problem:
            raise ValueError(problem[1])
        if not prompt or min(prompt) < 0 or max(prompt) >= self.vocab:
            raise ValueError(f"a prompt is 1 or more token ids in [0, {self.vocab})")
        if len(prompt) + sampling.max_tokens > self.max_len:
            raise ValueError(
                f"the prompt's {len(prompt)} tokens and max_tokens {sampling.max_tokens} exceed "
                f"the model's {self.max_len}"
            )
        if sampling.seed is None:
            seed = secrets.randbits(63)
        else:
            seed = (sampling.seed + index * 0x9E3779B97F4A7C15) & MASK63
        context = prompt[-1] if continues_prompt else None
        text = TextStream(self.tokenizer, sampling.stop, context, self.pieces)
        return Request(request_id, list(prompt), sampling, seed, text, index)

    def submit(self, requests: list[Request]) -> None:
        """Queue one request's choices together (:class:`QueueFull` refuses them all)."""
        self.scheduler.add(requests)
        self.stats.requests += 1

    def abort(self, request_id: str) -> None:
        """A request's choices stop: waiting ones leave now, running ones at the next step."""
        self.stats.aborted += len(self.scheduler.abort(request_id))

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def generate(self, prompt: list[int], sampling: Sampling, continues_prompt: bool = True
                 ) -> Iterator[Output]:  # fmt: skip
        """One request run to its end alone (``enigma chat``, ``enigma generate``); stopping
        the iteration early (Ctrl-C) aborts it."""
        request = self.request(f"local-{secrets.token_hex(4)}", prompt, sampling,
                               continues_prompt=continues_prompt)  # fmt: skip
        self.submit([request])
        try:
            while True:
                for out in self.step():
                    if out.id == request.id:
                        yield out
                        if out.finish_reason:
                            return
        finally:
            if request.finish_reason is None:
                self.abort(request.id)

    def fail_all(self, err: Exception) -> list[Output]:
        """Every request in flight ends with ``err`` (the engine's own failure, outside any
        row's), and the engine starts clean."""
        scheduler = self.scheduler
        for request in scheduler.running:
            self.sampler.release(request.slot)
        error = f"the engine failed: {type(err).__name__}: {err}"
        outputs = [Output(r.id, r.index, finish_reason="error", error=error)
                   for r in [*scheduler.running, *scheduler.waiting]]  # fmt: skip
        self.stats.failed += len(outputs)
        scheduler.running.clear()
        scheduler.waiting.clear()
        self.cache.drop()
        return outputs

    # the step
    @torch.no_grad()
    def step(self) -> list[Output]:
        started = time.perf_counter()
        scheduler = self.scheduler
        aborted = [r for r in scheduler.running if r.aborted]
        self.stats.aborted += len(aborted)
        self._release(aborted)
        admitted = scheduler.admit()
        decoding = len(scheduler.running) - len(admitted)
        total, outputs = decoding + len(admitted), []
        if admitted and decoding and self._mixes(admitted, decoding):
            outputs += self._guarded(self._forward, 0, total)
        else:
            if admitted:
                outputs += self._guarded(self._forward, decoding, total)
            if decoding:
                outputs += self._guarded(self._forward, 0, decoding)
        self._release([r for r in scheduler.running if r.finish_reason])
        if not self.has_work():
            self.cache.drop()
        self.stats.steps += 1
        self.stats.largest_batch = max(self.stats.largest_batch, decoding + len(admitted))
        self.stats.step_s += time.perf_counter() - started
        return outputs

    def _mixes(self, admitted: list[Request], decoding: int) -> bool:
        """Whether the new prompts join the running rows' forward: when the keys it gathers
        (each token its own slot's, up to the longest row) stay within ``mix_tokens`` token-keys
        per head, and no new row wants its prompt's log-probabilities (those come from a
        prefill of its own, whose logits cover every prompt position)."""
        if any(r.sampling.prompt_logprobs is not None for r in admitted):
            return False
        tokens = decoding + sum(len(r.prompt) for r in admitted)
        running = self.scheduler.running[:decoding]
        span = max(max(r.length for r in running) + 1, max(len(r.prompt) for r in admitted))
        return tokens * span <= self.mix_tokens

    def _guarded(self, run, start: int, stop: int) -> list[Output]:
        """``run(start, stop)``; if it raises, each row alone, and a row that fails alone ends
        with the error (the rest of the step is untouched)."""
        try:
            return run(start, stop)
        except Exception as err:
            if stop - start > 1:
                alone = (self._guarded(run, slot, slot + 1) for slot in range(start, stop))
                return [out for outputs in alone for out in outputs]
            request = self.scheduler.running[start]
            log.exception("request %s failed in a step", request.id)
            request.finish_reason, self.stats.failed = "error", self.stats.failed + 1
            return [Output(request.id, request.index, finish_reason="error",
                           error=f"{type(err).__name__}: {err}")]  # fmt: skip

    def _forward(self, start: int, stop: int) -> list[Output]:
        """One forward and one sampling over slots ``start .. stop - 1``, whatever mix of new
        rows (their prompts) and running rows (their last token) they hold."""
        rows = self.scheduler.running[start:stop]
        new = [not r.generated for r in rows]
        for r, fresh in zip(rows, new, strict=True):
            if fresh:
                self.sampler.assign(r.slot, r.sampling, r.seed, r.prompt)
        prompt_logprobs = [None] * len(rows)
        if not any(new):
            logits, lengths = self._decode(start, stop, rows), None
        elif all(new):
            logits, lengths, prompt_logprobs = self._prefill(start, stop, rows)
        else:
            logits, lengths = self._packed(start, stop, rows, new)
        draw, tokens = self._sample(logits, start, stop)
        self.cache.advance(lengths)
        self.last[start:stop] = tokens
        if any(new):
            self.stats.prefills += 1
            self.stats.mixed += not all(new)
        return [self._emit(r, draw, i, prompt_logprobs[i]) for i, r in enumerate(rows)]

    def _decode(self, start: int, stop: int, rows: list[Request]) -> torch.Tensor:
        """Running rows alone: each row's last token at its own length."""
        self.cache.decode(start, stop, max(r.length for r in rows) + 1)
        clock = time.perf_counter()
        out = self.model(self.last[start:stop, None], cache=self.cache,
                         position_ids=self.cache.positions())  # fmt: skip
        self._count_model(clock)
        return out.logits[:, -1]

    def _prefill(self, start: int, stop: int, rows: list[Request]):
        """New rows alone: their prompts right-padded together, each attending to its own (and
        every prompt position's logits kept when a row wants its prompt's log-probabilities)."""
        echo = any(r.sampling.prompt_logprobs is not None for r in rows)
        width = max(len(r.prompt) for r in rows)
        ids = torch.tensor([r.prompt + [self.pad] * (width - len(r.prompt)) for r in rows],
                           device=self.device)  # fmt: skip
        ends = torch.tensor([len(r.prompt) - 1 for r in rows], device=self.device)
        self.cache.prefill(start, stop, width)
        clock = time.perf_counter()
        out = self.model(ids, cache=self.cache, position_ids=self.cache.positions(),
                         logits_to_keep=0 if echo else ends)  # fmt: skip
        logits = out.logits[torch.arange(len(rows), device=self.device), ends] if echo else (
            out.logits[:, 0])  # fmt: skip
        self._count_model(clock)
        prompt_logprobs = self._prompt_logprobs(out.logits, rows) if echo else [None] * len(rows)
        return logits, [len(r.prompt) for r in rows], prompt_logprobs

    def _packed(self, start: int, stop: int, rows: list[Request], new: list[bool]):
        """New and running rows together, one token a batch row: a running row's last token,
        every token of a new prompt; the head only at each row's last token. No logits for
        prompt positions: :meth:`_mixes` keeps rows that want them out."""
        ids, slots, positions, last, running, running_slots = [], [], [], [], [], []
        for r, fresh in zip(rows, new, strict=True):
            assert not (fresh and r.sampling.prompt_logprobs is not None)
            if fresh:
                ids += r.prompt
                positions += range(len(r.prompt))
            else:
                running.append(len(ids))
                running_slots.append(r.slot)
                ids.append(self.pad)  # its last token, filled in on the device below
                positions.append(r.length)
            slots += [r.slot] * (len(ids) - len(slots))
            last.append(len(ids) - 1)
        feed = torch.tensor(ids, device=self.device)
        # the running rows' last tokens stay on the device (not read back)
        feed[torch.tensor(running, device=self.device)] = self.last[
            torch.tensor(running_slots, device=self.device)
        ]
        self.cache.packed(start, stop, slots, positions)
        clock = time.perf_counter()
        out = self.model(feed[:, None], cache=self.cache, position_ids=self.cache.positions(),
                         rows_to_keep=torch.tensor(last, device=self.device))  # fmt: skip
        self._count_model(clock)
        return out.logits[:, -1], [positions[i] + 1 for i in last]

    def _count_model(self, clock: float) -> None:
        self.stats.model_calls += 1
        self.stats.model_s += time.perf_counter() - clock

    def _sample(self, logits: torch.Tensor, start: int, stop: int) -> tuple[Draw, torch.Tensor]:
        clock = time.perf_counter()
        draw = self.sampler.choose(logits, start, stop)
        self.stats.sampling_s += time.perf_counter() - clock
        return draw, draw.tensor

    def _prompt_logprobs(self, logits: torch.Tensor, rows: list[Request]) -> list:
        """Each echoing row's prompt tokens with their log-probabilities (the first has none):
        ``(token, logprob, [(alternative, logprob), ...])``."""
        found = []
        for i, r in enumerate(rows):
            want = r.sampling.prompt_logprobs
            if want is None:
                found.append(None)
                continue
            n = len(r.prompt)
            lp = torch.log_softmax(logits[i, : n - 1].float(), -1)
            targets = torch.tensor(r.prompt[1:], device=self.device)
            chosen = lp.gather(1, targets[:, None]).squeeze(1).tolist()
            values, alternatives = lp.topk(want, -1) if want else (lp[:, :0], lp[:, :0].long())
            values, alternatives = values.tolist(), alternatives.tolist()
            entries = [(r.prompt[0], None, [])]
            for j in range(n - 1):
                top = list(zip(alternatives[j], values[j], strict=True))
                entries.append((r.prompt[j + 1], chosen[j], top))
            found.append(entries)
        return found

    def _emit(self, r: Request, draw: Draw, i: int, prompt_logprobs=None) -> Output:
        """The row's new token turned into its output; the step's tensors are already
        advanced, so a failure here ends this row alone and is not retried."""
        try:
            return self._output(r, draw, i, prompt_logprobs)
        except Exception as err:
            log.exception("request %s failed reading its token", r.id)
            r.finish_reason, self.stats.failed = "error", self.stats.failed + 1
            return Output(
                r.id, r.index, finish_reason="error", error=f"{type(err).__name__}: {err}"
            )

    def _output(self, r: Request, draw: Draw, i: int, prompt_logprobs) -> Output:
        out = Output(r.id, r.index, prompt_logprobs=prompt_logprobs)
        if r.sampling.max_tokens == 0:  # the prompt scored, nothing generated
            r.finish_reason = out.finish_reason = "length"
            return out
        token = draw.tokens[i]
        r.generated.append(token)
        out.tokens.append(token)
        self.stats.tokens += 1
        if r.sampling.logprobs is not None:
            out.logprobs.append((token, draw.logprobs[i], list(zip(*draw.top[i], strict=True))))
        if token == self.eos:
            r.finish_reason = "stop"
        else:
            out.text = r.text.add(token)
            if r.text.stopped:
                r.finish_reason = "stop"
            elif len(r.generated) >= r.sampling.max_tokens:
                r.finish_reason = "length"
        if r.finish_reason:
            out.text += r.text.finish()
            out.finish_reason = r.finish_reason
        return out

    def _release(self, leaving: list[Request]) -> None:
        if not leaving:
            return
        for request in leaving:
            self.sampler.release(request.slot)
        for source, target, mover in self.scheduler.release(leaving):
            self.cache.move(source, target, mover.length)
            self.sampler.move(source, target)
            self.last[target] = self.last[source]
