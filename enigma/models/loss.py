"""The next-token loss, read from the head's logits as they are (bf16 under autocast).

The labels are shifted (each position's target is the next token; the last position has none)
rather than the logits sliced, and the cross-entropy reads one chunk of rows at a time into its
fp32 log-sum-exp: the logits are never copied whole, in fp32 or at all. Backward writes the
gradient of the logits in their own dtype, chunk by chunk, recomputing each chunk's softmax from
the logits (one read of them, cheaper than keeping fp32 probabilities).
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
        total = torch.zeros((), dtype=dtype, device=logits.device)
        for start, end in _chunks(*logits.shape):
            rows = logits[start:end].to(dtype)  # the only copy: one chunk, upcast
            picked = rows.gather(1, safe[start:end, None]).squeeze(1)
            total = total + ((torch.logsumexp(rows, dim=-1) - picked) * kept[start:end]).sum()
        ctx.save_for_backward(logits, safe, kept, count)
        ctx.compute_dtype = dtype
        return total / count

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, safe, kept, count = ctx.saved_tensors
        out = torch.empty_like(logits)
        dtype = ctx.compute_dtype
        scale = (grad / count).to(dtype)
        for start, end in _chunks(*logits.shape):
            # (softmax - one-hot) x scale: the softmax recomputed from the chunk (one read of it,
            # where keeping the forward's would cost a write and a read), the product written
            # straight into the gradient in the logits' dtype.
            probs = torch.softmax(logits[start:end], dim=-1, dtype=dtype)
            probs.scatter_add_(1, safe[start:end, None], -torch.ones_like(probs[:, :1]))
            torch.mul(probs, (kept[start:end].to(dtype) * scale)[:, None], out=out[start:end])
        return out, None


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of each position's logits ``(B, L, V)`` against the next label (labels
    ``IGNORE`` skipped), in at least fp32, without copying the logits."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    vocab = logits.shape[-1]
    return _ChunkedCrossEntropy.apply(logits.reshape(-1, vocab), targets.reshape(-1))
