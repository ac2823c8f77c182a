"""Causal self-attention with ALiBi biases, through ``F.scaled_dot_product_attention``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def alibi_slopes(num_heads: int, device: torch.device | str | None = None) -> Tensor:
    """Press et al. (2022): a geometric sequence starting at ``2^(-8/n)``; for a head count that is
    not a power of two, the odd-numbered slopes of the next power of two follow. Made on
    ``device`` by ``arange`` (no host-to-device copy on each forward)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    exponents = torch.arange(1, closest + 1, device=device, dtype=torch.float32) * (-8.0 / closest)
    extra = num_heads - closest  # slopes 1, 3, 5, ... of 2 * closest heads
    odd = torch.arange(extra, device=device, dtype=torch.float32) * 2 + 1
    return torch.exp2(torch.cat([exponents, odd * (-4.0 / closest)]))


def attention_bias(
    num_heads: int,
    past: int,
    length: int,
    use_alibi: bool,
    padding_mask: Tensor | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor | None, bool]:
    """``(bias, is_causal)`` for SDPA: an additive float bias ``(B or 1, H or 1, Lq, Lk)`` in
    ``dtype`` (the attention's compute dtype, so no layer casts it), or ``None`` with
    ``is_causal`` when the fused causal kernel suffices.

    Queries occupy key slots ``past .. past + length - 1`` (the KV-cache slots); causality and ALiBi
    distances are measured in slots.
    """
    if not use_alibi and padding_mask is None:
        if past == 0:
            return None, True
        if length == 1:
            return None, False
    queries = torch.arange(past, past + length, device=device)
    keys = torch.arange(past + length, device=device)
    distance = queries[:, None] - keys[None, :]  # (Lq, Lk); negative = future
    future = (distance < 0)[None]
    if use_alibi:
        slopes = alibi_slopes(num_heads, device)
        bias = -slopes[:, None, None] * distance.clamp(min=0)[None].float()
    else:
        bias = torch.zeros(future.shape, device=device)
    bias = bias.to(dtype).masked_fill(future, float("-inf"))[None]
    if padding_mask is not None:
        pad = ~padding_mask.bool()[:, None, None, :]
        bias = bias.masked_fill(pad, float("-inf"))
    return bias, False


@dataclass(frozen=True)
class FlexPlan:
    """Causal ALiBi attention for FlexAttention: the block mask made once per forward and the
    slopes the score modifier reads; used where the bias path would keep the fused kernels out
    (training on CUDA without padding or a cache)."""

    block_mask: object
    slopes: Tensor

    @classmethod
    def make(cls, num_heads: int, length: int, device) -> FlexPlan:
        from torch.nn.attention.flex_attention import create_block_mask

        mask = create_block_mask(_causal, None, None, length, length, device=device)
        return cls(mask, alibi_slopes(num_heads, device))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        slopes = self.slopes

        def alibi(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (q_idx - kv_idx)

        return flex_attention(q, k, v, score_mod=alibi, block_mask=self.block_mask)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, num_heads: int, layer_idx: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim, self.layer_idx = num_heads, d // num_heads, layer_idx
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.dropout = dropout

    def forward(self, x: Tensor, bias: Tensor | None, is_causal: bool, cache=None) -> Tensor:
        b, length, d = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.num_heads, self.head_dim)
        # Unbound along their own dim, the gradients stack straight into qkv's layout (no copy).
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, H, L, hd)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if isinstance(bias, FlexPlan):
            y = bias.attend(q, k, v)
            return self.proj(y.transpose(1, 2).reshape(b, length, d))
        if bias is not None and bias.dtype != q.dtype:
            bias = bias.to(q.dtype)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(y.transpose(1, 2).reshape(b, length, d))
