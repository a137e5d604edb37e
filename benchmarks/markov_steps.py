"""Joint block decoding against the number of head evaluations K: the branching Markov chain of
tests/bitlm/test_learning.py (16 tokens, 2 successors each, m = 4), one model per init seed
trained as the test trains it, then the fraction of valid transitions in sampled continuations
at each K, for the ODE (eta 0) and the ancestral sampler (eta 1). Inside a block only a joint
decode keeps transitions valid, so this measures what fewer steps cost the head's joint sampling.

    python benchmarks/markov_steps.py [--seeds 0 1] [--steps 2 4 8 15 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bitlm import BitLM, ModelConfig
from bitlm.synthetic import SMALL_MODEL, MarkovChain, fit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    p.add_argument("--steps", type=int, nargs="*", default=[2, 4, 8, 15, 30])
    p.add_argument("--out", default="benchmarks/results/markov_steps.json")
    a = p.parse_args()
    torch.set_num_threads(1)
    chain = MarkovChain(16, branching=2, seed=0)
    valid: dict[str, float] = {}
    for seed in a.seeds:
        torch.manual_seed(seed)
        model = BitLM(ModelConfig(vocab_size=16, block_size=4, **SMALL_MODEL))
        fit(model, lambda g: chain.sample(64, 32, g), steps=1000, lr=2e-3)
        for K in a.steps:
            for eta in (0.0, 1.0):
                g = torch.Generator().manual_seed(1)
                prompt = chain.sample(128, 8, g)
                out = model.generate(prompt, 32, generator=g, steps=K, eta=eta)
                key = f"seed{seed}_K{K}_eta{eta:g}"
                valid[key] = chain.valid_fraction(out[:, 7:])
                print(f"{key}: valid {valid[key]:.3f}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(
        json.dumps({"seeds": a.seeds, "steps": a.steps, "valid": valid}, indent=1)
    )


if __name__ == "__main__":
    main()
