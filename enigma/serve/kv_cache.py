"""The engine's KV memory: a fixed number of slots, each row of the batch its own length.

transformers' ``DynamicCache`` holds one length for the whole batch, so a row that joins late
would need left padding up to the others' length and every step would copy the cache to grow
it. Here each layer's keys and values live in ``(slots, heads, capacity, head_dim)`` buffers;
slot ``s`` holds one request's tokens from index 0, and its length says how many are real.

- **Prefill** writes a group of new rows' prompts (right-padded together: with causal attention
  the padding after a prompt changes nothing before it) into their slots.
- **Decode** writes each running row's new token at its own length and attends over
  ``0 .. length``; the bias the cache hands the model (:meth:`attention_plan`) carries each
  row's own ALiBi distances and hides the slots past its end, so a row's logits are those it
  gets alone whatever it shares the step with.
- **Packed** (:meth:`packed`): new prompts and running rows in one forward with one token a
  batch row (a running row's last token, every token of a new prompt), each written at its own
  slot and position; a token attends over its own slot's keys up to itself, a copy gathered
  per token, so no padding is computed and a step that admits rows costs one forward.

The running rows are kept packed in slots ``0 .. R - 1`` (:meth:`move` fills a leaving row's slot
with the last one), so a decode step attends over a view of the buffers, never a gathered copy
(only a packed step gathers, each token its own slot's keys). The
buffers grow (by doubling) to the longest row admitted, and are dropped when the engine idles.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.attention import alibi_slopes, attention_bias


class SlotCache:
    """What the model's attention layers call (``update``, ``get_seq_length``), plus the
    bias of the current forward (``attention_plan``), which :class:`~enigma.models.lm.EnigmaLM`
    takes from a cache that has one."""

    def __init__(self, config, slots: int, device: torch.device, dtype: torch.dtype):
        self.layers, self.heads = config.num_transformer_layers, config.num_heads
        self.head_dim = config.d // config.num_heads
        self.use_alibi, self.slots = config.use_alibi, slots
        self.device, self.dtype = device, dtype
        self.capacity = 0
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.slopes = alibi_slopes(self.heads, device)
        self._rows = slice(0, 0)
        self._width = 0  # new tokens per row in this forward
        self._span = 0  # key slots attended (0: a prefill, which reads none back)
        self._starts = self.lengths[:0]  # where each batch row's new tokens go
        self._slots: Tensor | None = None  # a packed forward's slot for each batch row

    def reserve(self, tokens: int) -> None:
        """Room for rows of ``tokens`` tokens; growing copies what is there."""
        if tokens <= self.capacity:
            return
        capacity = max(64, 1 << (tokens - 1).bit_length())
        shape = (self.slots, self.heads, capacity, self.head_dim)
        keys, values = [], []
        for layer in range(self.layers):
            # zeros, not empty: a masked slot's weight is 0, and 0 * NaN would still be NaN
            k, v = (torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(2))
            if self.capacity:
                k[:, :, : self.capacity] = self.keys[layer]
                v[:, :, : self.capacity] = self.values[layer]
            keys.append(k)
            values.append(v)
        self.keys, self.values, self.capacity = keys, values, capacity

    def drop(self) -> None:
        """Free the buffers (the engine is idle); the next :meth:`reserve` makes them anew."""
        self.keys, self.values, self.capacity = [], [], 0
        self.lengths.zero_()

    # the forward being prepared
    def prefill(self, start: int, stop: int, width: int) -> None:
        """The next forward writes ``width`` tokens from index 0 of slots ``start .. stop - 1``
        (new rows only: they attend to their own tokens, never read back from the buffers)."""
        self.reserve(width)
        self._rows, self._width, self._span, self._slots = slice(start, stop), width, 0, None

    def decode(self, start: int, stop: int, span: int) -> None:
        """The next forward writes one token at each row's length in slots ``start .. stop -
        1``; ``span`` is one past the longest of them (the host knows it without a sync)."""
        self.reserve(span)
        self._rows, self._width, self._span = slice(start, stop), 1, span
        self._starts, self._slots = self.lengths[self._rows], None

    def packed(self, start: int, stop: int, slots: list[int], positions: list[int]) -> None:
        """The next forward is one token a batch row: token ``t`` is written into slot
        ``slots[t]`` at ``positions[t]`` (rows ``start .. stop - 1`` are the slots it
        touches)."""
        span = max(positions) + 1
        self.reserve(span)
        self._rows, self._width, self._span = slice(start, stop), 1, span
        self._slots = torch.tensor(slots, device=self.device)
        self._starts = torch.tensor(positions, device=self.device)

    def positions(self) -> Tensor:
        """The new tokens' positions, ``(batch, width)``: a row's own token count."""
        steps = torch.arange(self._width, device=self.device)[None]
        return self._starts[:, None] + steps if self._span else steps

    def attention_plan(self, dtype: torch.dtype) -> tuple[Tensor | None, bool]:
        """``(bias, is_causal)`` for this forward's attention."""
        if not self._span:  # a prefill: each row alone from position 0
            return attention_bias(self.heads, 0, self._width, self.use_alibi, None, self.device,
                                  dtype)  # fmt: skip
        keys = torch.arange(self._span, device=self.device)
        distance = self.positions()[:, :, None] - keys  # (batch, width, span)
        future = (distance < 0)[:, None]
        if self.use_alibi:
            bias = -self.slopes[None, :, None, None] * distance.clamp(min=0)[:, None]
        else:
            bias = torch.zeros(future.shape, device=self.device)
        return bias.to(dtype).masked_fill(future, float("-inf")), False

    def advance(self, lengths: list[int] | None = None) -> None:
        """The forward ran: a decode's rows grow by one token; otherwise each row's length is
        set to ``lengths`` (its real tokens: a prefill's padding written after them is hidden
        and overwritten later)."""
        if lengths is None:
            self.lengths[self._rows] += 1
        else:
            self.lengths[self._rows] = torch.tensor(lengths, device=self.device)

    def move(self, source: int, target: int, length: int) -> None:
        """Slot ``source``'s first ``length`` tokens into slot ``target``."""
        for buffers in (self.keys, self.values):
            for b in buffers:
                b[target, :, :length] = b[source, :, :length]
        self.lengths[target] = self.lengths[source]
        self.lengths[source] = 0

    # what the attention layers call
    def update(self, k: Tensor, v: Tensor, layer_idx: int) -> tuple[Tensor, Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows = self._rows
        if not self._span:
            keys[rows, :, : self._width] = k
            values[rows, :, : self._width] = v
            return k, v
        if self._slots is not None:  # packed: each token at its own slot and position
            keys[self._slots, :, self._starts] = k[:, :, 0]
            values[self._slots, :, self._starts] = v[:, :, 0]
            return keys[self._slots, :, : self._span], values[self._slots, :, : self._span]
        index = torch.arange(rows.start, rows.stop, device=self.device)
        at = self._starts
        keys[index, :, at] = k[:, :, 0]
        values[index, :, at] = v[:, :, 0]
        return keys[rows, :, : self._span], values[rows, :, : self._span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens before this forward's (the longest row's; positions come from
        :meth:`positions`, not from this)."""
        return self._span - self._width if self._span else 0
