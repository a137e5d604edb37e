"""The slot-interference experiment of docs/quality.md: the same m = 4 backbone (embedding input,
reversed input blocks) with a per-slot softmax head, trained on the quality benchmark's data with
the loss on all four slots, slot 0 weighted 4x, slots 1-3 detached from the backbone, slot 0
only, slots 1-3 ramped in from step 100 to 200 (the slot curriculum), or all slots at 3x the
learning rate; per-slot validation bits/token every 25 steps. An AR model with bits input is the
yardstick.

    python benchmarks/slot_interference.py [--steps 125] [--only NAME ...] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import Bench, ensure_dataset  # noqa: E402

WEIGHTS = {
    "all": [1.0, 1.0, 1.0, 1.0],
    "slot0x4": [4.0, 1.0, 1.0, 1.0],
    "detach": [1.0, 1.0, 1.0, 1.0],
    "slot0only": [1.0, 0.0, 0.0, 0.0],
    "ramp": [1.0, 1.0, 1.0, 1.0],  # slots 1-3 off until RAMP[0], weight 1 from RAMP[1]
    "lr3x": [1.0, 1.0, 1.0, 1.0],
}
RAMP = (100, 200)


def slot_weights(name: str, step: int) -> torch.Tensor:
    w = torch.tensor(WEIGHTS.get(name, [1.0]))
    if name == "ramp":
        w[1:] *= min(1.0, max(0.0, (step - RAMP[0]) / (RAMP[1] - RAMP[0])))
    return w


SLOTS = dict(block_size=4, input="embedding", output_head="softmax", input_block_order="reversed")


def run(bench: Bench, name: str, steps: int) -> list[dict]:
    tr = bench.tr
    ar = name == "ar-bits"
    model = bench.build(dict(block_size=1, output_head="softmax") if ar else SLOTS)
    lr = tr["lr"] * (3.0 if name == "lr3x" else 1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    B, curve = tr["batch_size"], []
    for step in range(steps):
        for group in opt.param_groups:  # warm-up, then constant
            group["lr"] = lr * min(1.0, (step + 1) / tr["warmup_steps"])
        w = slot_weights(name, step)
        x = bench.train.tokens_at(np.arange(step * B, (step + 1) * B))
        h = model.conditions(x)  # [b, N, m, d]
        if name == "detach":
            h = torch.cat([h[:, :, :1], h[:, :, 1:].detach()], 2)
        ce = F.cross_entropy(model.head(h).flatten(0, 2), x.flatten(), reduction="none")
        loss = (ce.view(-1, len(w)) * w).sum(-1).mean() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tr["grad_clip"])
        opt.step()
        if (step + 1) % 25 == 0:
            with torch.no_grad():
                v = bench.val[:16]
                hv = model.conditions(v)
                b, N, m, d = hv.shape
                lp = model.block_log_probs(hv.reshape(b * N, m, d), v.reshape(b * N, m), False)
            bits = [float(-lp[:, j].mean() / math.log(2)) for j in range(m)]
            curve.append({"step": step + 1, "slot_bits": bits})
            print(f"  {name:10s} step {step + 1:4d}  " + " ".join(f"{b:.3f}" for b in bits))
    return curve


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=125)
    p.add_argument("--data", default=str(ROOT / "data/stdlib-prose"))
    p.add_argument("--out", default="")
    p.add_argument("--only", nargs="*", default=None, help="variants to run (default: all)")
    a = p.parse_args()
    ensure_dataset(Path(a.data))
    grid = yaml.safe_load((ROOT / "benchmarks/quality_grid.yaml").read_text())
    bench = Bench(grid, Path(a.data), torch.device("cpu"))
    res = {"benchmark": "slot_interference", "steps": a.steps, "variants": {}}
    for name in a.only or ("ar-bits", *WEIGHTS):
        res["variants"][name] = run(bench, name, a.steps)
    out = Path(
        a.out
        or ROOT / f"benchmarks/results/slot-interference-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
