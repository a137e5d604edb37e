"""Synthetic data with known structure, and a plain single-process training loop.

Used by the model's learning tests, the benchmarks and quick experiments: the data are made here,
so they exist on every machine, and their ground truth is known exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import BitLM

__all__ = ["SMALL_MODEL", "MarkovChain", "PhraseData", "fit"]

# ModelConfig fields of the small BitLM the learning tests and benchmarks/markov_steps.py train
SMALL_MODEL = dict(
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_width=64,
    head_depth=3,
    head_heads=4,
    diffusion_batch_mul=4,
    cond_dropout=0.0,
)


@dataclass
class MarkovChain:
    """A sparse branching chain: each token has `branching` allowed successors, equally likely."""

    vocab_size: int
    branching: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        V = self.vocab_size
        self.successors = torch.stack(
            [torch.randperm(V, generator=g)[: self.branching] for _ in range(V)]
        )  # [V, branching]
        self.allowed = torch.zeros(V, V, dtype=torch.bool)
        self.allowed.scatter_(1, self.successors, True)

    def sample(self, batch: int, length: int, generator: torch.Generator) -> Tensor:
        out = torch.empty(batch, length, dtype=torch.long)
        out[:, 0] = torch.randint(0, self.vocab_size, (batch,), generator=generator)
        for i in range(1, length):
            pick = torch.randint(0, self.branching, (batch,), generator=generator)
            out[:, i] = self.successors[out[:, i - 1], pick]
        return out

    def valid_fraction(self, seq: Tensor) -> float:
        """Fraction of transitions seq[i] -> seq[i+1] that the chain allows."""
        ok = self.allowed[seq[:, :-1], seq[:, 1:]]
        return ok.float().mean().item()


@dataclass
class PhraseData:
    """Deterministic text-like data: sequences are random orders of a fixed set of phrases, each
    phrase a unique key token followed by a fixed body. Once a phrase's key is in the context,
    the rest of the phrase is decided, so those blocks can be predicted exactly."""

    vocab_size: int
    n_phrases: int = 16
    phrase_len: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        if self.n_phrases > self.vocab_size:
            raise ValueError("need vocab_size >= n_phrases (one key token per phrase)")
        keys = torch.randperm(self.vocab_size, generator=g)[: self.n_phrases]
        body = torch.randint(0, self.vocab_size, (self.n_phrases, self.phrase_len - 1), generator=g)
        self.phrases = torch.cat([keys[:, None], body], 1)  # [n_phrases, phrase_len]

    def sample(self, batch: int, length: int, generator: torch.Generator) -> Tensor:
        n = -(-length // self.phrase_len)
        idx = torch.randint(0, self.n_phrases, (batch, n), generator=generator)
        return self.phrases[idx].reshape(batch, -1)[:, :length]

    def determined_blocks(self, length: int, block_size: int) -> Tensor:
        """Bool [length / m]: blocks whose every token follows its phrase's key in the context."""
        pos = torch.arange(0, length, block_size)
        start = pos % self.phrase_len  # offset of the block's first token in its phrase
        return (start > 0) & (start + block_size <= self.phrase_len)


def fit(
    model: BitLM,
    batch_fn: Callable[[torch.Generator], Tensor],
    steps: int,
    lr: float = 1e-3,
    warmup: int = 50,
    weight_decay: float = 0.0,
    seed: int = 0,
    time_limit_s: float | None = None,
    log_every: int = 0,
) -> list[float]:
    """AdamW (betas 0.9, 0.95) with linear warmup and cosine decay; returns the loss per step."""
    import time

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        ),
    )
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        loss = model.loss(batch_fn(g), generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and step % log_every == 0:
            print(f"step {step} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            break
    model.eval()
    return losses
