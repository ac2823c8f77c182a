"""The next-token loss, read from the head's logits as they are (bf16 under autocast).

The labels are shifted (each position's target is the next token; the last position has none)
rather than the logits sliced, and the cross-entropy reads one chunk of rows at a time into its
fp32 log-sum-exp: the logits are never copied whole, in fp32 or at all. Backward writes the
gradient of the logits in their own dtype, chunk by chunk: each chunk's softmax recomputed from
the logits straight into the gradient and scaled in place, the targets' entries set from the
forward's fp32 log-sum-exp (the logits read once, the gradient written twice and read once).
So a step holds two tensors as large as the logits (the logits and their gradient), where slicing,
copying, upcasting and log-softmaxing held about eight, each up to 692 MB at ``base``, B=32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100
CHUNK_BYTES = 1 << 28  # fp32 bytes of one chunk's upcast rows (256 MiB): a few chunks per step


def _chunks(rows: int, vocab: int) -> list[tuple[int, int]]:
    size = max(1, CHUNK_BYTES // (4 * vocab))
    return [(start, min(rows, start + size)) for start in range(0, rows, size)]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp64 stays fp64


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``logits`` ``(N, V)`` against ``targets`` ``(N,)`` (``IGNORE``
    skipped), computed a chunk of rows at a time in at least fp32."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        kept = targets != IGNORE
        count = kept.sum().clamp(min=1)
        safe = torch.where(kept, targets, 0)
        dtype = _compute_dtype(logits.dtype)
        picked = logits.gather(1, safe[:, None]).squeeze(1).to(dtype)  # (N,): small
        lse = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        for start, end in _chunks(*logits.shape):
            rows = logits[start:end].to(dtype)  # the only copy: one chunk, upcast
            torch.logsumexp(rows, dim=-1, out=lse[start:end])
        ctx.save_for_backward(logits, safe, kept, count, lse, picked)
        return ((lse - picked) * kept).sum() / count

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, safe, kept, count, lse, picked = ctx.saved_tensors
        out = torch.empty_like(logits)
        weight = kept * (grad / count).to(lse.dtype)  # (N,): the mean's scale, 0 where ignored
        # The targets' entries, (p - 1) x weight, from the forward's log-sum-exp in fp32: p
        # rounded to bf16 first would lose them where the model is confident (p near 1).
        at_target = ((picked - lse).exp() - 1) * weight
        for start, end in _chunks(*logits.shape):
            # softmax x weight, written straight into the gradient in the logits' dtype: the
            # kernel reads the bf16 chunk once and accumulates in fp32, and the scale is applied
            # in place (a read and a write of the chunk, where an fp32 copy, an fp32 softmax and
            # a product cost three of each).
            chunk = out[start:end]
            torch.softmax(logits[start:end], dim=-1, out=chunk)
            chunk.mul_(weight[start:end, None])
        out.scatter_(1, safe[:, None], at_target.to(out.dtype)[:, None])
        return out, None


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of each position's logits ``(B, L, V)`` against the next label (labels
    ``IGNORE`` skipped), in at least fp32, without copying the logits."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    vocab = logits.shape[-1]
    return _ChunkedCrossEntropy.apply(logits.reshape(-1, vocab), targets.reshape(-1))
