"""Llama/Qwen3-style decoder with a block-causal mask.

Choices: pre-norm RMSNorm; RoPE on q and k; grouped-query attention; optional QK-RMSNorm; SwiGLU
MLP; no biases. The only change from a standard decoder is the mask: full attention inside a block
of m tokens, causal across blocks (m = 1 is the ordinary causal mask). A KV cache serves decoding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig

__all__ = [
    "Backbone",
    "KVCache",
    "RMSNorm",
    "StaticKVCache",
    "block_causal_mask",
    "block_causal_mask_mod",
]


def block_causal_mask(q_pos: Tensor, k_pos: Tensor, block_size: int) -> Tensor:
    """Boolean [Tq, Tk] mask, True where query position q may attend to key position k:
    block(k) <= block(q). Usable as a dense SDPA mask."""
    return (k_pos[None, :] // block_size) <= (q_pos[:, None] // block_size)


def block_causal_mask_mod(block_size: int) -> Callable[..., Tensor]:
    """The same rule as a FlexAttention mask_mod(b, h, q_idx, kv_idx)."""
    return lambda b, h, q_idx, kv_idx: (kv_idx // block_size) <= (q_idx // block_size)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope(x: Tensor, pos: Tensor, theta: float) -> Tensor:
    """Rotary embedding, half-split convention. x [b, h, T, hd], pos [T]."""
    hd = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    ang = pos.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, hd/2]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Per-layer keys and values [b, n_kv_heads, T, hd], grown by concatenation."""

    def __init__(self, n_layers: int) -> None:
        self.kv: list[tuple[Tensor, Tensor] | None] = [None] * n_layers

    @property
    def length(self) -> int:
        first = self.kv[0]
        return 0 if first is None else first[0].shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        old = self.kv[layer]
        if old is not None:
            k, v = torch.cat([old[0], k], 2), torch.cat([old[1], v], 2)
        self.kv[layer] = (k, v)
        return k, v


class StaticKVCache:
    """Preallocated per-layer keys and values [b, n_kv_heads, max_len, hd], written in place:
    no reallocation or copy of the old entries per decoding step. Same interface as KVCache;
    update returns views of the filled prefix."""

    def __init__(
        self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.filled = [0] * cfg.n_layers

    @property
    def length(self) -> int:
        return self.filled[0]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        start, T = self.filled[layer], k.shape[2]
        end = start + T
        if end > self.max_len:
            raise ValueError(f"StaticKVCache holds {self.max_len} positions, got {end}")
        ck, cv = self.k[layer], self.v[layer]
        ck[:, :, start:end] = k
        cv[:, :, start:end] = v
        self.filled[layer] = end
        return ck[:, :, :end], cv[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.cfg = layer, cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(
        self, x: Tensor, pos: Tensor, mask: Tensor | None, cache: KVCache | StaticKVCache | None
    ) -> Tensor:
        b, T, _ = x.shape
        c, hd = self.cfg, self.cfg.head_dim
        q = self.q_norm(self.wq(x).view(b, T, c.n_heads, hd)).transpose(1, 2)  # [b, h, T, hd]
        k = self.k_norm(self.wk(x).view(b, T, c.n_kv_heads, hd)).transpose(1, 2)  # [b, kvh, T, hd]
        v = self.wv(x).view(b, T, c.n_kv_heads, hd).transpose(1, 2)
        q, k = rope(q, pos, c.rope_theta), rope(k, pos, c.rope_theta)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=c.n_kv_heads != c.n_heads
        )  # [b, h, T, hd]
        return self.wo(y.transpose(1, 2).reshape(b, T, c.n_heads * hd))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(
        self, x: Tensor, pos: Tensor, mask: Tensor | None, cache: KVCache | StaticKVCache | None
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), pos, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class Backbone(nn.Module):
    """Input vectors [b, T, d] -> hidden states [b, T, d] under the block-causal mask."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x: Tensor, cache: KVCache | StaticKVCache | None = None) -> Tensor:
        T = x.shape[1]
        start = cache.length if cache is not None else 0
        pos = torch.arange(start, start + T, device=x.device)
        k_pos = torch.arange(0, start + T, device=x.device)
        m = self.cfg.block_size
        if start % m == 0 and m == T:
            mask = None  # one whole new block: it sees everything before and itself
        else:
            mask = block_causal_mask(pos, k_pos, m)
        for layer in self.layers:
            x = layer(x, pos, mask, cache)
        return self.norm(x)
