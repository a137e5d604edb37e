"""It learns, jointly (issue 2, point 4). Tiny models, a few CPU minutes each; marked slow.

(a) Deterministic phrases: teacher-forced block exact match on held-out sequences.
(b) A branching sparse Markov chain: sampled continuations must follow allowed transitions, also
    inside a block, which an independent per-slot ("mean-field") decode cannot do: it mixes the
    two branches. The gap between the two is the evidence that the head decides a block jointly.
"""

from __future__ import annotations

import pytest
import torch

from bitlm import BitLM, ModelConfig
from bitlm.synthetic import SMALL_MODEL, MarkovChain, PhraseData, fit

pytestmark = pytest.mark.slow


@torch.no_grad()
def mean_field_generate(model: BitLM, prompt: torch.Tensor, n_blocks: int, g) -> torch.Tensor:
    """Per-slot independent decode: each slot's bits from the head's t = 1 estimate E[bits]."""
    m, B = model.config.block_size, model.config.num_bits
    seq = prompt
    for _ in range(n_blocks):
        pad = torch.zeros(seq.shape[0], m, dtype=torch.long)
        h = model.conditions(torch.cat([seq, pad], 1))[:, -1]  # [b, m, d]
        noise = torch.randn(seq.shape[0], m, B, generator=g)
        x0 = model.head(noise, torch.ones(seq.shape[0]), h)
        seq = torch.cat([seq, model.codec.decode(x0)], 1)
    return seq


def test_phrases_block_exact_match() -> None:
    torch.set_num_threads(2)
    data = PhraseData(vocab_size=64, n_phrases=16, phrase_len=12)
    torch.manual_seed(0)
    model = BitLM(ModelConfig(vocab_size=64, block_size=4, **SMALL_MODEL))
    fit(model, lambda g: data.sample(32, 48, g), steps=400, lr=2e-3)
    g = torch.Generator().manual_seed(123)  # held-out: fresh phrase orders
    tokens = data.sample(64, 48, g)
    r = model.evaluate(tokens, generator=g)
    blocks = r["token_correct_sampled"].view(64, -1, 4).all(-1)  # [b, N]
    mask = data.determined_blocks(48, 4)
    exact = blocks[:, mask].float().mean().item()
    print(f"phrases: teacher-forced block exact match {exact:.3f} on determined blocks")
    assert exact >= 0.95


@pytest.mark.parametrize("kind", ["bitlm", "ar"])
def test_markov_chain_valid_transitions(kind: str) -> None:
    torch.set_num_threads(2)
    chain = MarkovChain(16, branching=2, seed=0)
    torch.manual_seed(0)
    if kind == "ar":
        cfg = ModelConfig(
            vocab_size=16,
            block_size=1,
            input="embedding",
            output_head="softmax",
            **{k: v for k, v in SMALL_MODEL.items() if not k.startswith(("head", "diff"))},
        )
    else:
        cfg = ModelConfig(vocab_size=16, block_size=4, **SMALL_MODEL)
    model = BitLM(cfg)
    fit(model, lambda g: chain.sample(64, 32, g), steps=1000, lr=2e-3)
    g = torch.Generator().manual_seed(1)
    prompt = chain.sample(128, 8, g)
    sampled = model.generate(prompt, 32, generator=g)
    valid = chain.valid_fraction(sampled[:, 7:])
    if kind == "ar":
        print(f"markov: AR valid transitions {valid:.3f}")
        assert valid >= 0.90
        return
    mf = chain.valid_fraction(mean_field_generate(model, prompt, 8, g)[:, 7:])
    print(f"markov: BitLM sampled valid {valid:.3f}, per-slot mean-field decode {mf:.3f}")
    # Init seeds 0-2 measured 0.89-0.93 (mean field 0.35-0.39, chance 0.125); the bar sits below
    # that spread so that float-level changes (e.g. SDPA for the slot attention) cannot flip it.
    assert valid >= 0.85
    assert valid - mf >= 0.15
