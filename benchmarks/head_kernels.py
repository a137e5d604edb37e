"""Benchmark of the fused diffusion-head kernels (issue 6) against the reference PyTorch head.

Correctness first (fresh random inputs and parameters, never zeros), then timings:
  train:   noising + head forward + loss + backward at realistic sizes (head width 1024, B = 18,
           m = 4, 64k tokens x diffusion_batch_mul 4 = 65,536 blocks): fused vs eager vs
           torch.compile (eager reference compiled), and the adaLN MLP sub-block alone.
  decode:  latency per block (K = 15 Euler steps, guidance 9 batched, sign + repair) at batch 1 and
           16: fused (one CUDA-graph replay) vs eager.
  share:   the head's share of one full BitLM decode step (sample the block + one backbone call
           over its m tokens with a KV cache) for a ~0.3B backbone at a 1k-token context.
CUDA timings use CUDA events after warm-up, medians of many runs; CPU timings use a host clock.
Writes JSON to benchmarks/results/head_kernels.json (or --out).

    python benchmarks/head_kernels.py                 # GPU, realistic sizes
    python benchmarks/head_kernels.py --quick         # tiny sizes; on CPU runs the kernels in
                                                      # Triton's interpreter (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():  # kernels on CPU tensors run only in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bitlm import BitLM, ModelConfig  # noqa: E402
from bitlm.backbone import KVCache  # noqa: E402
from bitlm.codec import words_to_bits  # noqa: E402
from bitlm.diffusion import diffusion_loss  # noqa: E402
from bitlm.head import DiffusionHead, modulate  # noqa: E402
from bitlm.kernels.mlp import adaln_mlp  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/head_kernels.json"))
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--tokens", type=int, default=65_536, help="tokens per training step")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--iters", type=int, default=0, help="timed runs (0: 30 GPU / 3 CPU)")
    return p.parse_args()


# ---- helpers ---------------------------------------------------------------------------------
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn: Callable[[], object], dev: torch.device, iters: int, warmup: int) -> dict:
    """Median (and spread) of per-call milliseconds after warm-up."""
    for _ in range(warmup):
        fn()
    sync(dev)
    ms = []
    for _ in range(iters):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
    ms.sort()
    q = lambda f: ms[min(len(ms) - 1, int(f * len(ms)))]
    return {"median_ms": statistics.median(ms), "p10_ms": q(0.1), "p90_ms": q(0.9), "runs": iters}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def randomise(mod: torch.nn.Module, seed: int) -> None:
    """Fresh non-zero parameters (the head zero-initialises its adaLN and output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mod.named_parameters():
            std = 1.0 / math.sqrt(p.shape[-1]) if p.dim() == 2 else 0.02
            if "norm" in name and p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def peak_mem(dev: torch.device, fn: Callable[[], object]) -> float | None:
    if dev.type != "cuda":
        fn()
        return None
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    sync(dev)
    return (torch.cuda.max_memory_allocated(dev) - base) / 2**30


class TrainInputs:
    """One step's head inputs: R blocks of m slots. Fresh random values on every build."""

    def __init__(self, cfg: ModelConfig, R: int, dev: torch.device, dtype: torch.dtype, seed: int):
        g = torch.Generator(device=dev).manual_seed(seed)
        m, B = cfg.block_size, cfg.num_bits
        self.words = torch.randint(0, cfg.vocab_size, (R, m), device=dev, generator=g)
        self.t = torch.rand(R, device=dev, generator=g).to(dtype)
        self.eps = torch.randn(R, m, B, device=dev, generator=g).to(dtype)
        self.h = torch.randn(R, m, cfg.d_model, device=dev, generator=g).to(dtype)


def head_step(head: DiffusionHead, inp: TrainInputs, fused: bool) -> torch.Tensor:
    """Noising + head + loss + backward (parameter grads, and the conditions' grad)."""
    head.force_fused = fused
    h = inp.h.requires_grad_()
    x_t = head.noise(inp.words, inp.t, inp.eps)
    loss = head.loss(x_t, inp.t, h, inp.words)
    loss.backward()
    return loss


def reference_step_fn(head: DiffusionHead) -> Callable:
    """The eager reference step as one function (what torch.compile gets)."""

    def step(words, t, eps, h):
        x0 = words_to_bits(words, eps.shape[-1], eps.dtype)
        x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * eps
        x0_hat = head.reference_forward(x_t, t, h)
        return diffusion_loss(x0_hat, x0, x_t, t, head.cfg.loss)

    return step


def zero_grads(*mods_or_tensors) -> None:
    for x in mods_or_tensors:
        if isinstance(x, torch.nn.Module):
            for p in x.parameters():
                p.grad = None
        else:
            x.grad = None


# ---- sections --------------------------------------------------------------------------------
def correctness(cfg: ModelConfig, dev, dtype, R: int) -> dict:
    """Fused vs reference on fresh random inputs: loss, every gradient, sampled blocks."""
    out = {}
    head32 = DiffusionHead(cfg).to(dev)
    randomise(head32, seed=11)
    for name, dt in {"fp32": torch.float32, str(dtype).split(".")[-1]: dtype}.items():
        if name == "float32":
            continue
        head = copy.deepcopy(head32).to(dt)
        inp = TrainInputs(cfg, R, dev, dt, seed=12)
        res = {}
        for fused in (False, True):
            zero_grads(head, inp.h)
            loss = head_step(head, inp, fused)
            grads = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
            grads["h"] = inp.h.grad.clone()
            res[fused] = (loss.detach(), grads)
        # fp32 reference on the same (rounded) parameters and inputs, for the bf16 comparison
        ref32 = copy.deepcopy(head).float()
        inp32 = copy.copy(inp)
        inp32.t, inp32.eps = inp.t.float(), inp.eps.float()
        inp32.h = inp.h.detach().float()
        zero_grads(ref32)
        loss32 = head_step(ref32, inp32, False)
        g32 = {n: p.grad for n, p in ref32.named_parameters() if p.grad is not None}
        g32["h"] = inp32.h.grad
        worst = lambda d, g32=g32: max(rel(d[k], g32[k]) for k in g32)
        out[name] = {
            "loss_ref": float(res[False][0]),
            "loss_fused": float(res[True][0]),
            "loss_rel_err_vs_fp32": {
                "reference": rel(res[False][0], loss32),
                "fused": rel(res[True][0], loss32),
            },
            "max_grad_rel_err_vs_fp32": {
                "reference": worst(res[False][1]),
                "fused": worst(res[True][1]),
            },
            "max_grad_rel_err_fused_vs_ref": max(
                rel(res[True][1][k], res[False][1][k]) for k in g32
            ),
        }
    # decoding: same noise draws, so the fused and the eager sampler should agree
    from bitlm.codec import BitCodec

    codec = BitCodec(cfg.vocab_size)
    h = torch.randn(4, cfg.block_size, cfg.d_model, device=dev).to(dtype)
    head = copy.deepcopy(head32).to(dtype)
    samples = {}
    for fused in (False, True):
        head.force_fused = fused
        gen = torch.Generator(device=dev).manual_seed(5)
        samples[fused] = head.sample(
            h,
            codec,
            steps=cfg.sample_steps,
            cfg_scale=cfg.cfg_scale,
            temperature=1.0,
            generator=gen,
        )
    (w0, x0), (w1, x1) = samples[False], samples[True]
    out["decode"] = {
        "x_rel_err": rel(x1.float(), x0.float()),
        "words_agree": float((w0 == w1).float().mean()),
        "all_valid": bool((w1 < cfg.vocab_size).all()),
    }
    ok32 = (
        out["fp32"]["max_grad_rel_err_fused_vs_ref"] < 1e-3
        and out["fp32"]["loss_rel_err_vs_fp32"]["fused"] < 1e-4
    )
    lp = out.get("bfloat16")
    ok_lp = lp is None or (
        lp["max_grad_rel_err_vs_fp32"]["fused"]
        <= 3 * lp["max_grad_rel_err_vs_fp32"]["reference"] + 1e-2
    )
    out["ok"] = bool(ok32 and ok_lp and out["decode"]["all_valid"])
    return out


def bench_train(cfg, dev, dtype, R: int, iters: int, warmup: int, compile_: bool) -> dict:
    head = DiffusionHead(cfg).to(dev, dtype)
    randomise(head, seed=21)
    inp = TrainInputs(cfg, R, dev, dtype, seed=22)
    res: dict = {"blocks": R, "rows": R * cfg.block_size}

    losses = {}

    def run(fused):
        def fn():
            zero_grads(head, inp.h)
            losses[fused] = head_step(head, inp, fused).detach()

        return fn

    for name, fused in (("eager", False), ("fused", True)):
        res[name] = timeit(run(fused), dev, iters, warmup)
        res[name]["peak_gib"] = peak_mem(dev, run(fused))
    # same inputs and parameters: the full-size losses must agree
    res["loss_rel_diff_fused_vs_eager"] = rel(losses[True].float(), losses[False].float())
    if compile_:
        step = torch.compile(reference_step_fn(head), dynamic=False)

        def comp():
            zero_grads(head, inp.h)
            step(inp.words, inp.t, inp.eps, inp.h.requires_grad_()).backward()

        try:
            t0 = time.perf_counter()
            comp()
            sync(dev)
            res["compile"] = {"compile_s": time.perf_counter() - t0}
            res["compile"] |= timeit(comp, dev, iters, warmup)
            res["compile"]["peak_gib"] = peak_mem(dev, comp)
        except Exception as e:  # a compiler failure is a result, not a reason to stop
            res["compile"] = {"error": f"{type(e).__name__}: {e}"}
    for k in ("eager", "compile"):
        if "median_ms" in res.get(k, {}):
            res[f"speedup_vs_{k}"] = res[k]["median_ms"] / res["fused"]["median_ms"]
    return res


def bench_mlp(cfg, dev, dtype, M: int, iters: int, warmup: int, compile_: bool) -> dict:
    """The adaLN MLP sub-block alone, forward + backward, on M rows."""
    blk = DiffusionHead(cfg).blocks[0].to(dev, dtype)
    randomise(blk, seed=31)
    W = cfg.head_width
    g = torch.Generator(device=dev).manual_seed(32)
    x = torch.randn(M, W, device=dev, generator=g).to(dtype).requires_grad_()
    ada = torch.randn(M, 3 * W, device=dev, generator=g).to(dtype).mul_(0.3).requires_grad_()
    dout = torch.randn(M, W, device=dev, generator=g).to(dtype)

    def eager(x, ada):
        s, c, gt = ada.chunk(3, -1)
        return x + gt * blk.mlp(modulate(blk.norm2(x), s, c))

    def fused(x, ada):
        s, c, gt = ada.chunk(3, -1)
        return adaln_mlp(x, s, c, gt, blk.fc1, blk.fc2)

    fns = {"eager": eager, "fused": fused}
    if compile_:
        fns["compile"] = torch.compile(eager, dynamic=False)
    res: dict = {"rows": M, "width": W, "hidden": blk.fc1.out_features}
    outs = {}
    for name, f in fns.items():

        def fn(f=f):
            zero_grads(blk, x, ada)
            y = f(x, ada)
            y.backward(dout)
            return y

        outs[name] = fn().detach()
        res[name] = timeit(fn, dev, iters, warmup)
    res["fused_rel_err_vs_eager"] = rel(outs["fused"].float(), outs["eager"].float())
    for k in ("eager", "compile"):
        if k in res:
            res[f"speedup_vs_{k}"] = res[k]["median_ms"] / res["fused"]["median_ms"]
    return res


def bench_decode(model: BitLM, dev, batches, iters: int, warmup: int, context: int) -> dict:
    cfg = model.config
    head = model.head
    res: dict = {"steps": cfg.sample_steps, "cfg_scale": cfg.cfg_scale, "context": context}
    sample = lambda h, g: head.sample(
        h,
        model.codec,
        steps=cfg.sample_steps,
        cfg_scale=cfg.cfg_scale,
        temperature=1.0,
        generator=g,
    )
    for b in batches:
        g = torch.Generator(device=dev).manual_seed(40 + b)
        h = torch.randn(b, cfg.block_size, cfg.d_model, device=dev, generator=g).to(
            model.start.dtype
        )
        row: dict = {}
        for name, fused in (("eager", False), ("fused", True)):
            head.force_fused = fused
            row[name] = timeit(partial(sample, h, g), dev, iters, warmup)
        row["speedup"] = row["eager"]["median_ms"] / row["fused"]["median_ms"]
        # one backbone call over the m new tokens with a KV cache of `context` tokens
        prompt = torch.randint(0, cfg.vocab_size, (b, context), device=dev, generator=g)
        block = torch.randint(0, cfg.vocab_size, (b, cfg.block_size), device=dev, generator=g)
        cache = KVCache(cfg.n_layers)
        with torch.no_grad():
            model.backbone(model.embed(prompt), cache)
        saved = list(cache.kv)

        def backbone_step(cache=cache, saved=saved, block=block):
            cache.kv = list(saved)
            with torch.no_grad():
                return model.backbone(model.embed(block), cache)

        row["backbone_step"] = timeit(backbone_step, dev, iters, warmup)
        bb = row["backbone_step"]["median_ms"]
        for name in ("eager", "fused"):
            hd = row[name]["median_ms"]
            row[f"head_share_{name}"] = hd / (hd + bb)
            row[f"decode_step_ms_{name}"] = hd + bb
        res[f"batch{b}"] = row
    head.force_fused = None
    return res


def main() -> int:
    args = parse()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if dev.type == "cuda" else torch.float32
    quick = args.quick or dev.type == "cpu"
    iters = args.iters or (3 if dev.type == "cpu" else 30)
    warmup = 1 if dev.type == "cpu" else 5
    torch.manual_seed(0)
    import triton

    env = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.machine(),
        "dtype": str(dtype),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "quick": quick,
    }
    print(json.dumps(env), flush=True)
    if quick:
        head_kw = dict(head_width=32, head_heads=2, head_depth=1, d_model=32, n_heads=2)
        bb_kw = dict(n_layers=1, n_kv_heads=1)
        R_train, R_check, M_mlp, context, batches = 16, 4, 64, 16, (1, 2)
    else:
        head_kw = dict(head_width=1024, head_heads=8, head_depth=3, d_model=1024, n_heads=16)
        bb_kw = dict(n_layers=16, n_kv_heads=8)
        R_train = args.tokens * 4 // 4  # tokens x diffusion_batch_mul 4 / m 4 blocks
        R_check, M_mlp, context, batches = 256, args.tokens * 4, 1024, (1, 16)
    cfg = ModelConfig(
        vocab_size=151_936, block_size=4, sample_steps=15, cfg_scale=9.0, **head_kw, **bb_kw
    )
    result: dict = {"env": env, "config": cfg.to_dict()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def section(name: str, fn: Callable[[], dict]) -> None:
        """Run one part; record an error instead of losing the parts already measured."""
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # report and go on: the other parts still mean something
            traceback.print_exc()
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        print(name, json.dumps(result[name]), f"{time.perf_counter() - t0:.1f}s", flush=True)
        out.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a timeout
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def decode() -> dict:
        torch.manual_seed(1)
        model = BitLM(cfg)
        randomise(model, seed=41)
        model = model.to(dev, dtype).eval()
        return bench_decode(model, dev, batches, max(iters, 3), warmup, context)

    compile_ = not args.no_compile and dev.type == "cuda"
    section("correctness", lambda: correctness(cfg, dev, dtype, R_check))
    section("decode", decode)
    section("train", lambda: bench_train(cfg, dev, dtype, R_train, iters, warmup, compile_))
    section("mlp_block", lambda: bench_mlp(cfg, dev, dtype, M_mlp, iters, warmup, compile_))

    get = lambda part, key, default: result.get(part, {}).get(key, default)
    ok = bool(
        get("correctness", "ok", False)
        and get("train", "loss_rel_diff_fused_vs_eager", 1.0) < 1e-2
        and get("mlp_block", "fused_rel_err_vs_eager", 1.0) < 2e-2
        and "error" not in result["decode"]
    )
    result["ok"] = ok
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}; correctness ok = {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
