"""Evaluation metrics on plain tensors (no Ray, no MLflow): teacher-forced aggregation, token
frequency buckets, per-token log-probabilities under a model, and sample statistics."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ..model import BitLM

__all__ = [
    "TeacherForced",
    "distinct_n",
    "frequency_buckets",
    "generation_throughput",
    "repetition_rate",
    "token_logprobs",
]


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
            if k != "token_correct":
                v = v.detach().double().cpu()
                self.sums[k] = self.sums[k] + v if k in self.sums else v
        b = self.bucket_of_id[tokens.cpu()].flatten()
        ok = out["token_correct"].cpu().flatten().double()
        self.bucket_total += torch.bincount(b, minlength=self.n_buckets).double()
        self.bucket_correct += torch.bincount(b, weights=ok, minlength=self.n_buckets)

    def metrics(self) -> dict[str, float]:
        s = self.sums
        n, blocks = float(s["tokens"]), float(s["blocks"])
        bpt = float(s["nll_bits"]) / n
        out = {
            "val/bits_per_token": bpt,
            "val/perplexity": 2.0**bpt,
            "val/bit_accuracy": float(s["bits_correct"]) / (n * self.num_bits),
            "val/token_accuracy": float(s["slot_correct"].sum()) / n,
            "val/block_exact_match": float(s["blocks_exact"]) / blocks,
            "val/invalid_code_rate": float(s["invalid_codes"]) / n,
        }
        for j in range(self.m):
            out[f"val/token_accuracy_slot{j}"] = float(s["slot_correct"][j]) / blocks
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
    flat = h.reshape(b * n_blocks, m, -1)
    target = x.reshape(b * n_blocks, m)
    if model.is_diffusion:
        cfg = model.config
        x1 = torch.randn(b * n_blocks, m, cfg.num_bits, generator=generator).to(h)
        x0 = model.head(x1, torch.ones(b * n_blocks, dtype=h.dtype, device=h.device), flat)
        lp = model.codec.mean_field_log_prob((1 + x0.double().clamp(-1, 1)) / 2, target)
    else:
        logits = model.head(flat).double()  # [R, m, V]
        lp = torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]
    return lp.reshape(b, -1)[:, :L].float()


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
