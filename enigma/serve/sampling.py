"""Batched generation for serving: many prompts decoded together, one model call per step.

The prompts are left-padded into one batch (EnigmaLM's positions count the real tokens, so a
prompt decodes in a batch exactly as alone), the first call fills the KV cache, and each later
call feeds every row its newest token. Each row samples with its own settings, all in one
vectorised pass over the batch: repetition penalty, temperature (0: greedy), top-k and top-p. A
row ends at the end-of-sequence token or its ``max_tokens``; the batch ends when every row has.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """How one request samples (the OpenAI parameters, plus top-k and repetition penalty)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    repetition_penalty: float = 1.0


def choose(logits: Tensor, seen: Tensor, settings: list[Sampling], generator=None) -> Tensor:
    """The next token of every row from its last logits ``(B, V)``; ``seen`` ``(B, V)`` marks the
    tokens each row's penalty applies to."""
    device = logits.device
    column = lambda name, dtype: torch.tensor(  # noqa: E731
        [getattr(s, name) for s in settings], dtype=dtype, device=device
    )
    temperature, top_p = column("temperature", torch.float32), column("top_p", torch.float32)
    top_k, penalty = column("top_k", torch.long), column("repetition_penalty", torch.float32)
    logits = logits.float()
    pen = penalty[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
    greedy = logits.argmax(-1)
    ordered, order = (logits / temperature.clamp(min=1e-5)[:, None]).sort(-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=device)[None]
    drop = ranks >= torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    probs = torch.softmax(ordered.masked_fill(drop, float("-inf")), -1)
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]  # the first token always stays
    probs = torch.softmax(ordered.masked_fill(drop, float("-inf")), -1)
    picked = order.gather(1, torch.multinomial(probs, 1, generator=generator)).squeeze(1)
    return torch.where(temperature > 0, picked, greedy)


class BatchGenerator:
    """One model serving many requests; ``calls`` counts its forward passes."""

    def __init__(self, model, eos_token_id: int, pad_token_id: int = 0):
        self.model, self.eos, self.pad = model.eval(), eos_token_id, pad_token_id
        self.calls = 0

    @torch.no_grad()
    def stream(self, prompts: list[list[int]], settings: list[Sampling]) -> Iterator[list]:
        """Yields, step by step, each row's new token id, or None once the row has ended."""
        from transformers.cache_utils import DynamicCache

        width = max(len(p) for p in prompts)
        device = next(self.model.parameters()).device
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        seen = torch.zeros(len(prompts), self.model.config.vocab_size, dtype=torch.bool,
                           device=device)  # fmt: skip
        seen.scatter_(1, ids, mask.bool())
        limits = torch.tensor([s.max_tokens for s in settings], device=device)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        cache, step, feed = DynamicCache(config=self.model.config), 0, ids
        while not bool(done.all()):
            out = self.model(feed, attention_mask=mask, cache=cache, use_cache=True)
            self.calls += 1
            token = choose(out.logits[:, -1], seen, settings)
            token = torch.where(done, self.pad, token)
            seen.scatter_(1, token[:, None], ~done[:, None])
            step += 1
            ending = ~done & ((token == self.eos) | (step >= limits))
            yield [None if d or t == self.eos else t for d, t in zip(done.tolist(), token.tolist(),
                                                                   strict=True)]  # fmt: skip
            done |= ending
            feed = token[:, None]
            mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
