"""DiffusionHead's forward, training loss and block sampler over the Triton kernels.

These functions read the parameters of a reference DiffusionHead (bitlm/head.py), so the fused
and the reference path share one module and one state_dict. What is fused:
    LN + modulate before the slot attention and before the output layer (ln_modulate),
    the attention output projection with its gated residual (linear_gated_residual),
    the whole adaLN MLP sub-block (adaln_mlp), the noising (noise_bits), the loss (fused_bit_loss),
    sign + exact repair (repair_words).
The slot attention over m <= 8 slots (SDPA), the qkv projection and the small
conditioning/input/output linears stay in PyTorch (cuBLAS). Decoding captures the K-step Euler
loop, the batched guidance and the repair in one CUDA graph per (head, shape, steps, guidance)
and replays it: one graph launch per block instead of hundreds of kernel launches."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..codec import words_to_bits
from ..diffusion import diffusion_loss
from ..head import slot_attention
from .bits import noise_bits, repair_words
from .loss import fused_bit_loss
from .mlp import adaln_mlp, linear_gated_residual, ln_modulate

if TYPE_CHECKING:
    from ..head import DiffusionHead

__all__ = ["clear_graphs", "fused_forward", "fused_loss", "fused_noise", "fused_sample_block"]


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


def fused_noise(words: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x_t from code words [R, m], t [R], eps [R, m, B] (kernel (a))."""
    return noise_bits(words, t, eps)


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
    out = fused_forward(head, x_t, t, h, x_sc, squash=False)
    cfg = head.cfg
    if cfg.loss == "bit_ce" or t.dim() != 1 or slot_weight is not None:
        x0 = words_to_bits(words, x_t.shape[-1], out.dtype)
        pred = out if cfg.loss == "bit_ce" or not cfg.head_squash else torch.tanh(out)
        return diffusion_loss(pred, x0, x_t, t, cfg.loss, slot_weight)
    return fused_bit_loss(out, words, t, squash=head.cfg.head_squash, kind=head.cfg.loss)


# ---- decoding ----------------------------------------------------------------------------------
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
) -> tuple[Tensor, Tensor]:
    """The body of euler_sample (bitlm/diffusion.py) with the guided fused head, then repair.
    x [R, m, B] initial noise, hh [R or 2R, m, d] conditions (null rows appended when guided).
    Free of host syncs, so it can be captured in a CUDA graph."""
    R = x.shape[0]
    guided = cfg_scale != 1.0
    ts = torch.linspace(1.0, 0.0, steps + 1, device=x.device)
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
) -> tuple[Tensor, Tensor]:
    """Sample one block per row with the fused head: K Euler steps with batched guidance, then
    sign() and exact repair. Draws its noise exactly as euler_sample does (same generator calls).
    h [R, m, d]; known [R, m, B] bits, known_mask [R, m] bool. Returns (code words [R, m] int64,
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
        return _euler_loop(head, x, hh, steps, cfg_scale, known, known_noise, km, vocab_size)

    key = _graph_key(head, h, steps, cfg_scale, known is not None, vocab_size)
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
