"""Kernels on code words: noising (training, kernel (a)) and sign + exact repair (decoding).

Both work on rows of B bits (one row per slot), BLOCK_R rows per program, with the bit index
along the second axis (most significant first, as in BitCodec)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import interpreting

__all__ = ["noise_bits", "repair_words"]


def _rows_per_program(n_rows: int) -> int:
    if interpreting():
        return max(1, min(64, triton.next_power_of_2(n_rows)))
    return 64


@triton.jit
def _noise_kernel(
    words_ptr,  # [n_rows] int code words (row = one slot of one block)
    t_ptr,  # [n_rows // m] per-block time
    eps_ptr,  # [n_rows, B] noise
    out_ptr,  # [n_rows, B] x_t
    n_rows,
    m,
    B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_B)
    rmask = rows < n_rows
    cmask = cols < B
    mask = rmask[:, None] & cmask[None, :]
    w = tl.load(words_ptr + rows, mask=rmask, other=0).to(tl.int64)
    t = tl.load(t_ptr + rows // m, mask=rmask, other=0.0).to(tl.float32)
    shift = tl.where(cmask, B - 1 - cols, 0).to(tl.int64)
    bit = ((w[:, None] >> shift[None, :]) & 1).to(tl.float32) * 2.0 - 1.0  # +1/-1, MSB first
    offs = rows.to(tl.int64)[:, None] * B + cols[None, :]
    eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = (1.0 - t[:, None]) * bit + t[:, None] * eps
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


def noise_bits(words: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x_t = (1 - t) bits(words) + t eps in one pass, no bit tensor in between.
    words [R, m] int (codes < 2^B), t [R], eps [R, m, B] -> x_t [R, m, B] in eps.dtype."""
    R, m, B = eps.shape
    assert words.shape == (R, m) and t.shape == (R,), (words.shape, t.shape, eps.shape)
    words, t, eps = words.contiguous(), t.contiguous(), eps.contiguous()
    out = torch.empty_like(eps)
    n = R * m
    block_r = _rows_per_program(n)
    grid = (triton.cdiv(n, block_r),)
    _noise_kernel[grid](words, t, eps, out, n, m, B, block_r, triton.next_power_of_2(B))
    return out


@triton.jit
def _repair_kernel(
    x_ptr,  # [n_rows, B] continuous bits
    out_ptr,  # [n_rows] int64 valid code words
    n_rows,
    top,  # V - 1, the largest valid code
    B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_B)
    rmask = rows < n_rows
    cmask = cols < B
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * B + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    shift = tl.where(cmask, B - 1 - cols, 0).to(tl.int64)
    one = tl.where(mask, (x >= 0).to(tl.int64), 0)
    words = tl.sum(one << shift[None, :], axis=1)  # sign(), 0 counts as +1
    top64 = tl.zeros([BLOCK_B], dtype=tl.int64) + top  # top may arrive as a constexpr (1)
    u_bit = tl.where(cmask, (top64 >> shift) & 1, 0)  # [BLOCK_B] bits of V - 1
    gain = x * (u_bit.to(tl.float32) * 2.0 - 1.0)[None, :]  # score of copying U's bit
    prefix = tl.cumsum(gain, axis=1) - gain  # sum over bits above i
    absx = tl.abs(x)
    suffix = tl.sum(absx, axis=1)[:, None] - tl.cumsum(absx, axis=1)  # free bits below i
    cand = prefix - x + suffix  # copy U above j, 0 at j (U_j = 1), best bits below j
    cand = tl.where((u_bit == 1)[None, :] & mask, cand, float("-inf"))
    best = tl.max(cand, axis=1)
    j = tl.argmax(cand, axis=1)  # first maximum, as torch.argmax
    j = tl.where(tl.sum(gain, axis=1) > best, B, j)  # c == U wins only if strictly better
    jj = j[:, None]
    c = cols[None, :]
    bit = tl.where(c < jj, u_bit[None, :], tl.where(c == jj, 0, one))
    repaired = tl.sum(tl.where(mask, bit << shift[None, :], 0), axis=1)
    res = tl.where(words <= top, words, repaired)
    tl.store(out_ptr + rows, res, mask=rmask)


def repair_words(x: Tensor, vocab_size: int) -> Tensor:
    """sign() and the exact invalid-code repair of BitCodec.repair in one kernel.
    x [..., B] continuous -> the valid code word (< vocab_size) maximising sum_i x_i c_i, [...]
    int64."""
    B = x.shape[-1]
    assert 1 <= B <= 62 and vocab_size <= 1 << B
    flat = x.reshape(-1, B).contiguous()
    n = flat.shape[0]
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    if n:
        block_r = _rows_per_program(n)
        grid = (triton.cdiv(n, block_r),)
        _repair_kernel[grid](flat, out, n, vocab_size - 1, B, block_r, triton.next_power_of_2(B))
    return out.view(x.shape[:-1])
