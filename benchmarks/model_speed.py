"""Decode and train-step throughput: BitLM (m = 4, 8; K head evaluations per block, default 15,
8, 4; CFG 3 at the first K) vs the AR baseline (same backbone, static KV cache; the concatenating
cache reported beside it), in one process, and per-token latency. Each decode ratio is over AR
runs interleaved with that model's runs (medians of `repeats` each), so a change of load during
the benchmark moves both sides. CPU default: the two sizes of issue 11 with ModelConfig's head
defaults.

    python benchmarks/model_speed.py [--device cuda] [--quick] [--sizes NAME ...] [--steps K ...]
        [--bitlm KEY=VALUE ...]    # ModelConfig overrides of the BitLM models, e.g. slot_prefix=4
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

from bitlm import BitLM, ModelConfig


def timer(device: torch.device):
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    return now


def build(kind: str, m: int, a: argparse.Namespace, device: torch.device) -> BitLM:
    common = dict(
        vocab_size=a.vocab,
        d_model=a.d_model,
        n_layers=a.layers,
        n_heads=a.heads,
        n_kv_heads=a.heads // 2,
        head_width=a.head_width,
        head_depth=a.head_depth,
        head_heads=a.head_heads,
    )
    if kind == "ar":
        cfg = ModelConfig(block_size=1, input="embedding", output_head="softmax", **common)
    else:
        cfg = ModelConfig(block_size=m, **{**common, **a.bitlm})  # --bitlm wins
    torch.manual_seed(0)
    return BitLM(cfg).to(device=device, dtype=a.dtype).eval()


def decode_seconds(
    model: BitLM, batch: int, a, device, cfg_scale: float, steps: int, cache: str = "static"
):
    """A timed decode of a.new_tokens tokens (after one warm-up): a callable -> seconds."""
    now = timer(device)
    prompt = torch.randint(0, a.vocab, (batch, a.prompt), device=device)
    g = torch.Generator(device=device).manual_seed(0)
    kw = dict(steps=steps, cfg_scale=cfg_scale, generator=g, use_cache=cache)
    model.generate(prompt, model.config.block_size * 2, **kw)  # warm-up

    def run() -> float:
        t0 = now()
        model.generate(prompt, a.new_tokens, **kw)
        return now() - t0

    return run


def paired_decode(ar_run, run, a) -> tuple[float, float]:
    """(AR seconds, model seconds): medians of a.repeats runs taken alternately, so that both
    sides see the same load on a shared machine."""
    ar_t, t = [], []
    for _ in range(a.repeats):
        ar_t.append(ar_run())
        t.append(run())
    return statistics.median(ar_t), statistics.median(t)


def bench_train(model: BitLM, a, device) -> float:
    now = timer(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    tokens = torch.randint(0, a.vocab, (a.train_batch, a.seq_len), device=device)
    times = []
    for i in range(a.repeats + 2):
        t0 = now()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16_autocast):
            loss = model.loss(tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(now() - t0)
    model.eval()
    return tokens.numel() / statistics.median(times)


# The sizes of issue 11 (CPU: ModelConfig's head defaults) and a GPU size.
SIZES = {
    "cpu-v32k": dict(vocab=32768, d_model=384, layers=6, heads=6),
    "cpu-v4k": dict(vocab=4096, d_model=128, layers=4, heads=4),
    "gpu": dict(vocab=32768, d_model=512, layers=8, heads=8, head_width=512, head_depth=3),
    "quick": dict(vocab=4096, d_model=128, layers=2, heads=4, head_depth=2),
}
RUN = {  # decode and train settings per device kind
    "cpu": dict(prompt=32, new_tokens=32, repeats=5, train_batch=4, seq_len=256, batches=(1,)),
    "gpu": dict(prompt=64, new_tokens=64, repeats=5, train_batch=8, seq_len=512, batches=(1, 16)),
    "quick": dict(prompt=16, new_tokens=16, repeats=2, train_batch=2, seq_len=64, batches=(1,)),
}


def bench_size(name: str, a: argparse.Namespace, device: torch.device) -> dict:
    """AR vs BitLM (m = 4, 8) decode at every K of --steps and every batch; train tokens/s."""
    defaults = ModelConfig()
    a.head_width, a.head_depth, a.head_heads = (
        defaults.head_width,
        defaults.head_depth,
        defaults.head_heads,
    )
    for k, v in {**SIZES[name], **RUN[a.run]}.items():
        setattr(a, k, v)
    dec: dict[str, float] = {}  # tokens/s
    ratios: dict[str, float] = {}  # over the AR runs interleaved with it
    ar = build("ar", 1, a, device)
    for batch in a.batches:
        tokens = batch * a.new_tokens
        ar_run = decode_seconds(ar, batch, a, device, 1.0, 1)
        dynamic = decode_seconds(ar, batch, a, device, 1.0, 1, "dynamic")
        runs = {f"ar_dynamic_cache_b{batch}": dynamic}
        for m in (4, 8):
            model = build("bitlm", m, a, device)
            for K in a.steps:
                runs[f"bitlm_m{m}_K{K}_b{batch}"] = decode_seconds(model, batch, a, device, 1.0, K)
            runs[f"bitlm_m{m}_K{a.steps[0]}_cfg_b{batch}"] = decode_seconds(
                model, batch, a, device, 3.0, a.steps[0]
            )
        ar_all = []
        for key, run in runs.items():
            ar_s, s = paired_decode(ar_run, run, a)
            ar_all.append(ar_s)
            dec[key], ratios[key] = tokens / s, ar_s / s
        dec[f"ar_b{batch}"] = tokens / statistics.median(ar_all)
    train = {"ar": bench_train(ar, a, device)}
    train["bitlm_m4"] = bench_train(build("bitlm", 4, a, device), a, device)
    return {
        "sizes": {
            k: getattr(a, k)
            for k in (*SIZES[name], "head_width", "head_depth", "head_heads", *RUN[a.run])
        },
        "decode_tokens_per_s": dec,
        "decode_ms_per_token": {k: 1000.0 / v for k, v in dec.items()},
        "train_tokens_per_s": train,
        "ratios_vs_ar": {
            "decode": ratios,
            "train_m4": train["bitlm_m4"] / train["ar"],
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="one small size, for smoke runs")
    p.add_argument("--sizes", nargs="*", help=f"of {list(SIZES)} (default: per device)")
    p.add_argument("--steps", type=int, nargs="*", default=[15, 8, 4], help="head evaluations K")
    p.add_argument("--bitlm", nargs="*", default=[], help="KEY=VALUE ModelConfig overrides")
    p.add_argument("--out", default="benchmarks/results/model_speed.json")
    a = p.parse_args()
    try:
        a.bitlm = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.bitlm)}
        ModelConfig(**a.bitlm)
    except (ValueError, TypeError) as e:
        p.error(f"--bitlm: {e}")
    device = torch.device(a.device)
    a.run = "quick" if a.quick else device.type
    sizes = a.sizes or (
        ["quick"] if a.quick else ["gpu"] if a.run == "gpu" else ["cpu-v32k", "cpu-v4k"]
    )
    a.dtype = torch.float32
    a.bf16_autocast = device.type == "cuda"
    results: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": a.steps,
        "bitlm_overrides": a.bitlm,
        "results": {name: bench_size(name, a, device) for name in sizes},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
