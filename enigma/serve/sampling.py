"""How each row picks its next token: one request's settings (:class:`Sampling`), and the
:class:`Sampler` that applies every row's own settings in one vectorised pass per step.

The sampler keeps each slot's settings as device tensors, written once when a request takes the
slot, so a step builds nothing from Python lists. Per step, by row:

- penalties (repetition on the prompt's and the reply's tokens, presence and frequency on the
  reply's, a logit bias) only when some row asks for them;
- greedy rows (temperature 0) take the argmax, with no random draw and no sort;
- rows that sample the whole vocabulary draw by inverse CDF: a softmax into a buffer the sampler
  keeps, then a two-level search (the blocks' sums, then the tokens of one block; no sort);
- top-p rows draw the same way and keep a draw inside the nucleus (rejection: no sort);
- top-k rows sort only their ``top_k`` candidates (``torch.topk``), top-p then among those.

Each row's random number is a hash of its own seed and how many tokens it has drawn, not a draw
from a shared generator: a request with a seed gets the same text whatever shares its steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """One completion's settings: the OpenAI parameters, plus ``top_k`` and
    ``repetition_penalty`` (as in transformers and vLLM). ``logprobs``: how many alternatives to
    report beside each generated token's own log-probability (None: none at all);
    ``prompt_logprobs`` likewise for the prompt's tokens (``echo``)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = field(default=())

    def problem(self, vocab_size: int) -> tuple[str, str] | None:
        """``(parameter, what is wrong)`` for a setting no row may sample with, else None.
        Every number must be finite: a NaN passes every comparison and would poison a step."""
        ranges = {
            "temperature": (self.temperature, 0.0, 2.0),
            "top_p": (self.top_p, 0.0, 1.0),
            "repetition_penalty": (self.repetition_penalty, 0.01, 10.0),
            "presence_penalty": (self.presence_penalty, -2.0, 2.0),
            "frequency_penalty": (self.frequency_penalty, -2.0, 2.0),
        }
        for name, (value, low, high) in ranges.items():
            if not math.isfinite(value) or not low <= value <= high:
                return name, f"'{name}' must be a finite number in [{low:g}, {high:g}], got {value}"
        if self.top_p == 0:
            return "top_p", "'top_p' must be in (0, 1]: 0 would keep no token"
        if not 0 <= self.top_k <= vocab_size:
            return (
                "top_k",
                f"'top_k' must be 0 (off) to the vocabulary's {vocab_size}, got {self.top_k}",
            )
        if self.max_tokens < 0:
            return "max_tokens", f"'max_tokens' must not be negative, got {self.max_tokens}"
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 20:
                return name, f"'{name}' must be 0 to 20, got {value}"
        for token, bias in self.logit_bias:
            if not 0 <= token < vocab_size or not math.isfinite(bias) or abs(bias) > 100:
                return "logit_bias", (f"'logit_bias' maps token ids in [0, {vocab_size}) to "
                                      f"numbers in [-100, 100]; got {token}: {bias}")  # fmt: skip
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Draw:
    """What one step chose: the token of each row, and where asked, its log-probability and the
    most likely alternatives (``top`` as ``(ids, log-probabilities)`` per row, or None)."""

    tokens: list[int]
    logprobs: list[float | None]
    top: list[tuple[list[int], list[float]] | None]
    tensor: Tensor  # the tokens where the model runs (the next decode's input)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on unsigned 64-bit integers (numpy wraps them modulo
    2**64, which the mix relies on): every input bit reaches every output bit."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(seed: np.ndarray, counter: np.ndarray) -> np.ndarray:
    """A number in (0, 1) for each row, a function of its seed and its counter alone
    (float64). Computed on the host: a few operations on a few numbers, where the device would
    launch a kernel for each."""
    h = _splitmix64(seed ^ _splitmix64(counter))
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


class Sampler:
    """The sampling state of ``rows`` slots. :meth:`assign` writes a request's settings into its
    slot, :meth:`move` copies a slot into another (the engine keeps running rows packed at the
    front), :meth:`choose` samples a range of slots."""

    def __init__(self, rows: int, vocab_size: int, device: torch.device, max_len: int = 2048):
        self.rows, self.vocab, self.device, self.max_len = rows, vocab_size, device, max_len
        f32 = dict(dtype=torch.float32, device=device)
        # each row's temperature as the divisor of its logits: a column, greedy rows' 0 raised
        # to a number that divides (they take the argmax, which no divisor changes)
        self.temperature = torch.ones(rows, 1, **f32)
        self.top_p = torch.ones(rows, **f32)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)
        self.repetition = torch.ones(rows, **f32)
        self.presence = torch.zeros(rows, **f32)
        self.frequency = torch.zeros(rows, **f32)
        # each row's seed and how many numbers it has drawn, on the host (see uniform)
        self.seed = np.zeros(rows, dtype=np.uint64)
        self.drawn = np.zeros(rows, dtype=np.uint64)
        self.settings: list[Sampling | None] = [None] * rows
        # made the first time a row needs one:
        # each row's prompt and reply tokens (rows, max_len), the rest filled with its first
        # token: the penalties touch only these entries of the logits, not the vocabulary
        self.history: Tensor | None = None
        self.filled = torch.zeros(rows, dtype=torch.long, device=device)
        self.counts: Tensor | None = None  # (rows, vocab) reply tokens, presence and frequency
        self.bias: Tensor | None = None  # (rows, vocab) logit_bias
        self._plans: dict[tuple[int, int], _Plan] = {}  # cleared when a slot changes hands
        # A step's scaled logits and probabilities are written into these, not fresh tensors
        # (a new (rows, vocab) tensor is cold in the cache: the softmax writing one took half
        # as long again). Padded to whole blocks of the search: the scaled logits' padding
        # is -inf, so the probabilities' is 0.
        width = -(-vocab_size // BLOCK) * BLOCK
        self._scaled = torch.full((rows, width), -math.inf, **f32)
        self._probs = torch.zeros(rows, width, **f32)

    def assign(self, slot: int, settings: Sampling, seed: int, prompt: list[int]) -> None:
        """Slot ``slot`` now samples for a request: its settings, its seed (``0 <= seed <
        2**63``) and its prompt (whose tokens the repetition penalty counts as seen)."""
        self.settings[slot] = settings
        self.temperature[slot] = max(settings.temperature, 1e-5)
        self.top_p[slot] = settings.top_p
        self.top_k[slot] = settings.top_k
        self.repetition[slot] = settings.repetition_penalty
        self.presence[slot] = settings.presence_penalty
        self.frequency[slot] = settings.frequency_penalty
        self.seed[slot], self.drawn[slot] = seed, 0
        counted = settings.presence_penalty or settings.frequency_penalty
        if counted or settings.repetition_penalty != 1 or self.history is not None:
            if self.history is None:
                self.history = torch.zeros(self.rows, self.max_len, dtype=torch.long,
                                           device=self.device)  # fmt: skip
            self.history[slot] = prompt[0]
            self.history[slot, : len(prompt)] = torch.tensor(prompt, device=self.device)
            self.filled[slot] = len(prompt)
        if counted or self.counts is not None:
            self.counts = self._table(self.counts, torch.int32)
            self.counts[slot] = 0
        if settings.logit_bias or self.bias is not None:
            self.bias = self._table(self.bias, torch.float32)
            self.bias[slot] = 0
            for token, value in settings.logit_bias:
                self.bias[slot, token] = value
        self._plans.clear()

    def _table(self, table: Tensor | None, dtype: torch.dtype) -> Tensor:
        if table is None:
            table = torch.zeros(self.rows, self.vocab, dtype=dtype, device=self.device)
        return table

    def move(self, source: int, target: int) -> None:
        for t in (self.temperature, self.top_p, self.top_k, self.repetition, self.presence,
                  self.frequency, self.seed, self.drawn, self.history, self.filled, self.counts,
                  self.bias):  # fmt: skip
            if t is not None:
                t[target] = t[source]
        self.settings[target] = self.settings[source]
        self.release(source)

    def release(self, slot: int) -> None:
        self.settings[slot] = None
        self._plans.clear()

    def plan(self, start: int, stop: int) -> _Plan:
        key = (start, stop)
        if key not in self._plans:
            self._plans[key] = _Plan.of(self.settings[start:stop], self.device)
        return self._plans[key]

    @torch.no_grad()
    def choose(self, logits: Tensor, start: int, stop: int) -> Draw:
        """The next token of slots ``start .. stop - 1`` from their logits ``(stop - start, V)``
        (``V`` the vocabulary: the sampler's buffers are that wide);
        their counters and penalty tables advance, only if every row's draw succeeds: a row
        that fails leaves the others' random streams where they were, so when the engine
        retries them alone they draw what they would have drawn."""
        plan = self.plan(start, stop)
        rows = slice(start, stop)
        drawn = self.drawn[rows].copy()
        try:
            raw = logits if logits.dtype == torch.float32 else logits.float()
            x = self._penalised(raw, rows, plan)
            tokens = None  # made only when two groups share the rows
            temperature = self.temperature[rows]
            paths = ((plan.greedy, None), (plan.whole, self._whole),
                     (plan.nucleus, self._nucleus), (plan.top_k, self._top_k))  # fmt: skip
            for group, draw in paths:
                if group is None:
                    continue
                if draw is None:  # greedy: the argmax, no random number
                    chosen = group.take(x).argmax(-1)
                else:
                    n = len(group.host)
                    torch.div(group.take(x), group.take(temperature),
                              out=self._scaled[:n, : self.vocab])  # fmt: skip
                    chosen = draw(self._scaled[:n], group, start)
                if group.index is None:  # every row
                    tokens = chosen
                else:
                    if tokens is None:
                        tokens = torch.empty(stop - start, dtype=torch.long, device=self.device)
                    group.put(tokens, chosen)
            found = self._draw(raw, tokens, plan)
        except Exception:
            self.drawn[rows] = drawn
            raise
        self._count(tokens, rows)
        return found

    def _uniform(self, group: Rows, start: int) -> Tensor:
        """The group's rows' next random numbers, a column; their counters advance."""
        slots = group.host + start
        u = uniform(self.seed[slots], self.drawn[slots])
        self.drawn[slots] += np.uint64(1)
        u = torch.from_numpy(u)[:, None]
        return u if self.device.type == "cpu" else u.to(self.device, non_blocking=True)

    def _whole(self, scaled: Tensor, group: Rows, start: int) -> Tensor:
        """Inverse CDF over the whole vocabulary: no sort."""
        probs = torch.softmax(scaled, -1, out=self._probs[: len(scaled)])
        return _search(probs, self._uniform(group, start))

    def _nucleus(self, scaled: Tensor, group: Rows, start: int) -> Tensor:
        """Top-p without a sort, by rejection: draw from the whole distribution and keep the
        token if the tokens more likely than it hold less than ``top_p`` of the mass (the test
        a sorted cumulative sum makes); a kept draw is a draw from the nucleus renormalised.
        About 1 / top_p draws per row; a row still drawing after :data:`ROUNDS` sorts."""
        probs = torch.softmax(scaled, -1)
        top_p = group.take(self.top_p[start:])[:, None]
        chosen = torch.zeros(len(probs), dtype=torch.long, device=self.device)
        drawing = Rows.all(len(probs), self.device)  # of the group's rows, those still drawing
        for _ in range(ROUNDS):
            p = drawing.take(probs)
            picked = _search(p, self._uniform(group.sub(drawing, self.device), start))
            above = (p * (p > p.gather(1, picked[:, None]))).sum(-1)
            kept = (above < drawing.take(top_p).squeeze(1)).cpu().numpy()  # the round's read
            if kept.any():
                chosen_now = picked[torch.from_numpy(kept).to(self.device)]
                drawing.subset(kept, self.device).put(chosen, chosen_now)
            if kept.all():
                return chosen
            drawing = drawing.subset(~kept, self.device)
        p, order = drawing.take(probs).sort(-1, descending=True)
        keep = (p.cumsum(-1) - p) < drawing.take(top_p)
        drawn = self._uniform(group.sub(drawing, self.device), start)
        picked = _search(p.masked_fill(~keep, 0), drawn)
        drawing.put(chosen, order.gather(1, picked[:, None]).squeeze(1))
        return chosen

    def _top_k(self, scaled: Tensor, group: Rows, start: int) -> Tensor:
        """Top-k (then top-p among those k, as transformers and vLLM order them): only the
        candidates are sorted."""
        top_k = group.take(self.top_k[start:])
        top_p = group.take(self.top_p[start:])
        width = int(top_k.max())
        values, ids = scaled.topk(width, dim=-1)
        keep = torch.arange(width, device=self.device)[None] < top_k[:, None]
        probs = torch.softmax(values.masked_fill(~keep, -math.inf), -1)
        keep &= (probs.cumsum(-1) - probs) < top_p[:, None]  # the first candidate always stays
        picked = _search(probs.masked_fill(~keep, 0), self._uniform(group, start))
        return ids.gather(1, picked[:, None]).squeeze(1)

    def _penalised(self, x: Tensor, rows: slice, plan: _Plan) -> Tensor:
        if plan.bias:
            x = x + self.bias[rows]
        if not (plan.repetition or plan.counts):
            return x
        # Only the tokens a row has seen change: gather them, penalise, scatter back (a token
        # seen twice gets the same value twice).
        seen = self.history[rows]
        values = x.gather(1, seen)
        if plan.repetition:
            penalty = self.repetition[rows, None]
            values = torch.where(values > 0, values / penalty, values * penalty)
        if plan.counts:
            counts = self.counts[rows].gather(1, seen)
            values = values - self.frequency[rows, None] * counts
            values = values - self.presence[rows, None] * (counts > 0)
        return x.scatter(1, seen, values)

    def _count(self, tokens: Tensor, rows: slice) -> None:
        if self.history is not None:
            at = self.filled[rows].clamp(max=self.max_len - 1)[:, None]
            self.history[rows].scatter_(1, at, tokens[:, None])
            self.filled[rows] += 1
        if self.counts is not None:
            ones = torch.ones_like(tokens[:, None], dtype=self.counts.dtype)
            self.counts[rows].scatter_add_(1, tokens[:, None], ones)

    def _draw(self, raw: Tensor, tokens: Tensor, plan: _Plan) -> Draw:
        ids = tokens.tolist()  # the step's read back to the host
        n = len(ids)
        logprobs: list[float | None] = [None] * n
        top: list = [None] * n
        if plan.logprobs is not None:
            index, most = plan.logprobs
            lp = torch.log_softmax(raw[index], -1)
            chosen = lp.gather(1, tokens[index][:, None]).squeeze(1).tolist()
            values, alt = lp.topk(most, -1) if most else (lp[:, :0], lp[:, :0].long())
            values, alt = values.tolist(), alt.tolist()
            for j, row in enumerate(index.tolist()):
                want = plan.wanted[row]
                logprobs[row] = chosen[j]
                top[row] = (alt[j][:want], values[j][:want])
        return Draw(ids, logprobs, top, tokens)


ROUNDS = 4


@dataclass(frozen=True)
class Rows:
    """Some rows of a slot range: their indices on the host, and on the device unless they are
    every row (``index`` None: no gather, no scatter)."""

    host: np.ndarray
    index: Tensor | None

    @classmethod
    def all(cls, n: int, device) -> Rows:
        return cls(np.arange(n), None)

    @classmethod
    def of(cls, host, n: int, device) -> Rows | None:
        host = np.asarray(host, dtype=np.int64)
        if not len(host):
            return None
        if len(host) == n:
            return cls.all(n, device)
        return cls(host, torch.from_numpy(host).to(device))

    def take(self, t: Tensor) -> Tensor:
        return t[: len(self.host)] if self.index is None else t[self.index]

    def put(self, t: Tensor, values: Tensor) -> None:
        if self.index is None:
            t[: len(self.host)] = values
        else:
            t[self.index] = values

    def subset(self, mask: np.ndarray, device) -> Rows:
        """Those of these rows where ``mask`` (one entry per row) holds."""
        if self.index is None and mask.all():
            return self
        host = self.host[mask]
        return Rows(host, torch.from_numpy(host).to(device))

    def sub(self, inner: Rows, device) -> Rows:
        """``inner``, given as rows of this group, as rows of the group's own range."""
        if self.index is None:
            return inner
        host = self.host[inner.host]
        return Rows(host, torch.from_numpy(host).to(device))


@dataclass
class _Plan:
    """Which rows of a slot range take which path (each a :class:`Rows`, or None for none),
    made when the range's requests change, not every step."""

    greedy: Rows | None
    whole: Rows | None
    nucleus: Rows | None
    top_k: Rows | None
    repetition: bool
    counts: bool
    bias: bool
    logprobs: tuple[Tensor, int] | None
    wanted: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, settings: list[Sampling | None], device) -> _Plan:
        live = [s or Sampling(temperature=0) for s in settings]

        def rows(keep) -> Rows | None:
            return Rows.of([i for i, s in enumerate(live) if keep(s)], len(live), device)

        asked = [i for i, s in enumerate(live) if s.logprobs is not None]
        return cls(
            greedy=rows(lambda s: s.greedy),
            whole=rows(lambda s: not s.greedy and not s.top_k and s.top_p == 1),
            nucleus=rows(lambda s: not s.greedy and not s.top_k and s.top_p < 1),
            top_k=rows(lambda s: not s.greedy and s.top_k > 0),
            repetition=any(s.repetition_penalty != 1 for s in live),
            counts=any(s.presence_penalty or s.frequency_penalty for s in live),
            bias=any(s.logit_bias for s in live),
            logprobs=(torch.tensor(asked, device=device), max(live[i].logprobs for i in asked))
            if asked else None,
            wanted=[s.logprobs or 0 for s in live],
        )  # fmt: skip


BLOCK = 128  # tokens per block of the two-level search
BELOW = 1 - 2.0**-22  # times a positive fp32 sum: a target a few roundings below it


def _search(weights: Tensor, u: Tensor) -> Tensor:
    """Inverse CDF: in each row of non-negative ``weights`` (unnormalised), the index where the
    running sum first exceeds ``u`` (a column: a number in (0, 1) a row) times the row's
    total. In two levels, so that no running sum over the whole vocabulary is made (a
    sequential pass, the slowest of a step's sampling): the block of :data:`BLOCK` tokens from
    the blocks' sums, then the token inside it. Each target is kept inside ``[0, sum)`` of what
    it searches, so rounding never lands on a token (or a block) of weight 0. A token's chance
    is its weight over the total, up to fp32 rounding of the sums. Rows as wide as whole blocks
    (the sampler's buffers) are searched as they are; others are padded with zeros."""
    n, width = weights.shape
    if width % BLOCK:
        weights = torch.nn.functional.pad(weights, (0, BLOCK - width % BLOCK))
    blocks = weights.view(n, -1, BLOCK)
    sums = blocks.sum(-1)
    running = sums.cumsum(-1)
    total = running[:, -1:]
    target = torch.minimum(u.to(total.dtype) * total, total * BELOW)
    block = torch.searchsorted(running, target, right=True)
    target -= (running - sums).gather(1, block)  # less the weight of the blocks before it
    block = block.squeeze(1)
    inside = blocks[torch.arange(n, device=weights.device), block].cumsum(-1)
    target = torch.minimum(target.clamp_(min=0), inside[:, -1:] * BELOW)
    return block * BLOCK + torch.searchsorted(inside, target, right=True).squeeze(1)
