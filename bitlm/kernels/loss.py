"""The diffusion loss with its gradient in one kernel (kernel (c)).

From the head's pre-squash output, the code words and t: x0_hat = tanh(out) (if squash), the clean
bits recomputed from the words (no x0 tensor), err = (x0_hat - x0)^2, weighted by
1 / max(t, 0.05)^2 for the v-loss, mean over all blocks, slots and bits (diffusion_loss). The
same pass writes d loss / d out; backward only scales it by the incoming gradient. Per-program
partial sums are reduced by torch (deterministic)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..diffusion import V_LOSS_MIN_T
from . import interpreting

__all__ = ["FusedBitLoss", "fused_bit_loss"]


@triton.jit
def _loss_kernel(
    out_ptr,  # [n_rows, B] head output before the squash
    words_ptr,  # [n_rows] code words
    t_ptr,  # [n_rows // m]
    partial_ptr,  # [n_programs] fp32 partial sums of the weighted error
    grad_ptr,  # [n_rows, B] d loss / d out
    n_rows,
    m,
    inv_count,  # 1 / (n_rows * B)
    min_t,
    B: tl.constexpr,
    SQUASH: tl.constexpr,
    V_LOSS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_B)
    rmask = rows < n_rows
    cmask = cols < B
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * B + cols[None, :]
    o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(words_ptr + rows, mask=rmask, other=0).to(tl.int64)
    shift = tl.where(cmask, B - 1 - cols, 0).to(tl.int64)
    x0 = ((w[:, None] >> shift[None, :]) & 1).to(tl.float32) * 2.0 - 1.0
    if SQUASH:
        xh = 2.0 / (1.0 + tl.exp(-2.0 * o)) - 1.0  # tanh
    else:
        xh = o
    diff = xh - x0
    if V_LOSS:
        t = tl.load(t_ptr + rows // m, mask=rmask, other=1.0).to(tl.float32)
        tc = tl.maximum(t, min_t)
        wt = (1.0 / (tc * tc))[:, None]
    else:
        wt = 1.0
    err = tl.where(mask, diff * diff * wt, 0.0)
    tl.store(partial_ptr + pid, tl.sum(tl.sum(err, axis=1), axis=0))
    g = 2.0 * inv_count * diff * wt
    if SQUASH:
        g = g * (1.0 - xh * xh)
    tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


class FusedBitLoss(torch.autograd.Function):
    """Scalar loss from out [R, m, B] (pre-squash), words [R, m] int, t [R]."""

    @staticmethod
    def forward(ctx, out: Tensor, words: Tensor, t: Tensor, squash: bool, kind: str) -> Tensor:
        R, m, B = out.shape
        out = out.contiguous()
        n = R * m
        block_r = max(1, min(64, triton.next_power_of_2(n))) if interpreting() else 64
        grid = (triton.cdiv(n, block_r),)
        partial = torch.empty(grid[0], dtype=torch.float32, device=out.device)
        grad = torch.empty_like(out)
        _loss_kernel[grid](
            out,
            words.contiguous(),
            t.contiguous(),
            partial,
            grad,
            n,
            m,
            1.0 / (n * B),
            V_LOSS_MIN_T,
            B,
            squash,
            kind == "v_loss",
            block_r,
            triton.next_power_of_2(B),
        )
        ctx.save_for_backward(grad)
        return partial.sum() / (n * B)

    @staticmethod
    def backward(ctx, dloss: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * dloss.to(grad.dtype), None, None, None, None


def fused_bit_loss(out: Tensor, words: Tensor, t: Tensor, *, squash: bool, kind: str) -> Tensor:
    """diffusion_loss(tanh(out) if squash else out, bits(words), _, t, kind) as one kernel.
    out [R, m, B], words [R, m] int, t [R] -> scalar fp32."""
    if kind not in ("x0_mse", "v_loss"):
        raise ValueError(f"unknown loss {kind!r}")
    return FusedBitLoss.apply(out, words, t, squash, kind)
