"""Output heads. The diffusion head (reference PyTorch path; the Triton kernels in
bitlm/kernels/ share its parameter names) and the per-slot softmax head of the baselines.

Diffusion head, per target block of m slots:
    z   = Linear(B -> W)(x_t [; x0_selfcond]) + slot_pos [+ Linear(d -> W)(h)]   [R, m, W]
    y   = SiLU(Linear(d -> W)(h) + TimeMLP(sinusoid(1000 t)))            [R, m, W]
    z   = AdaLNBlock(z, y) x depth  (self-attention among the m slots, then an MLP; shift, scale
          and gate from y, zero-initialised)
    out = Linear(W -> B)(modulate(LayerNorm(z), y))                      [R, m, B]
    x0_hat = tanh(out) if head_squash else out

Dispatch: the fused Triton path (bitlm/kernels/) runs on CUDA tensors when cfg.fused_head is True
and Triton imports; cfg.fused_head=False forces this reference path, which also runs on CPU.
Both read the same parameters, so checkpoints interchange.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .codec import BitCodec, words_to_bits
from .config import ModelConfig
from .diffusion import diffusion_loss, euler_sample

__all__ = [
    "AdaLNBlock",
    "DiffusionHead",
    "SoftmaxHead",
    "modulate",
    "slot_attention",
    "timestep_embedding",
]


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of 1000 t. t [R] -> [R, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None, :]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def slot_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Full attention among the m slots of each block: [R, heads, m, hd] -> [R, heads, m, hd].
    Explicit math: m is 4-8, and SDPA's fused backends fail on very large R x heads (cuDNN's
    raised at 262k blocks on an H200)."""
    att = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5  # [R, heads, m, m]
    return att.softmax(-1).to(v.dtype) @ v


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class AdaLNBlock(nn.Module):
    """x + g1 * Attn(mod(LN(x))) ; x + g2 * MLP(mod(LN(x))), modulation from the condition y."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def attn(self, x: Tensor) -> Tensor:
        R, m, W = x.shape
        q, k, v = self.qkv(x).view(R, m, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        y = slot_attention(q, k, v)  # [R, heads, m, W/heads]
        return self.proj(y.transpose(1, 2).reshape(R, m, W))

    def mlp(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(x)))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        s1, c1, g1, s2, c2, g2 = self.ada(y).chunk(6, dim=-1)
        x = x + g1 * self.attn(modulate(self.norm1(x), s1, c1))
        return x + g2 * self.mlp(modulate(self.norm2(x), s2, c2))


class DiffusionHead(nn.Module):
    """Predicts the clean bits x0_hat [R, m, B] of a block from x_t, t and the conditions h."""

    # Test hook: True runs the Triton path on any device (CPU tensors need TRITON_INTERPRET=1),
    # False forces the reference path; None decides by device, cfg.fused_head and Triton.
    force_fused: bool | None = None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.sample_evals = 0  # sum over sampled blocks of the head evaluations each needed
        B, W = cfg.num_bits, cfg.head_width
        self.in_proj = nn.Linear(B * (2 if cfg.self_conditioning else 1), W)
        self.slot_pos = nn.Parameter(torch.randn(cfg.block_size, W) * 0.02)
        self.cond_proj = nn.Linear(cfg.d_model, W)
        # Optional additive path for h: with adaLN alone (zero-initialised), h reaches the output
        # only through products of weights that start at zero.
        self.cond_in = nn.Linear(cfg.d_model, W) if cfg.head_cond_input else None
        self.null_cond = nn.Parameter(torch.randn(cfg.d_model) * 0.02)  # for condition dropout
        self.t_mlp = nn.Sequential(nn.Linear(256, W), nn.SiLU(), nn.Linear(W, W))
        self.blocks = nn.ModuleList(
            AdaLNBlock(W, cfg.head_heads, cfg.head_mlp_ratio) for _ in range(cfg.head_depth)
        )
        self.final_norm = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(W, 2 * W)
        self.out = nn.Linear(W, B)
        for lin in (self.final_ada, self.out):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for mod in self.t_mlp:
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=0.02)

    def condition(self, h: Tensor, t: Tensor) -> Tensor:
        """y = SiLU(cond_proj(h) + t_emb). h [R, m, d], t [R] (one per block) or [R, m] (one
        per slot) -> [R, m, W]."""
        temb = self.t_mlp(timestep_embedding(t.flatten()).to(h.dtype))  # [R or R m, W]
        temb = temb[:, None, :] if t.dim() == 1 else temb.view(*t.shape, -1)
        return F.silu(self.cond_proj(h) + temb)

    def tokens(self, x_t: Tensor, h: Tensor) -> Tensor:
        """The head's token stream z = in_proj(x_t) + slot_pos [+ cond_in(h)]: [R, m, W]."""
        z = self.in_proj(x_t) + self.slot_pos
        return z if self.cond_in is None else z + self.cond_in(h)

    def use_fused(self, x: Tensor) -> bool:
        """Whether the Triton path runs for tensors like x."""
        if self.force_fused is not None:
            return self.force_fused
        if not (x.is_cuda and self.cfg.fused_head):
            return False
        # The kernels want one dtype throughout (bf16 or fp32 parameters, as DeepSpeed's bf16
        # mode gives), and read weights outside their module's forward, which ZeRO-3's gather
        # hooks would not see (its partitioned parameters carry ds_id): reference path then.
        if torch.is_autocast_enabled(x.device.type) or hasattr(self.out.weight, "ds_id"):
            return False
        from .kernels import HAS_TRITON

        return HAS_TRITON

    def forward(self, x_t: Tensor, t: Tensor, h: Tensor, x_sc: Tensor | None = None) -> Tensor:
        """x_t [R, m, B], t [R] or [R, m], h [R, m, d], x_sc [R, m, B] (self-conditioning)
        -> x0_hat [R, m, B]."""
        if self.use_fused(x_t):
            from .kernels.fused_head import fused_forward

            return fused_forward(self, x_t, t, h, x_sc)
        return self.reference_forward(x_t, t, h, x_sc)

    def reference_forward(
        self, x_t: Tensor, t: Tensor, h: Tensor, x_sc: Tensor | None = None, squash: bool = True
    ) -> Tensor:
        """The PyTorch definition of the head (source of truth for the kernels); squash=False
        returns the pre-tanh output."""
        if self.cfg.self_conditioning:
            x_t = torch.cat([x_t, torch.zeros_like(x_t) if x_sc is None else x_sc], dim=-1)
        y = self.condition(h, t)
        z = self.tokens(x_t, h)  # [R, m, W]
        for blk in self.blocks:
            z = blk(z, y)
        shift, scale = self.final_ada(y).chunk(2, dim=-1)
        out = self.out(modulate(self.final_norm(z), shift, scale))
        return torch.tanh(out) if (squash and self.cfg.head_squash) else out

    # ---- training: noising and loss from integer code words ----------------------------------
    def noise(self, words: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = (1 - t) bits(words) + t eps. words [R, m] int, t [R] or [R, m],
        eps [R, m, B] -> x_t."""
        if t.dim() == 1 and self.use_fused(eps):
            from .kernels.fused_head import fused_noise

            return fused_noise(words, t, eps)
        x0 = words_to_bits(words, eps.shape[-1], eps.dtype)
        tt = t[:, None, None] if t.dim() == 1 else t[..., None]
        return (1 - tt) * x0 + tt * eps

    def loss(
        self,
        x_t: Tensor,
        t: Tensor,
        h: Tensor,
        words: Tensor,
        x_sc: Tensor | None = None,
        slot_weight: Tensor | None = None,
    ) -> Tensor:
        """Head forward + diffusion_loss (cfg.loss) against the bits of words [R, m] -> scalar;
        slot_weight [m] or None (equal)."""
        if self.use_fused(x_t):
            from .kernels.fused_head import fused_loss

            return fused_loss(self, x_t, t, h, words, x_sc, slot_weight)
        x0 = words_to_bits(words, x_t.shape[-1], x_t.dtype)
        out = self.reference_forward(x_t, t, h, x_sc, squash=self.cfg.loss != "bit_ce")
        return diffusion_loss(out, x0, x_t, t, self.cfg.loss, slot_weight)

    # ---- decoding ----------------------------------------------------------------------------
    def guided(self, h: Tensor, cfg_scale: float):
        """x0(x_t, t, x_sc, rows) for conditions h [R, m, d] (rows: a subset of them), with
        batched classifier-free guidance."""
        null = self.null_cond.to(h.dtype)
        full = h if cfg_scale == 1.0 else torch.cat([h, null.expand_as(h)], 0)

        def x0(x: Tensor, t: Tensor, sc: Tensor | None, rows: Tensor | None = None) -> Tensor:
            if cfg_scale == 1.0:
                return self(x, t, h if rows is None else h[rows], sc)
            hh = full if rows is None else torch.cat([h[rows], null.expand_as(h[rows])], 0)
            sc2 = None if sc is None else torch.cat([sc, sc], 0)
            cond, uncond = self(torch.cat([x, x], 0), torch.cat([t, t], 0), hh, sc2).chunk(2, 0)
            return uncond + cfg_scale * (cond - uncond)

        return x0

    @torch.no_grad()
    def sample(
        self,
        h: Tensor,
        codec: BitCodec,
        *,
        steps: int,
        cfg_scale: float,
        temperature: float,
        generator: torch.Generator | None = None,
        known: Tensor | None = None,
        known_mask: Tensor | None = None,
        commit: float = 1.0,
    ) -> tuple[Tensor, Tensor]:
        """One block per row: K Euler steps with guidance, sign() and exact repair.
        h [R, m, d]; known [R, m, B] bits / known_mask [R, m] (inpainting); commit < 1:
        adaptive denoising (euler_sample). Returns (valid code words [R, m] int64, continuous
        x0 [R, m, B]). Adds the head evaluations each block needed to self.sample_evals."""
        if self.use_fused(h) and self.cfg.slot_stagger == 0 and commit >= 1.0:
            self.sample_evals += steps * h.shape[0]
            from .kernels.fused_head import fused_sample_block

            return fused_sample_block(
                self,
                h,
                codec.vocab_size,
                steps=steps,
                cfg_scale=cfg_scale,
                temperature=temperature,
                generator=generator,
                known=known,
                known_mask=known_mask,
            )
        R, m, _ = h.shape
        x, evals = euler_sample(
            self.guided(h, cfg_scale),
            (R, m, self.cfg.num_bits),
            steps,
            device=h.device,
            dtype=h.dtype,
            temperature=temperature,
            generator=generator,
            known=known,
            known_mask=known_mask,
            self_conditioning=self.cfg.self_conditioning,
            stagger=self.cfg.slot_stagger,
            commit=commit,
        )
        self.sample_evals += int(evals.sum())
        return codec.repair(x), x


class SoftmaxHead(nn.Module):
    """Per-slot V-way softmax (the AR baseline and BitLM-softmax). h [..., d] -> logits [..., V]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(h)
