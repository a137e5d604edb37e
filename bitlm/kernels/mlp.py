"""The head's adaLN-modulated MLP sub-block as Triton kernels (kernel (b)).

    out = x + g * (fc2(SiLU(fc1(LN(x) * (1 + scale) + shift))))       x, g, shift, scale [M, W]

Forward, three launches: LN+modulate (saves mean and rstd per row), GEMM with a bias+SiLU
epilogue (stores pre-activation and activation), GEMM with a bias+gated-residual epilogue.
Backward: one elementwise kernel (gate), the two activation-gradient GEMMs (the first with the
SiLU-gradient epilogue), the LN+modulate backward (adds the residual gradient), and the two
weight-gradient GEMMs, which have nothing to fuse and go to cuBLAS (torch.mm).

All kernels accumulate in fp32. In Triton's interpreter (CPU) dot operands are cast to fp32 first
(bf16 dot is not supported there). On GPU an fp32 GEMM uses TF32 exactly when torch would
(torch.backends.cuda.matmul.allow_tf32)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import interpreting

__all__ = [
    "AdaLNMLP",
    "LNModulate",
    "LinearGatedResidual",
    "adaln_mlp",
    "linear_epilogue",
    "linear_gated_residual",
    "ln_modulate",
]

LN_EPS = 1e-6  # as the reference head's nn.LayerNorm(eps=1e-6)


# ---- LayerNorm + adaLN modulation ----------------------------------------------------------------
@triton.jit
def _ln_mod_fwd_kernel(
    x_ptr,  # [M, W] contiguous
    shift_ptr,  # [M, W] row stride s_mod, column stride 1
    scale_ptr,
    out_ptr,  # [M, W] contiguous
    mean_ptr,  # [M] fp32
    rstd_ptr,  # [M] fp32
    M,
    W,
    s_mod,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_W)
    rmask = rows < M
    mask = rmask[:, None] & (cols < W)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * W + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / W
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / W + eps)
    mod = r64 * s_mod + cols[None, :]
    shift = tl.load(shift_ptr + mod, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + mod, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * (1.0 + scale) + shift
    tl.store(out_ptr + r64 * W + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _ln_mod_bwd_kernel(
    dy_ptr,  # [M, W] contiguous: gradient of the modulated output
    x_ptr,  # [M, W] contiguous
    scale_ptr,  # [M, W] row stride s_mod
    mean_ptr,
    rstd_ptr,
    dres_ptr,  # [M, W] contiguous, added to dx (residual branch); unused unless HAS_RES
    dx_ptr,  # [M, W] out
    dscale_ptr,  # [M, W] out
    M,
    W,
    s_mod,
    HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_W)
    rmask = rows < M
    mask = rmask[:, None] & (cols < W)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    offs = r64 * W + cols[None, :]
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + r64 * s_mod + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    dxhat = dy * (1.0 + scale)
    c1 = tl.sum(dxhat, axis=1) / W
    c2 = tl.sum(dxhat * xhat, axis=1) / W
    dx = rstd[:, None] * (dxhat - c1[:, None] - xhat * c2[:, None])
    if HAS_RES:
        dx += tl.load(dres_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dscale_ptr + offs, (dy * xhat).to(dscale_ptr.dtype.element_ty), mask=mask)


def _row_block(M: int, W: int) -> tuple[int, int]:
    """(rows per program, padded width) for the row-wise kernels."""
    bw = triton.next_power_of_2(W)
    if interpreting():
        return max(1, min(triton.next_power_of_2(M), 4096 // bw, 64)), bw
    return max(1, min(16, 4096 // bw)), bw


def _mod_stride(*ts: Tensor) -> int:
    """Shared row stride of modulation views (chunks of the adaLN output); column stride 1."""
    s = ts[0].stride(0)
    for u in ts:
        assert u.dim() == 2 and u.stride(1) == 1 and u.stride(0) == s, "bad modulation layout"
    return s


def _ln_mod_fwd(x: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [M, W] contiguous, shift/scale [M, W] views -> (y [M, W], mean [M], rstd [M])."""
    M, W = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    bm, bw = _row_block(M, W)
    s = _mod_stride(shift, scale)
    _ln_mod_fwd_kernel[(triton.cdiv(M, bm),)](
        x, shift, scale, y, mean, rstd, M, W, s, LN_EPS, bm, bw, num_warps=4 if bw <= 1024 else 8
    )
    return y, mean, rstd


def _ln_mod_bwd(
    dy: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor, dres: Tensor | None
) -> tuple[Tensor, Tensor]:
    """-> (dx [M, W] (+ dres), dscale [M, W]); dshift is dy itself."""
    M, W = x.shape
    dy = dy.contiguous()
    dx, dscale = torch.empty_like(x), torch.empty_like(x)
    bm, bw = _row_block(M, W)
    _ln_mod_bwd_kernel[(triton.cdiv(M, bm),)](
        dy,
        x,
        scale,
        mean,
        rstd,
        dy if dres is None else dres.contiguous(),
        dx,
        dscale,
        M,
        W,
        _mod_stride(scale),
        dres is not None,
        bm,
        bw,
        num_warps=4 if bw <= 1024 else 8,
    )
    return dx, dscale


class LNModulate(torch.autograd.Function):
    """y = LN(x) (1 + scale) + shift (no LN affine, eps 1e-6), x/shift/scale [M, W]."""

    @staticmethod
    def forward(ctx, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        x = x.contiguous()
        y, mean, rstd = _ln_mod_fwd(x, shift, scale)
        ctx.save_for_backward(x, scale, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dscale = _ln_mod_bwd(dy, x, scale, mean, rstd, None)
        return dx, dy, dscale


def ln_modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """LN + adaLN modulation over the last dim. x [..., W]; shift/scale [..., W] (any views of
    the adaLN output whose rows are one stride apart) -> [..., W]."""
    W = x.shape[-1]
    flat = lambda u: u.reshape(-1, W) if u.stride(-1) == 1 else u.contiguous().view(-1, W)
    return LNModulate.apply(flat(x), flat(shift), flat(scale)).view(x.shape)


# ---- GEMM with fused epilogues ---------------------------------------------------------------
EPI_BIAS, EPI_SILU, EPI_GATED, EPI_DSILU = 0, 1, 2, 3


@triton.jit
def _mm_kernel(
    a_ptr,  # [M, K] strides (sam, sak)
    b_ptr,  # [K, N] strides (sbk, sbn)
    c_ptr,  # [M, N] contiguous
    bias_ptr,  # [N]
    aux_ptr,  # [M, N] contiguous: pre-activation (SILU: out, DSILU: in) or f (GATED: out)
    g_ptr,  # [M, N] gate, row stride sgm, column stride 1 (GATED)
    res_ptr,  # [M, N] contiguous residual (GATED)
    M,
    N,
    K,
    sam,
    sak,
    sbk,
    sbn,
    sgm,
    EPI: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,  # cast operands to fp32 (interpreter, fp32 inputs)
    ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n  # grouped ordering for L2 reuse
    group = pid // width
    first_m = group * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    a_ptrs = a_ptr + rm[:, None] * sam + rk[None, :] * sak
    b_ptrs = b_ptr + rk[:, None] * sbk + rn[None, :] * sbn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kmask = rk < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
            if ALLOW_TF32:
                acc = tl.dot(a, b, acc, input_precision="tf32")
            else:
                acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk
    mask = mmask[:, None] & nmask[None, :]
    offs = rm[:, None] * N + rn[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if EPI == 1:  # SiLU: aux <- pre, c <- silu(pre)
        tl.store(aux_ptr + offs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
        acc = acc / (1.0 + tl.exp(-acc))
    elif EPI == 2:  # gated residual: aux <- f, c <- res + g f
        tl.store(aux_ptr + offs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
        g = tl.load(g_ptr + rm[:, None] * sgm + rn[None, :], mask=mask, other=0.0)
        res = tl.load(res_ptr + offs, mask=mask, other=0.0)
        acc = res.to(tl.float32) + g.to(tl.float32) * acc
    elif EPI == 3:  # SiLU gradient: c <- acc * silu'(pre)
        pre = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-pre))
        acc = acc * s * (1.0 + pre * (1.0 - s))
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# Large bf16/fp16 GEMMs (training sizes) pick their tiles by autotuning on first use; the rest
# (interpreter, fp32, decoding sizes) use the heuristic below. Tuning never runs under graph
# capture: the decode sampler's GEMMs are small, and it warms up before capturing anyway.
TUNE_MIN_M = 8192
_TUNE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 3),
        (64, 256, 64, 4, 4),
        (128, 64, 64, 4, 4),
    ]
]
_mm_kernel_tuned = triton.autotune(_TUNE_CONFIGS, key=["N", "K", "EPI", "HAS_BIAS"])(_mm_kernel)


def _mm_config(M: int, N: int, K: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); tl.dot needs every block >= 16."""
    p2 = lambda n, lo, hi: max(lo, min(hi, triton.next_power_of_2(n)))
    if interpreting():
        return p2(M, 16, 64), p2(N, 16, 64), p2(K, 16, 64), 4, 1
    if dtype == torch.float32:
        return p2(M, 16, 64 if M < 8192 else 128), p2(N, 16, 128), p2(K, 16, 32), 8, 3
    if M <= 256:  # decoding-sized: narrow tiles so that enough programs fill the SMs
        return p2(M, 16, 64), p2(N, 16, 32), p2(K, 16, 64), 4, 4
    if M < TUNE_MIN_M:
        return p2(M, 16, 64), p2(N, 16, 64), p2(K, 16, 64), 4, 4
    return 128, 128, 64, 8, 3


def linear_epilogue(
    a: Tensor,
    w: Tensor,
    bias: Tensor | None = None,
    *,
    epi: int = EPI_BIAS,
    aux: Tensor | None = None,
    gate: Tensor | None = None,
    res: Tensor | None = None,
    transpose_w: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """c = a @ w^T (+ bias) (nn.Linear convention; transpose_w=False gives a @ w), then:
    EPI_BIAS: c. EPI_SILU: (silu(pre), pre). EPI_GATED: (res + gate f, f).
    EPI_DSILU: c * silu'(aux) with aux the saved pre-activation.
    a [M, K] (any strides), w [N, K] ([K, N] if not transpose_w), gate [M, N] rows one stride
    apart, res/aux [M, N] contiguous. Returns (c [M, N], aux_out [M, N] or None)."""
    M, K = a.shape
    N = w.shape[0] if transpose_w else w.shape[1]
    sbk, sbn = (w.stride(1), w.stride(0)) if transpose_w else (w.stride(0), w.stride(1))
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)
    aux_out = None
    if epi in (EPI_SILU, EPI_GATED):
        aux = aux_out = torch.empty_like(c)
    if epi == EPI_GATED:
        assert gate is not None and res is not None and gate.stride(1) == 1
        res = res.contiguous()
    if epi == EPI_DSILU:
        assert aux is not None and aux.is_contiguous()
    dot_fp32 = interpreting() or a.dtype == torch.float32
    tune = not dot_fp32 and M >= TUNE_MIN_M
    if tune:
        kernel = _mm_kernel_tuned
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        launch = {}
    else:
        kernel = _mm_kernel
        bm, bn, bk, warps, stages = _mm_config(M, N, K, a.dtype)
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        launch = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    dummy = c
    kernel[grid](
        a,
        w,
        c,
        dummy if bias is None else bias,
        dummy if aux is None else aux,
        dummy if gate is None else gate,
        dummy if res is None else res,
        M,
        N,
        K,
        a.stride(0),
        a.stride(1),
        sbk,
        sbn,
        0 if gate is None else gate.stride(0),
        EPI=epi,
        HAS_BIAS=bias is not None,
        DOT_FP32=dot_fp32,
        ALLOW_TF32=a.dtype == torch.float32
        and not interpreting()
        and torch.backends.cuda.matmul.allow_tf32,
        GROUP_M=8,
        **launch,
    )
    return c, aux_out


# ---- elementwise gate backward -----------------------------------------------------------------
@triton.jit
def _gate_bwd_kernel(
    dout_ptr,  # [n] contiguous (as [M, W])
    f_ptr,  # [n] contiguous
    g_ptr,  # [M, W] row stride sgm
    df_ptr,  # [n] out: dout * g
    dg_ptr,  # [n] out: dout * f
    n,
    W,
    sgm,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + (offs // W) * sgm + offs % W, mask=mask, other=0.0).to(tl.float32)
    tl.store(df_ptr + offs, (dout * g).to(df_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, (dout * f).to(dg_ptr.dtype.element_ty), mask=mask)


def _gate_bwd(dout: Tensor, f: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    dout = dout.contiguous()
    df, dg = torch.empty_like(f), torch.empty_like(f)
    n, W = f.numel(), f.shape[1]
    block = min(4096, triton.next_power_of_2(n)) if interpreting() else 2048
    _gate_bwd_kernel[(triton.cdiv(n, block),)](dout, f, g, df, dg, n, W, g.stride(0), block)
    return df, dg


# ---- linear + gated residual (the attention branch's output projection) --------------------------
class LinearGatedResidual(torch.autograd.Function):
    """out = res + g * (inp @ w^T + b). inp [M, K]; w [N, K]; b [N]; g [M, N] view with column
    stride 1; res [M, N] contiguous."""

    @staticmethod
    def forward(ctx, inp, w, b, g, res):
        out, f = linear_epilogue(inp, w, b, epi=EPI_GATED, gate=g, res=res)  # [M, N] each
        ctx.save_for_backward(inp, w, g, f)
        return out

    @staticmethod
    def backward(ctx, dout):
        inp, w, g, f = ctx.saved_tensors
        df, dg = _gate_bwd(dout, f, g)  # [M, N]
        dinp, _ = linear_epilogue(df, w, transpose_w=False)  # [M, K]
        return dinp, df.t().mm(inp), df.sum(0), dg, dout


def linear_gated_residual(inp: Tensor, lin: torch.nn.Linear, g: Tensor, res: Tensor) -> Tensor:
    """res + g * lin(inp), fused. inp [..., K]; g, res [..., N] -> [..., N]."""
    N, K = lin.out_features, lin.in_features
    rows = lambda u: u.reshape(-1, N) if u.stride(-1) == 1 else u.contiguous().view(-1, N)
    out = LinearGatedResidual.apply(
        inp.reshape(-1, K), lin.weight, lin.bias, rows(g), res.reshape(-1, N).contiguous()
    )
    return out.view(res.shape)


# ---- the whole adaLN MLP sub-block -------------------------------------------------------------
class AdaLNMLP(torch.autograd.Function):
    """out = x + g * fc2(silu(fc1(LN(x) (1 + scale) + shift))). x [M, W] contiguous;
    shift, scale, g [M, W] views with column stride 1; w1 [H, W], b1 [H], w2 [W, H], b2 [W]."""

    @staticmethod
    def forward(ctx, x, shift, scale, g, w1, b1, w2, b2):
        xm, mean, rstd = _ln_mod_fwd(x, shift, scale)  # [M, W]
        act, pre = linear_epilogue(xm, w1, b1, epi=EPI_SILU)  # [M, H] each
        out, f = linear_epilogue(act, w2, b2, epi=EPI_GATED, gate=g, res=x)  # [M, W] each
        ctx.save_for_backward(x, scale, g, mean, rstd, xm, pre, act, f, w1, w2)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, scale, g, mean, rstd, xm, pre, act, f, w1, w2 = ctx.saved_tensors
        df, dg = _gate_bwd(dout, f, g)  # [M, W]
        dw2, db2 = df.t().mm(act), df.sum(0)  # [W, H], [W]
        dpre, _ = linear_epilogue(df, w2, epi=EPI_DSILU, aux=pre, transpose_w=False)  # [M, H]
        dw1, db1 = dpre.t().mm(xm), dpre.sum(0)  # [H, W], [H]
        dxm, _ = linear_epilogue(dpre, w1, transpose_w=False)  # [M, W]
        dx, dscale = _ln_mod_bwd(dxm, x, scale, mean, rstd, dout)
        return dx, dxm, dscale, dg, dw1, db1, dw2, db2


def adaln_mlp(
    x: Tensor, shift: Tensor, scale: Tensor, g: Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear
) -> Tensor:
    """The fused MLP sub-block of AdaLNBlock. x, shift, scale, g [..., W] -> [..., W]."""
    W = x.shape[-1]
    rows = lambda u: u.reshape(-1, W) if u.stride(-1) == 1 else u.contiguous().view(-1, W)
    out = AdaLNMLP.apply(
        x.reshape(-1, W).contiguous(),
        rows(shift),
        rows(scale),
        rows(g),
        fc1.weight,
        fc1.bias,
        fc2.weight,
        fc2.bias,
    )
    return out.view(x.shape)
