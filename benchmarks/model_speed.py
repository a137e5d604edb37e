"""Decode and train-step throughput: BitLM (m = 4, 8; K = 15; CFG on/off) vs the AR baseline
(same backbone, KV cache), in one process, as ratios to the AR numbers of the same run.

    python benchmarks/model_speed.py [--device cuda] [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

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
        head_heads=max(1, a.head_width // 128),
    )
    if kind == "ar":
        cfg = ModelConfig(block_size=1, input="embedding", output_head="softmax", **common)
    else:
        cfg = ModelConfig(block_size=m, **common)
    torch.manual_seed(0)
    return BitLM(cfg).to(device=device, dtype=a.dtype).eval()


def bench_decode(model: BitLM, batch: int, a, device, cfg_scale: float) -> float:
    now = timer(device)
    prompt = torch.randint(0, a.vocab, (batch, a.prompt), device=device)
    g = torch.Generator(device=device).manual_seed(0)
    model.generate(
        prompt, model.config.block_size * 2, steps=a.steps, cfg_scale=cfg_scale, generator=g
    )  # warm-up
    times = []
    for _ in range(a.repeats):
        t0 = now()
        model.generate(prompt, a.new_tokens, steps=a.steps, cfg_scale=cfg_scale, generator=g)
        times.append(now() - t0)
    return batch * a.new_tokens / statistics.median(times)


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes, for CPU smoke runs")
    p.add_argument("--out", default="benchmarks/results/model_speed.json")
    a = p.parse_args()
    device = torch.device(a.device)
    big = dict(
        vocab=32768,
        d_model=512,
        layers=8,
        heads=8,
        head_width=512,
        head_depth=3,
        prompt=64,
        new_tokens=64,
        steps=15,
        repeats=5,
        train_batch=8,
        seq_len=512,
    )
    small = dict(
        vocab=4096,
        d_model=128,
        layers=2,
        heads=4,
        head_width=128,
        head_depth=2,
        prompt=16,
        new_tokens=16,
        steps=15,
        repeats=2,
        train_batch=2,
        seq_len=64,
    )
    for k, v in (small if a.quick else big).items():
        setattr(a, k, v)
    a.dtype = torch.float32
    a.bf16_autocast = device.type == "cuda"
    results: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "sizes": {k: v for k, v in vars(a).items() if k not in ("dtype", "device", "out")},
        "decode_tokens_per_s": {},
        "train_tokens_per_s": {},
    }
    ar = build("ar", 1, a, device)
    for batch in (1, 16):
        results["decode_tokens_per_s"][f"ar_b{batch}"] = bench_decode(ar, batch, a, device, 1.0)
        for m in (4, 8):
            model = build("bitlm", m, a, device)
            for w, tag in ((1.0, "nocfg"), (3.0, "cfg")):
                key = f"bitlm_m{m}_{tag}_b{batch}"
                results["decode_tokens_per_s"][key] = bench_decode(model, batch, a, device, w)
            del model
    results["train_tokens_per_s"]["ar"] = bench_train(ar, a, device)
    results["train_tokens_per_s"]["bitlm_m4"] = bench_train(build("bitlm", 4, a, device), a, device)
    dec = results["decode_tokens_per_s"]
    results["ratios_vs_ar"] = {
        "decode": {
            k: v / dec["ar_b" + k.rsplit("_b", 1)[1]]
            for k, v in dec.items()
            if k != "ar_b1" and k != "ar_b16"
        },
        "train_m4": results["train_tokens_per_s"]["bitlm_m4"] / results["train_tokens_per_s"]["ar"],
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
