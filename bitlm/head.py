"""Output heads. The diffusion head (reference PyTorch path, and the same head over the
Triton kernels of bitlm/kernels/: one module, one state_dict) and the per-slot softmax head of
the baselines.

Diffusion head, per target block of m slots:
    z   = Linear(B -> W)(x_t [; x0_selfcond]) + slot_pos [+ Linear(d -> W)(h)]   [R, m, W]
    y   = SiLU(Linear(d -> W)(h) + TimeMLP(sinusoid(1000 t)))            [R, m, W]
    z   = AdaLNBlock(z, y) x depth  (self-attention among the m slots, then an MLP; shift, scale
          and gate from y, zero-initialised)
    out = Linear(W -> B)(modulate(LayerNorm(z), y))                      [R, m, B]
    out = out + (1 - t) x_t / t^2   if head_posterior_skip (per-bit evidence of x_t, clamped)
    x0_hat = tanh(out) if head_squash else out

Dispatch: the fused Triton path (the end of this file, over bitlm/kernels/) runs on CUDA tensors
when cfg.fused_head is True and Triton imports; cfg.fused_head=False forces this reference path,
which also runs on CPU. Both read the same parameters, so checkpoints interchange.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .codec import BitCodec, words_to_bits
from .config import ModelConfig
from .diffusion import diffusion_loss, euler_sample, sampler_times, slot_times

__all__ = [
    "AdaLNBlock",
    "DiffusionHead",
    "SoftmaxHead",
    "clear_graphs",
    "modulate",
    "posterior_skip",
    "slot_attention",
    "timestep_embedding",
]


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of 1000 t. t [R] -> [R, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None, :]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def posterior_skip(x_t: Tensor, t: Tensor, limit: float = 30.0) -> Tensor:
    """Half the log-odds that bit k is +1 given x_t,k alone, for a uniform bit under
    x_t = (1 - t) x0 + t eps: (1 - t) x_t / t^2 [R, m, B] (t broadcastable to x_t, as
    DiffusionHead.bit_times gives it), clamped to +-limit (tanh is 1 to float precision
    there), so tanh of it is E[x0 | x_t]."""
    t = t.to(x_t.dtype)
    return ((1 - t) * x_t / t.square().clamp_min(1e-12)).clamp(-limit, limit)


def slot_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Full attention among the m slots of each block: [R, heads, m, hd] -> [R, heads, m, hd].
    On CUDA explicit math: m is 4-8, and SDPA's fused backends fail on very large R x heads
    (cuDNN's raised at 262k blocks on an H200). Elsewhere SDPA, which equals the math to
    ~5e-7 and measured 2.5x faster on CPU for training and 3x for a decode step."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v)
    att = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5  # [R, heads, m, m]
    return att.softmax(-1).to(v.dtype) @ v


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class AdaLNBlock(nn.Module):
    """x + g1 * Attn(mod(LN(x))) ; x + g2 * MLP(mod(LN(x))), modulation from the condition y.
    mix=False: no attention among slots; each slot attends to itself only, i.e. Attn = proj(v)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, mix: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.mix = mix
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width if mix else width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def attn(self, x: Tensor) -> Tensor:
        if not self.mix:
            return self.proj(self.qkv(x))
        R, m, W = x.shape
        q, k, v = self.qkv(x).view(R, m, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        y = slot_attention(q, k, v)  # [R, heads, m, W/heads]
        return self.proj(y.transpose(1, 2).reshape(R, m, W))

    def mlp(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(x)))

    def modulation(self, y: Tensor) -> tuple[Tensor, ...]:
        """(shift1, 1 + scale1, gate1, shift2, 1 + scale2, gate2), each [..., W], from y."""
        s1, c1, g1, s2, c2, g2 = self.ada(y).chunk(6, dim=-1)
        return s1, 1 + c1, g1, s2, 1 + c2, g2

    def forward(self, x: Tensor, mod: tuple[Tensor, ...]) -> Tensor:
        """x [R, m, W], mod: modulation(y) -> [R, m, W]."""
        s1, c1, g1, s2, c2, g2 = mod
        x = torch.addcmul(x, g1, self.attn(torch.addcmul(s1, self.norm1(x), c1)))
        return torch.addcmul(x, g2, self.mlp(torch.addcmul(s2, self.norm2(x), c2)))


# The modulations of every adaLN layer of a head for one condition y: per block
# AdaLNBlock.modulation(y), then the final layer's (shift, 1 + scale). They depend on h and t
# only, not on x_t, so a sampler computes them for all K steps of a block at once.
HeadModulation = tuple[list[tuple[Tensor, ...]], tuple[Tensor, Tensor]]


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
            AdaLNBlock(W, cfg.head_heads, cfg.head_mlp_ratio, mix=not cfg.slot_prefix)
            for _ in range(cfg.head_depth)
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
        """y = SiLU(cond_proj(h) + t_emb). h [R, m, d] with t [R] (one per block) or [R, m] (one
        per slot), or any t whose shape is a prefix of h's leading dims up to broadcasting (the
        sampler's all-steps form: h [1, R, m, d], t [K, 1, 1]) -> [..., m, W]."""
        temb = self.t_mlp(timestep_embedding(t.flatten()).to(h.dtype))  # [t.numel(), W]
        temb = temb.view(*t.shape, *(1,) * (h.dim() - 1 - t.dim()), -1)
        return F.silu(self.cond_proj(h) + temb)

    def modulations(self, h: Tensor, t: Tensor) -> HeadModulation:
        """Every adaLN modulation for conditions h and times t (shapes as in condition)."""
        y = self.condition(h, t)
        shift, scale = self.final_ada(y).chunk(2, dim=-1)
        return [blk.modulation(y) for blk in self.blocks], (shift, 1 + scale)

    def tokens(self, x_t: Tensor, h: Tensor, slot: int | None = None) -> Tensor:
        """The head's token stream z = in_proj(x_t) + slot_pos [+ cond_in(h)]: [R, m, W]
        (slot: x_t [R, 1, B] is that one slot of the block)."""
        pos = self.slot_pos if slot is None else self.slot_pos[slot : slot + 1]
        z = self.in_proj(x_t) + pos
        return z if self.cond_in is None else z + self.cond_in(h)

    def use_fused(self, x: Tensor) -> bool:
        """Whether the Triton path runs for tensors like x."""
        if self.force_fused is not None:
            return self.force_fused
        if not (x.is_cuda and self.cfg.fused_head) or self.cfg.slot_prefix:
            return False  # the kernels implement the slot attention of slot_prefix=0 only
        if self.cfg.head_posterior_skip or self.cfg.bit_stagger:
            return False  # nor the posterior skip or per-bit times
        # The kernels want one dtype throughout (bf16 or fp32 parameters, as DeepSpeed's bf16
        # mode gives), and read weights outside their module's forward, which ZeRO-3's gather
        # hooks would not see (its partitioned parameters carry ds_id): reference path then.
        if torch.is_autocast_enabled(x.device.type) or hasattr(self.out.weight, "ds_id"):
            return False
        from .kernels import HAS_TRITON

        return HAS_TRITON

    def forward(
        self, x_t: Tensor, t: Tensor, h: Tensor, x_sc: Tensor | None = None, slot: int | None = None
    ) -> Tensor:
        """x_t [R, m, B], t [R] or [R, m], h [R, m, d], x_sc [R, m, B] (self-conditioning)
        -> x0_hat [R, m, B]. slot (slot_prefix decoding, whose slots are independent): the
        inputs are that one slot of each block, m = 1."""
        if self.use_fused(x_t):
            return fused_forward(self, x_t, t, h, x_sc)
        return self.reference_forward(x_t, t, h, x_sc, slot=slot)

    def reference_forward(
        self,
        x_t: Tensor,
        t: Tensor,
        h: Tensor,
        x_sc: Tensor | None = None,
        squash: bool = True,
        slot: int | None = None,
        mods: HeadModulation | None = None,
    ) -> Tensor:
        """The PyTorch definition of the head (source of truth for the kernels); squash=False
        returns the pre-tanh output; mods: modulations(h, t), when the caller has them."""
        skip = posterior_skip(x_t, self.bit_times(t)) if self.cfg.head_posterior_skip else None
        if self.cfg.self_conditioning:
            x_t = torch.cat([x_t, torch.zeros_like(x_t) if x_sc is None else x_sc], dim=-1)
        block_mods, (shift, scale) = self.modulations(h, t) if mods is None else mods
        z = self.tokens(x_t, h, slot)  # [R, m, W]
        for blk, mod in zip(self.blocks, block_mods, strict=True):
            z = blk(z, mod)
        out = self.out(torch.addcmul(shift, self.final_norm(z), scale))
        if skip is not None:
            out = out + skip
        return torch.tanh(out) if (squash and self.cfg.head_squash) else out

    # ---- training: noising and loss from integer code words ----------------------------------
    def bit_times(self, t: Tensor) -> Tensor:
        """The times of the bits at schedule position t [R] or [R, m], broadcastable to
        [R, m, B]: t itself ([R, 1, 1] or [R, m, 1]), or with bit_stagger s the per-bit times
        [R, 1, B] or [R, m, B] (slot_times over the bits, the most significant least noisy)."""
        s, B = self.cfg.bit_stagger, self.cfg.num_bits
        if s == 0:
            return t[:, None, None] if t.dim() == 1 else t[..., None]
        tb = slot_times(t * (1 + s * (B - 1)), B, s).to(t.dtype)
        return tb[:, None, :] if t.dim() == 1 else tb

    def noise(self, words: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = (1 - t) bits(words) + t eps. words [R, m] int, t [R] or [R, m] (schedule
        positions: bit_times), eps [R, m, B] -> x_t."""
        if t.dim() == 1 and self.use_fused(eps):
            from .kernels.bits import noise_bits

            return noise_bits(words, t, eps)
        x0 = words_to_bits(words, eps.shape[-1], eps.dtype)
        tt = self.bit_times(t)
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
            return fused_loss(self, x_t, t, h, words, x_sc, slot_weight)
        x0 = words_to_bits(words, x_t.shape[-1], x_t.dtype)
        out = self.reference_forward(x_t, t, h, x_sc, squash=self.cfg.loss != "bit_ce")
        return diffusion_loss(out, x0, x_t, t, self.cfg.loss, slot_weight)

    # ---- decoding ----------------------------------------------------------------------------
    def guided(
        self, h: Tensor, cfg_scale: float, slot: int | None = None, times: Tensor | None = None
    ):
        """x0(x_t, t, x_sc, rows, i) for conditions h [R, m, d] (rows: a subset of them), with
        batched classifier-free guidance; slot: h is that one slot of each block. times [n]:
        the schedule positions of the n steps, when every block is at the same position at a
        step: the head's modulations of all n steps are computed here in one batch, and each
        evaluation runs only the token stream (t then reaches only the posterior skip)."""
        null = self.null_cond.to(h.dtype)
        guide = cfg_scale != 1.0
        full = torch.cat([h, null.expand_as(h)], 0) if guide else h  # [R or 2R, m, d]
        plan: list[HeadModulation] = []  # per step
        if times is not None and not self.use_fused(h):
            blocks, (shift, scale) = self.modulations(full[None], times[:, None, None])
            per_block = [[u.unbind(0) for u in mod] for mod in blocks]  # [n] views [R', m, W]
            for i in range(len(times)):
                plan.append(([tuple(u[i] for u in mod) for mod in per_block], (shift[i], scale[i])))

        def at(i: int, rows: Tensor | None) -> HeadModulation | None:
            """The modulations of step i for the rows (and their null copies when guided)."""
            if not plan or rows is None:
                return plan[i] if plan else None
            if guide:
                rows = torch.cat([rows, rows + h.shape[0]])
            blocks, final = plan[i]
            return [tuple(u[rows] for u in mod) for mod in blocks], tuple(u[rows] for u in final)

        def head(x: Tensor, t: Tensor, hh: Tensor, sc: Tensor | None, mods) -> Tensor:
            if mods is None:
                return self(x, t, hh, sc, slot)
            return self.reference_forward(x, t, hh, sc, slot=slot, mods=mods)

        def x0(
            x: Tensor, t: Tensor, sc: Tensor | None, rows: Tensor | None = None, i: int = 0
        ) -> Tensor:
            mods = at(i, rows)
            if not guide:
                return head(x, t, h if rows is None else h[rows], sc, mods)
            hh = full if rows is None else torch.cat([h[rows], null.expand_as(h[rows])], 0)
            sc2 = None if sc is None else torch.cat([sc, sc], 0)
            xx, tt = torch.cat([x, x], 0), torch.cat([t, t], 0)
            cond, uncond = head(xx, tt, hh, sc2, mods).chunk(2, 0)
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
        slot: int | None = None,
        eta: float = 0.0,
        shift: float = 1.0,
    ) -> tuple[Tensor, Tensor]:
        """One block per row: K Euler steps with guidance, sign() and exact repair.
        h [R, m, d]; known [R, m, B] bits / known_mask [R, m] (inpainting); commit < 1:
        adaptive denoising (euler_sample); slot: h [R, 1, d] is that one slot of each block
        (slot_prefix decoding); eta > 0: stochastic steps (ddim_step); shift: the time shift of
        the steps (sampler_times). Returns (valid code
        words [R, m] int64, continuous x0 [R, m, B]). Adds the head evaluations each block
        needed to self.sample_evals."""
        if self.use_fused(h) and self.cfg.slot_stagger == 0 and commit >= 1.0 and eta == 0:
            self.sample_evals += steps * h.shape[0]
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
                shift=shift,
            )
        R, m, _ = h.shape
        stagger = self.cfg.slot_stagger
        times = None  # per-step positions shared by every block: modulations planned ahead
        if stagger == 0 and self.cfg.bit_stagger == 0:
            times = sampler_times(steps, device=h.device, shift=shift)[:-1]
        x, evals = euler_sample(
            self.guided(h, cfg_scale, slot, times),
            (R, m, self.cfg.num_bits),
            steps,
            device=h.device,
            dtype=h.dtype,
            temperature=temperature,
            generator=generator,
            known=known,
            known_mask=known_mask,
            self_conditioning=self.cfg.self_conditioning,
            stagger=stagger,
            commit=commit,
            eta=eta,
            bit_stagger=self.cfg.bit_stagger,
            shift=shift,
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


# ---- the fused path: DiffusionHead over the Triton kernels (bitlm/kernels/) ---------------------
# These functions read the parameters of a DiffusionHead, so the fused and the reference path
# share one module and one state_dict. What is fused: LN + modulate before the slot attention
# and before the output layer (ln_modulate), the attention output projection with its gated
# residual (linear_gated_residual), the whole adaLN MLP sub-block (adaln_mlp), the noising
# (noise_bits), the loss (fused_bit_loss), sign + exact repair (repair_words). The slot attention
# over m <= 8 slots, the qkv projection and the small conditioning/input/output linears stay in
# PyTorch (cuBLAS). Decoding captures the K-step Euler loop, the batched guidance and the repair
# in one CUDA graph per (head, shape, steps, guidance) and replays it: one graph launch per block
# instead of hundreds of kernel launches.
def fused_forward(
    head: DiffusionHead,
    x_t: Tensor,
    t: Tensor,
    h: Tensor,
    x_sc: Tensor | None = None,
    squash: bool = True,
) -> Tensor:
    """Same as DiffusionHead.forward. x_t [R, m, B], t [R] or [R, m], h [R, m, d] -> [R, m, B]
    (pre-squash when squash=False)."""
    from .kernels.mlp import adaln_mlp, linear_gated_residual, ln_modulate

    cfg = head.cfg
    if cfg.self_conditioning:
        x_t = torch.cat([x_t, torch.zeros_like(x_t) if x_sc is None else x_sc], dim=-1)
    y = head.condition(h, t)  # [R, m, W]
    z = head.tokens(x_t, h)  # [R, m, W]
    R, m, W = z.shape
    for blk in head.blocks:
        s1, c1, g1, s2, c2, g2 = blk.ada(y).chunk(6, dim=-1)  # views [R, m, W]
        qkv = blk.qkv(ln_modulate(z, s1, c1)).view(R, m, 3, blk.heads, W // blk.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [R, heads, m, W/heads] each
        a = slot_attention(q, k, v).transpose(1, 2)  # [R, m, heads, W/heads]
        z = linear_gated_residual(a.reshape(R, m, W), blk.proj, g1, z)  # z + g1 proj(a)
        z = adaln_mlp(z, s2, c2, g2, blk.fc1, blk.fc2)
    shift, scale = head.final_ada(y).chunk(2, dim=-1)
    out = head.out(ln_modulate(z, shift, scale))  # [R, m, B]
    return torch.tanh(out) if (squash and cfg.head_squash) else out


def fused_loss(
    head: DiffusionHead,
    x_t: Tensor,
    t: Tensor,
    h: Tensor,
    words: Tensor,
    x_sc: Tensor | None = None,
    slot_weight: Tensor | None = None,
) -> Tensor:
    """Head forward + the fused loss (kernel (c)); the clean bits come from words [R, m]."""
    from .kernels.loss import fused_bit_loss

    out = fused_forward(head, x_t, t, h, x_sc, squash=False)
    cfg = head.cfg
    if cfg.loss == "bit_ce" or t.dim() != 1 or slot_weight is not None:
        x0 = words_to_bits(words, x_t.shape[-1], out.dtype)
        pred = out if cfg.loss == "bit_ce" or not cfg.head_squash else torch.tanh(out)
        return diffusion_loss(pred, x0, x_t, t, cfg.loss, slot_weight)
    return fused_bit_loss(out, words, t, squash=head.cfg.head_squash, kind=head.cfg.loss)


def _euler_loop(
    head: DiffusionHead,
    x: Tensor,
    hh: Tensor,
    steps: int,
    cfg_scale: float,
    known: Tensor | None,
    known_noise: Tensor | None,
    km: Tensor | None,
    vocab_size: int,
    shift: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """The body of euler_sample (bitlm/diffusion.py) with the guided fused head, then repair.
    x [R, m, B] initial noise, hh [R or 2R, m, d] conditions (null rows appended when guided).
    Free of host syncs, so it can be captured in a CUDA graph."""
    from .kernels.bits import repair_words

    R = x.shape[0]
    guided = cfg_scale != 1.0
    ts = sampler_times(steps, device=x.device, shift=shift)
    x_sc = None
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        if known is not None:
            x = torch.where(km, (1 - t) * known + t * known_noise, x)
        if guided:
            sc2 = None if x_sc is None else torch.cat([x_sc, x_sc], 0)
            out = fused_forward(head, torch.cat([x, x], 0), t.expand(2 * R), hh, sc2)
            cond, uncond = out.chunk(2, 0)
            x0 = uncond + cfg_scale * (cond - uncond)
        else:
            x0 = fused_forward(head, x, t.expand(R), hh, x_sc)
        x_sc = x0 if head.cfg.self_conditioning else None
        x = x + (t_next - t) * (x - x0) / t
    if known is not None:
        x = torch.where(km, known, x)
    return repair_words(x, vocab_size), x


_GRAPHS: dict[tuple, tuple] = {}


def _graph_key(head: DiffusionHead, h: Tensor, *args) -> tuple:
    params = tuple(p.data_ptr() for p in head.parameters())  # a moved head needs a new graph
    return (id(head), params, tuple(h.shape), h.dtype, h.device, *args)


@torch.no_grad()
def fused_sample_block(
    head: DiffusionHead,
    h: Tensor,
    vocab_size: int,
    *,
    steps: int,
    cfg_scale: float,
    temperature: float,
    generator: torch.Generator | None = None,
    known: Tensor | None = None,
    known_mask: Tensor | None = None,
    use_graph: bool | None = None,
    shift: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Sample one block per row with the fused head: K Euler steps with batched guidance, then
    sign() and exact repair. Draws its noise exactly as euler_sample does (same generator calls).
    h [R, m, d]; known [R, m, B] bits, known_mask [R, m] bool; shift: the time shift of the
    steps (sampler_times). Returns (code words [R, m] int64,
    continuous x0 [R, m, B]). use_graph (default: on CUDA) replays a cached CUDA graph."""
    R, m, _ = h.shape
    shape = (R, m, head.cfg.num_bits)
    dev, dtype = h.device, h.dtype
    x = torch.randn(shape, device=dev, generator=generator, dtype=torch.float32) * temperature
    x = x.to(dtype)
    known_noise = km = None
    if known is not None:
        known_noise = torch.randn(shape, device=dev, generator=generator).to(dtype)
        km = known_mask[..., None]
        known = known.to(dtype)
    hh = h
    if cfg_scale != 1.0:
        hh = torch.cat([h, head.null_cond.to(dtype).expand_as(h)], 0)  # [2R, m, d]
    if use_graph is None:
        use_graph = h.is_cuda
    if not use_graph:
        return _euler_loop(head, x, hh, steps, cfg_scale, known, known_noise, km, vocab_size, shift)

    key = _graph_key(head, h, steps, cfg_scale, known is not None, vocab_size, shift)
    entry = _GRAPHS.get(key)
    if entry is None:
        static = {"x": x.clone(), "hh": hh.clone()}
        if known is not None:
            static |= {"known": known.clone(), "noise": known_noise.clone(), "km": km.clone()}
        run = lambda: _euler_loop(
            head,
            static["x"],
            static["hh"],
            steps,
            cfg_scale,
            static.get("known"),
            static.get("noise"),
            static.get("km"),
            vocab_size,
            shift,
        )
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: compiles kernels, initialises cuBLAS
            run()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = run()
        entry = _GRAPHS[key] = (graph, static, outputs)
    graph, static, (words, x0) = entry
    static["x"].copy_(x)
    static["hh"].copy_(hh)
    if known is not None:
        static["known"].copy_(known)
        static["noise"].copy_(known_noise)
        static["km"].copy_(km)
    graph.replay()
    return words.clone(), x0.clone()


def clear_graphs() -> None:
    """Drop every cached decoding graph (frees their memory pools)."""
    _GRAPHS.clear()
