"""The bit-diffusion objective and sampler (method.md section 3). Convention: t = 0 clean,
t = 1 noise, x_t = (1 - t) x0 + t eps; the head predicts x0 (x-prediction)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .config import ModelConfig

__all__ = [
    "ddim_step",
    "diffusion_loss",
    "euler_sample",
    "sample_time",
    "sampler_times",
    "slot_times",
]

# x0_fn(x_t [r, m, B], t [r], x_sc [r, m, B] | None, rows [r] | None, i) -> x0_hat [r, m, B]:
# rows (indices into the R blocks) when only some blocks are still being denoised; i: the step,
# whose schedule position is sampler_times(...)[i]
X0Fn = Callable[[Tensor, Tensor, Tensor | None, Tensor | None, int], Tensor]

V_LOSS_MIN_T = 0.05  # velocity-loss clamp, as in JiT/BitDance


def sample_time(cfg: ModelConfig, n: int, device: torch.device, generator=None) -> Tensor:
    """One t per block: U[0, 1] or logit-normal(mean, std), mapped into [time_min, time_max].
    -> [n]."""
    if cfg.time_sampling == "uniform":
        u = torch.rand(n, device=device, generator=generator)
    else:
        z = torch.randn(n, device=device, generator=generator)
        u = torch.sigmoid(cfg.logit_normal_mean + cfg.logit_normal_std * z)
    return cfg.time_min + (cfg.time_max - cfg.time_min) * u


def slot_times(tau: Tensor, m: int, stagger: float) -> Tensor:
    """Per-slot times of the staggered schedule: t_j = clamp(tau - stagger (m-1-j), 0, 1), so
    slot 0 is the least noisy and each slot is denoised with its predecessors ahead of it.
    tau [...] in [0, 1 + stagger (m-1)] -> [..., m]; stagger 0 gives t_j = tau."""
    offsets = stagger * torch.arange(m - 1, -1, -1, device=tau.device, dtype=torch.float32)
    return (tau[..., None].float() - offsets).clamp(0.0, 1.0)


def diffusion_loss(
    out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, kind: str, slot_weight: Tensor | None = None
) -> Tensor:
    """Mean loss over blocks and bits. out: the head's x0_hat [R, m, B], or for bit_ce its
    pre-squash output (x0_hat = tanh(out)); x0, x_t [R, m, B]; t [R] or [R, m].
    x0_mse: (x0_hat - x0)^2. v_loss: ((x0_hat - x0) / max(t, 0.05))^2, which is the squared
    error of the velocities (x0 - x_t)/max(t, 0.05) since x_t cancels. bit_ce: the binary
    cross-entropy of x0 under P(bit = +1) = (1 + x0_hat)/2 = sigmoid(2 out), in nats; like
    x0_mse it is minimised by the posterior mean E[x0 | x_t, h], so the sampler is unchanged,
    but its gradient does not vanish when tanh saturates on a wrong bit.
    slot_weight [m] weights the slots (normalised; None: equal; BitLM.slot_weight: the decay
    and the curriculum). With per-slot t [R, m], slots at t = 0 (known, clean: x_t = x0) are
    left out of the mean."""
    if kind == "bit_ce":
        err = torch.nn.functional.softplus(-2.0 * out.float() * x0.float())
    else:
        err = (out.float() - x0.float()) ** 2
    if kind == "v_loss":
        tt = t.float().clamp_min(V_LOSS_MIN_T).pow(2)
        err = err / (tt[:, None, None] if tt.dim() == 1 else tt[..., None])
    if slot_weight is None and t.dim() == 1:
        return err.mean()
    w = torch.ones(err.shape[1], device=err.device) if slot_weight is None else slot_weight
    w = w.float().expand(err.shape[:2])  # [R, m]
    if t.dim() == 2:
        w = w * (t > 0)
    return (err.mean(-1) * w).sum() / w.sum().clamp_min(1e-12)


def sampler_times(
    steps: int, m: int = 1, stagger: float = 0.0, device=None, shift: float = 1.0
) -> Tensor:
    """The schedule positions of euler_sample's steps: from 1 + stagger (m - 1) down to 0 in
    steps (stagger 0) or ceil(steps (1 + stagger (m - 1))) equal steps; shift != 1 (stagger 0
    only) maps each t to shift t / (1 + (shift - 1) t). -> [n + 1]."""
    span = 1.0 + stagger * (m - 1)
    n = steps if stagger == 0 else math.ceil(steps * span)
    t = torch.linspace(span, 0.0, n + 1, device=device)
    if shift != 1.0:
        if stagger:
            raise ValueError("sampler_times: shift needs stagger 0")
        t = shift * t / (1 + (shift - 1) * t)
    return t


@torch.no_grad()
def ddim_step(x: Tensor, x0: Tensor, t: Tensor, s: Tensor, eta: float, z: Tensor) -> Tensor:
    """One step t -> s < t on x_t = (1 - t) x0 + t eps: x_s = (1 - s) x0 + sqrt(s^2 - c^2)
    eps_hat + c z with eps_hat = (x_t - (1 - t) x0) / t and c^2 = eta^2 Var q(x_s | x_t, x0)
    (the DDPM posterior). eta = 0 is the Euler step of the ODE, eta = 1 the ancestral sampler.
    t, s: scalars or broadcastable to x; z: fresh standard noise like x."""
    t = t.clamp_min(1e-6)
    a_ts = (1 - t) / (1 - s).clamp_min(1e-6)  # alpha_{t|s}
    var_ts = (t**2 - a_ts**2 * s**2).clamp_min(0)  # sigma^2_{t|s}
    c2 = eta**2 * var_ts * s**2 / t**2
    eps_hat = (x - (1 - t) * x0) / t
    return (1 - s) * x0 + (s**2 - c2).clamp_min(0).sqrt() * eps_hat + c2.sqrt() * z


def euler_sample(
    x0_fn: X0Fn,
    shape: tuple[int, ...],
    steps: int,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    known: Tensor | None = None,
    known_mask: Tensor | None = None,
    self_conditioning: bool = False,
    stagger: float = 0.0,
    commit: float = 1.0,
    eta: float = 0.0,
    bit_stagger: float = 0.0,
    shift: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """K Euler steps of the probability-flow ODE from x_1 ~ N(0, temperature^2 I) to t = 0:
    x <- x + (t_next - t) (x - x0_hat) / t. Returns (the continuous x_0 [R, m, B], the head
    evaluations each row needed [R]).

    known [R, m, B] / known_mask [R, m] (bool): inpainting; known slots are held at their noised
    true values (one fixed noise draw) during denoising and set to the true bits at the end.
    stagger > 0: per-slot times (slot_times) along tau from 1 + stagger (m-1) to 0, in
    ceil(K (1 + stagger (m-1))) steps so that each slot still gets about K.
    commit < 1: adaptive denoising. A block (row) whose every free bit has |x0_hat| > commit
    with the same sign as at the previous evaluation jumps to x = x0_hat (t = 0) and is frozen;
    only the rows still running are evaluated, and the loop ends when every row is done.
    commit = 1 (the default) is the fixed-K sampler.
    eta > 0: stochastic steps (ddim_step); eta = 0 is the Euler step above.
    shift != 1: the steps' times are shifted (sampler_times; stagger 0 only).
    bit_stagger > 0: the K steps run over schedule positions (what x0_fn is given); each bit
    steps between its own times (slot_times over the B bits, DiffusionHead.bit_times)."""
    x = torch.randn(shape, device=device, generator=generator, dtype=torch.float32) * temperature
    x = x.to(dtype)
    if known is not None:
        known_noise = torch.randn(shape, device=device, generator=generator).to(dtype)
        km = known_mask[..., None]
    m = shape[1]
    taus = sampler_times(steps, m, stagger, device, shift)
    n = len(taus) - 1
    x_sc = prev = None
    done = torch.zeros(shape[0], dtype=torch.bool, device=device)  # committed rows
    evals = torch.zeros(shape[0], dtype=torch.long, device=device)
    for i in range(n):
        if stagger == 0:
            t, t_next = taus[i], taus[i + 1]
            tt = t.expand(shape[0])  # [R]
        else:
            t = slot_times(taus[i], m, stagger).to(dtype)[:, None]  # [m, 1]
            t_next = slot_times(taus[i + 1], m, stagger).to(dtype)[:, None]
            tt = t[:, 0].expand(shape[0], m)  # [R, m]
        if bit_stagger > 0:  # per-bit times [B] of this step's two schedule positions
            bspan = 1 + bit_stagger * (shape[-1] - 1)
            t = slot_times(t * bspan, shape[-1], bit_stagger).to(dtype)
            t_next = slot_times(t_next * bspan, shape[-1], bit_stagger).to(dtype)
        if known is not None:
            x = torch.where(km, (1 - t) * known + t * known_noise, x)
        if commit < 1.0 and done.any():  # evaluate the blocks still running only
            rows = (~done).nonzero()[:, 0]
            sc = None if x_sc is None else x_sc[rows]
            x0 = prev.clone()
            x0[rows] = x0_fn(x[rows], tt[rows], sc, rows, i)
        else:
            x0 = x0_fn(x, tt, x_sc, None, i)
        evals += ~done
        x_sc = x0 if self_conditioning else None
        # slots (bits) already clean (t = 0) or not started (t = t_next = 1) do not move
        if eta > 0:
            z = torch.randn(shape, device=device, generator=generator).to(dtype) * temperature
            step = ddim_step(x, x0, t, t_next, eta, z)
        else:
            step = x + (t_next - t) * (x - x0) / t.clamp_min(1e-6)
        if commit >= 1.0 or prev is None:
            x, prev = step, x0
            continue
        sure = (x0.abs() > commit) & (torch.sign(x0) == torch.sign(prev))
        if known is not None:
            sure |= km
        ready = sure.flatten(1).all(-1) & ~done  # [R]
        x = torch.where(done[:, None, None], x, torch.where(ready[:, None, None], x0, step))
        done |= ready
        prev = x0
        if bool(done.all()):
            break
    if known is not None:
        x = torch.where(km, known, x)
    return x, evals
