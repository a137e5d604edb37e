"""Joint block decoding against the number of head evaluations K: the branching Markov chain of
tests/bitlm/test_learning.py (16 tokens, 2 successors each, m = 4), one model per init seed
trained as the test trains it, then the fraction of valid transitions in sampled continuations
at each K, for the ODE (eta 0) and the ancestral sampler (eta 1), at each time shift of the
steps (model.sample_shift; 1 is uniform in t). Inside a block only a joint decode keeps
transitions valid, so this measures what fewer steps cost the head's joint sampling. Each cell
is the mean over --prompt-seeds draws of 128 prompts.

    python benchmarks/markov_steps.py [--seeds 0 1] [--steps 2 4 8 15 30] [--shifts 1 0.3]
        [--prompt-seeds 1 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from bitlm import BitLM, ModelConfig
from bitlm.synthetic import SMALL_MODEL, MarkovChain, fit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    p.add_argument("--steps", type=int, nargs="*", default=[2, 4, 8, 15, 30])
    p.add_argument("--shifts", type=float, nargs="*", default=[1.0])
    p.add_argument("--prompt-seeds", type=int, nargs="*", default=[1])
    p.add_argument("--out", default="benchmarks/results/markov_steps.json")
    a = p.parse_args()
    torch.set_num_threads(1)
    chain = MarkovChain(16, branching=2, seed=0)
    valid: dict[str, float] = {}
    for seed in a.seeds:
        torch.manual_seed(seed)
        model = BitLM(ModelConfig(vocab_size=16, block_size=4, **SMALL_MODEL))
        fit(model, lambda g: chain.sample(64, 32, g), steps=1000, lr=2e-3)
        for K, shift, eta in itertools.product(a.steps, a.shifts, (0.0, 1.0)):
            runs = []
            for ps in a.prompt_seeds:
                g = torch.Generator().manual_seed(ps)
                prompt = chain.sample(128, 8, g)
                out = model.generate(prompt, 32, generator=g, steps=K, eta=eta, shift=shift)
                runs.append(chain.valid_fraction(out[:, 7:]))
            key = f"seed{seed}_K{K}_eta{eta:g}" + ("" if shift == 1 else f"_shift{shift:g}")
            valid[key] = sum(runs) / len(runs)
            print(f"{key}: valid {valid[key]:.3f}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    cells = dict(seeds=a.seeds, steps=a.steps, shifts=a.shifts, prompt_seeds=a.prompt_seeds)
    Path(a.out).write_text(json.dumps({**cells, "valid": valid}, indent=1))


if __name__ == "__main__":
    main()
