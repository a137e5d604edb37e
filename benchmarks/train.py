"""Training throughput: BitLM vs the AR baseline under the same Ray Train + DeepSpeed set-up and
backbone, and the overhead of the Ray/DeepSpeed path against a plain single-process loop.

    flock /tmp/bitlm-cpu.lock .venv/bin/python benchmarks/train.py [--steps 20] [--out FILE]

Prints one JSON object. Tokens/s are per worker (device), averaged over the steps after
``--skip`` warm-up steps; the plain loop runs one thread (what one Ray worker gets on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "train"))
for k, v in {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "DS_BUILD_OPS": "0",
    "DS_ACCELERATOR": "cpu",
}.items():
    os.environ.setdefault(k, v)

RECIPES = {"bitlm": "recipes/pretrain/cpu-tiny.yaml", "ar": "recipes/pretrain/cpu-tiny-ar.yaml"}


def ray_path(recipe_path: str, data: str, storage: str, name: str, steps: int, skip: int) -> dict:
    from mlflow.tracking import MlflowClient

    from bitlm.train import load_train_recipe, run

    r = load_train_recipe(
        ROOT / recipe_path,
        [
            f"data.path={data}",
            f"storage_path={storage}",
            f"steps={steps}",
            "checkpoint.every_steps=0",
            "checkpoint.every_minutes=0",
            "eval.every_steps=0",
            "mlflow.log_every=1",
            "mlflow.system_metrics=false",
            "log_every=5",
        ],
        name,
    )
    t0 = time.perf_counter()
    res = run(r)
    wall = time.perf_counter() - t0
    hist = MlflowClient(res.tracking_uri).get_metric_history(
        res.mlflow_run_id, "throughput/tokens_per_s_per_device"
    )
    tps = [m.value for m in sorted(hist, key=lambda m: m.step)][skip:]
    share = MlflowClient(res.tracking_uri).get_metric_history(
        res.mlflow_run_id, "time/data_loading_share"
    )
    return {
        "recipe": recipe_path,
        "workers": r.num_workers,
        "zero_stage": r.zero_stage,
        "tokens_per_s_per_worker": statistics.mean(tps),
        "data_loading_share": statistics.mean(m.value for m in share),
        "fit_wall_s": wall,
    }


def plain_loop(recipe_path: str, data: str, steps: int, skip: int) -> dict:
    """The same model, batch per worker, accumulation and AdamW: one process, no DeepSpeed."""
    import torch

    from bitlm.model import BitLM
    from bitlm.train import Dataset, load_train_recipe
    from bitlm.train.data import rank_positions
    from bitlm.train.worker import noise_seed

    torch.set_num_threads(1)
    r = load_train_recipe(ROOT / recipe_path, [f"data.path={data}"])
    ds = Dataset(data, "train", r.data.seed)
    from dataclasses import replace

    cfg = replace(r.model, vocab_size=ds.manifest.vocab_size)
    torch.manual_seed(r.seed)
    model = BitLM(cfg, ds.codec.table)
    opt = torch.optim.AdamW(model.parameters(), lr=r.optim.lr, weight_decay=r.optim.weight_decay)
    accum = r.grad_accum
    per_worker = r.global_batch_size // r.num_workers
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        tokens = ds.tokens_at(rank_positions(step, 0, r.num_workers, r.global_batch_size))
        for micro in range(accum):
            mb = tokens[micro * r.micro_batch_size : (micro + 1) * r.micro_batch_size]
            gen = torch.Generator().manual_seed(noise_seed(r.seed, step, 0, micro))
            (model.loss(mb, gen) / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    tok = per_worker * ds.manifest.seq_len
    return {"tokens_per_s": statistics.mean(tok / t for t in times[skip:])}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", default="")
    a = p.parse_args()
    import ray
    from helpers import write_dataset

    tmp = Path(tempfile.mkdtemp(prefix="bitlm-bench-"))
    data = write_dataset(
        tmp / "data",
        train_rows=512,
        val_rows=8,
        rows_per_shard=128,
        row_group_size=32,
        seq_len=a.seq_len,
        vocab=256,
    )
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=512 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
    )
    out: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores (CPU, gloo, fp32)",
        "seq_len": a.seq_len,
        "steps": a.steps,
        "skip": a.skip,
        "ray_deepspeed": {},
        "plain_single_process": {},
    }
    for kind, rp in RECIPES.items():
        out["ray_deepspeed"][kind] = ray_path(
            rp, data, str(tmp / "runs"), f"bench-{kind}", a.steps, a.skip
        )
        out["plain_single_process"][kind] = plain_loop(rp, data, a.steps, a.skip)
    rd, pl = out["ray_deepspeed"], out["plain_single_process"]
    out["ratios"] = {
        "bitlm_over_ar_tokens_per_s_ray": rd["bitlm"]["tokens_per_s_per_worker"]
        / rd["ar"]["tokens_per_s_per_worker"],
        "bitlm_over_ar_tokens_per_s_plain": pl["bitlm"]["tokens_per_s"] / pl["ar"]["tokens_per_s"],
        "ray_deepspeed_over_plain_bitlm": rd["bitlm"]["tokens_per_s_per_worker"]
        / pl["bitlm"]["tokens_per_s"],
        "ray_deepspeed_over_plain_ar": rd["ar"]["tokens_per_s_per_worker"]
        / pl["ar"]["tokens_per_s"],
    }
    ray.shutdown()
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
