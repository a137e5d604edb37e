"""Evaluation metrics on plain tensors (no Ray, no MLflow): teacher-forced aggregation, token
frequency buckets, per-token log-probabilities under a model, and sample statistics."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..model import BitLM
from .ngram import KneserNey

__all__ = [
    "COND_GAIN_TS",
    "TeacherForced",
    "distinct_n",
    "frequency_buckets",
    "generation_throughput",
    "ngram_perplexity",
    "repetition_rate",
    "token_logprobs",
    "unigram_entropy",
]

COND_GAIN_TS = (0.3, 0.5, 0.7, 0.9, 1.0)  # t at which the head's condition gain is measured


def frequency_buckets(tokens: Tensor, vocab_size: int, n_buckets: int = 4) -> Tensor:
    """Bucket of every id [V] (0 = most frequent): ids sorted by count in ``tokens``, bucket k
    holds the ids whose occurrences fall in the k-th quantile of all occurrences."""
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size).double()
    order = torch.argsort(counts, descending=True, stable=True)
    before = torch.cumsum(counts[order], 0) - counts[order]  # occurrences of more frequent ids
    q = (before / max(float(counts.sum()), 1.0) * n_buckets).floor().clamp(0, n_buckets - 1)
    bucket = torch.empty(vocab_size, dtype=torch.long)
    bucket[order] = q.long()
    return bucket


class TeacherForced:
    """Accumulates ``BitLM.evaluate`` sums over batches; ``metrics()`` gives the rates."""

    def __init__(self, model: BitLM, bucket_of_id: Tensor, n_buckets: int) -> None:
        self.m = model.config.block_size
        self.num_bits = model.config.num_bits
        self.bucket_of_id = bucket_of_id
        self.n_buckets = n_buckets
        self.sums: dict[str, Tensor] = {}
        self.bucket_total = torch.zeros(n_buckets, dtype=torch.float64)
        self.bucket_correct = torch.zeros(n_buckets, dtype=torch.float64)

    def add(self, tokens: Tensor, out: dict[str, Tensor]) -> None:
        for k, v in out.items():
            if not k.startswith("token_correct"):
                v = v.detach().double().cpu()
                self.sums[k] = self.sums[k] + v if k in self.sums else v
        b = self.bucket_of_id[tokens.cpu()].flatten()
        ok = out["token_correct_greedy"].cpu().flatten().double()
        self.bucket_total += torch.bincount(b, minlength=self.n_buckets).double()
        self.bucket_correct += torch.bincount(b, weights=ok, minlength=self.n_buckets)

    def metrics(self) -> dict[str, float]:
        """Greedy decoding is the headline (``val/token_accuracy``); ``*_sampled`` is the same
        at temperature 1. See ``BitLM.evaluate``."""
        s = self.sums
        n, blocks = float(s["tokens"]), float(s["blocks"])
        bpt = float(s["nll_bits"]) / n
        out = {
            "val/bits_per_token": bpt,
            "val/perplexity": 2.0**bpt,
            "val/bits_per_token_chain": float(s["nll_chain_bits"]) / n,
        }
        for j in range(self.m):
            out[f"val/bits_per_token_slot{j}"] = float(s["nll_slot_bits"][j]) / blocks
        for d, sfx in (("greedy", ""), ("sampled", "_sampled")):
            out[f"val/bit_accuracy{sfx}"] = float(s[f"bits_correct_{d}"]) / (n * self.num_bits)
            out[f"val/token_accuracy{sfx}"] = float(s[f"slot_correct_{d}"].sum()) / n
            out[f"val/block_exact_match{sfx}"] = float(s[f"blocks_exact_{d}"]) / blocks
            out[f"val/invalid_code_rate{sfx}"] = float(s[f"invalid_codes_{d}"]) / n
            for j in range(self.m):
                out[f"val/token_accuracy{sfx}_slot{j}"] = float(s[f"slot_correct_{d}"][j]) / blocks
        for k in range(self.n_buckets):
            tot = float(self.bucket_total[k])
            if tot > 0:
                out[f"val/token_accuracy_freq{k}"] = float(self.bucket_correct[k]) / tot
        return out


@torch.no_grad()
def token_logprobs(model: BitLM, tokens: Tensor, generator: torch.Generator | None) -> Tensor:
    """log p(token_i | tokens_<i) in nats, [b, L]: exact for a softmax head, mean-field (the
    t = 1 prediction renormalised over valid codes, method.md section 5) for a diffusion head.
    ``L`` need not be a multiple of the block size (the tail is padded and dropped)."""
    b, L = tokens.shape
    m = model.config.block_size
    pad = (-L) % m
    x = torch.cat([tokens, tokens.new_zeros(b, pad)], 1) if pad else tokens
    h = model.conditions(x)  # [b, N, m, d]
    n_blocks = h.shape[1]
    lp = model.block_log_probs(
        h.reshape(b * n_blocks, m, -1), x.reshape(b * n_blocks, m), False, generator
    )
    return lp.reshape(b, -1)[:, :L].float()


def ngram_perplexity(ref: KneserNey, seqs: Sequence[Sequence[int]], skip: int) -> float:
    """Perplexity under the reference n-gram of every token after the first ``skip`` of each
    sequence (the prompt is context, not scored)."""
    lp = np.concatenate([ref.sequence_logprobs(s)[skip:] for s in seqs])
    return float(np.exp(-lp.mean()))


def unigram_entropy(seqs: Iterable[Sequence[int]]) -> float:
    """Entropy in bits of the token frequencies over all of ``seqs`` (a mode-collapse guard:
    compare with real text of the same length)."""
    c = np.array(list(Counter(t for s in seqs for t in s).values()), dtype=np.float64)
    if c.size == 0:
        return 0.0
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def distinct_n(samples: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all samples / all n-grams (0 when there are none)."""
    grams = [tuple(s[i : i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(samples: Iterable[Sequence[int]], n: int = 4) -> float:
    """Mean over samples of the fraction of n-grams that repeat an earlier n-gram of the same
    sample (rep-n; 0 = no repetition)."""
    rates = []
    for s in samples:
        grams = [tuple(s[i : i + n]) for i in range(len(s) - n + 1)]
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def generation_throughput(
    model: BitLM, prompt: Tensor, new_tokens: int, seed: int = 0, repeats: int = 1
) -> tuple[float, Tensor]:
    """(generated tokens per second, the last output [b, P + new]) for ``model.generate`` with
    its KV cache, after one short warm-up call."""
    g = torch.Generator().manual_seed(seed)
    model.generate(prompt, min(new_tokens, model.config.block_size), generator=g)  # warm-up
    best, out = math.inf, prompt
    for _ in range(max(1, repeats)):
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        out = model.generate(prompt, new_tokens, generator=g)
        best = min(best, time.perf_counter() - t0)
    return prompt.shape[0] * new_tokens / max(best, 1e-9), out
