"""Bit codec: token ids <-> fixed B-bit binary codes (method.md section 3, "Bit codec").

A code table is a permutation of ids applied before the binary write, so the valid codes are
always exactly the integers [0, V). Bits are most significant first, as +1/-1 floats.

Decoding takes continuous values x[..., B] and returns the valid id whose code c maximises
sum_i x_i c_i (c_i in {-1, +1}). The unconstrained optimum is sign(x); when it is >= V it is
repaired exactly with an O(B) digit dynamic programme: every c <= U = V - 1 either equals U or
agrees with U above some bit j where U has a 1, has 0 at j, and is free below j.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["BitCodec", "CodeTable", "num_bits_for", "words_to_bits"]


def num_bits_for(vocab_size: int) -> int:
    """B = ceil(log2 V), at least 1."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return max(1, math.ceil(math.log2(vocab_size)))


SEMANTIC_MAX_VOCAB = 16_384  # CodeTable.semantic keeps V x V float32 counts (1 GiB here)


@dataclass(frozen=True)
class CodeTable:
    """A permutation id -> code of [0, V). ``code_of_id is None`` means the identity ("binary")."""

    kind: str
    vocab_size: int
    code_of_id: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("binary", "frequency", "semantic", "learned"):
            raise ValueError(f"unknown code table kind {self.kind!r}")
        if self.code_of_id is not None:
            if len(self.code_of_id) != self.vocab_size or sorted(self.code_of_id) != list(
                range(self.vocab_size)
            ):
                raise ValueError("code table is not a permutation of [0, vocab_size)")

    @classmethod
    def binary(cls, vocab_size: int) -> CodeTable:
        return cls("binary", vocab_size)

    @classmethod
    def frequency(cls, counts: Sequence[int] | Mapping[int, int], vocab_size: int) -> CodeTable:
        """Rank ids by corpus frequency (most frequent gets code 0; ties by id)."""
        if isinstance(counts, Mapping):
            dense = [0] * vocab_size
            for i, c in counts.items():
                dense[int(i)] = int(c)
            counts = dense
        if len(counts) != vocab_size:
            raise ValueError(f"need {vocab_size} counts, got {len(counts)}")
        order = sorted(range(vocab_size), key=lambda i: (-int(counts[i]), i))
        code = [0] * vocab_size
        for rank, i in enumerate(order):
            code[i] = rank
        return cls("frequency", vocab_size, tuple(code))

    @classmethod
    def semantic(
        cls, sequences: Iterable[Sequence[int]], vocab_size: int, dims: int = 64, seed: int = 0
    ) -> CodeTable:
        """Ids ordered so that tokens used alike share their high bits: each id's context is its
        row of next- and previous-token counts (log1p, L2-normalised, reduced to ``dims`` by a
        seeded randomised SVD); the code tree is then built top down, each node's ids sorted
        along their first principal direction and split where the binary code splits (the left
        child holds the codes whose next bit is 0). A wrong low bit then lands on a similar
        token. Deterministic for the same sequences."""
        V, B = vocab_size, num_bits_for(vocab_size)
        if V > SEMANTIC_MAX_VOCAB:
            raise ValueError(
                f"a semantic code table needs dense V x V counts: vocab_size {V} > "
                f"{SEMANTIC_MAX_VOCAB}; use frequency (sparse counts are not implemented)"
            )
        seqs = [torch.as_tensor(list(s), dtype=torch.long) for s in sequences]
        flat = torch.cat(seqs) if seqs else torch.zeros(0, dtype=torch.long)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= V):
            raise ValueError(f"token id out of range [0, {V})")
        counts = torch.bincount(flat, minlength=V).double()
        keys = torch.cat([s[:-1] * V + s[1:] for s in seqs if len(s) > 1] or [flat[:0]])
        nxt = torch.bincount(keys, minlength=V * V).float()
        nxt = nxt.view(V, V)
        feats = torch.cat([nxt, nxt.T], 1).log1p()
        feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, sv, _ = torch.svd_lowrank(feats, q=min(dims, V - 1))
        x = (u * sv).double()  # [V, dims]
        code = [0] * V

        def place(ids: torch.Tensor, c0: int, k: int) -> None:
            n = len(ids)
            if k == 0 or n <= 1:
                for off, i in enumerate(ids.tolist()):
                    code[i] = c0 + off
                return
            sub = x[ids] - x[ids].mean(0)
            direction = torch.linalg.svd(sub, full_matrices=False)[2][0]
            proj = sub @ direction
            top = int(ids[counts[ids].argmax()])
            if proj[(ids == top).nonzero()[0, 0]] > 0:  # the most frequent id goes left
                proj = -proj
            ids = ids[torch.argsort(proj, stable=True)]
            n_left = max(0, min(V - c0, 1 << (k - 1)))
            place(ids[:n_left], c0, k - 1)
            place(ids[n_left:], c0 + (1 << (k - 1)), k - 1)

        place(torch.arange(V), 0, B)
        return cls("semantic", V, tuple(code))

    def to_json(self) -> str:
        body = {"kind": self.kind, "vocab_size": self.vocab_size, "code_of_id": self.code_of_id}
        return json.dumps(body, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CodeTable:
        try:
            d = json.loads(text)
            codes = d["code_of_id"]
            return cls(d["kind"], int(d["vocab_size"]), None if codes is None else tuple(codes))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"malformed code table JSON: {e}") from None

    @property
    def hash(self) -> str:
        """Content hash (sha256 of the canonical JSON)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def words_to_bits(words: torch.Tensor, num_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Integer codes [...] -> +1/-1 bits [..., num_bits], most significant first."""
    shifts = torch.arange(num_bits - 1, -1, -1, device=words.device)
    return ((words.long().unsqueeze(-1) >> shifts) & 1).to(dtype) * 2 - 1


class BitCodec:
    """Maps ids to +1/-1 bit codes and back; see the module docstring."""

    def __init__(self, vocab_size: int, table: CodeTable | None = None) -> None:
        self.vocab_size = vocab_size
        self.num_bits = num_bits_for(vocab_size)
        if self.num_bits > 62:
            raise ValueError("at most 62 bits are supported")
        self.table = table if table is not None else CodeTable.binary(vocab_size)
        if self.table.vocab_size != vocab_size:
            raise ValueError(
                f"code table is for vocab_size {self.table.vocab_size}, codec for {vocab_size}"
            )
        if self.table.code_of_id is None:
            self._code_of_id = self._id_of_code = None
        else:
            self._code_of_id = torch.tensor(self.table.code_of_id, dtype=torch.long)
            self._id_of_code = torch.argsort(self._code_of_id)
        B = self.num_bits
        self._shifts = torch.arange(B - 1, -1, -1, dtype=torch.long)  # MSB first
        top = vocab_size - 1
        # U = V - 1 as +1/-1 bits, MSB first.
        self._top_bits = torch.tensor([1.0 if (top >> (B - 1 - i)) & 1 else -1.0 for i in range(B)])

    # ---- integer code words ------------------------------------------------------------------
    @property
    def codeword_dtype(self) -> np.dtype:
        """Smallest unsigned integer type that holds B bits (for packed storage)."""
        for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
            if self.num_bits <= np.iinfo(dt).bits:
                return np.dtype(dt)
        raise AssertionError("unreachable")

    def to_codewords(self, ids: torch.Tensor) -> torch.Tensor:
        """ids -> integer codes in [0, V) (int64)."""
        ids = torch.as_tensor(ids).long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        if self._code_of_id is None:
            return ids
        return self._code_of_id.to(ids.device)[ids]

    def from_codewords(self, words: torch.Tensor) -> torch.Tensor:
        """Integer codes -> ids (int64). Codes must be valid (< V)."""
        if not torch.is_tensor(words):
            words = torch.from_numpy(np.asarray(words).astype(np.int64))
        words = words.long()
        if words.numel() and (int(words.min()) < 0 or int(words.max()) >= self.vocab_size):
            raise ValueError(f"code word out of range [0, {self.vocab_size})")
        if self._id_of_code is None:
            return words
        return self._id_of_code.to(words.device)[words]

    def words_to_bits(
        self, words: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Integer codes [...] -> +1/-1 bits [..., B], most significant first."""
        return words_to_bits(words, self.num_bits, dtype)

    def bits_to_words(self, bits: torch.Tensor) -> torch.Tensor:
        """Hard bits [..., B] (sign taken, 0 counts as +1) -> integer codes (may be >= V)."""
        ones = (bits >= 0).long()
        return (ones << self._shifts.to(bits.device)).sum(-1)

    # ---- ids <-> bits ------------------------------------------------------------------------
    def encode(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ids [...] -> +1/-1 bits [..., B]."""
        return self.words_to_bits(self.to_codewords(ids), dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous x [..., B] -> the valid id maximising sum_i x_i c_i (exact repair)."""
        return self.from_codewords(self.repair(x))

    def repair(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous x [..., B] -> the valid code word (< V) maximising sum_i x_i c_i."""
        x = x.float()
        words = self.bits_to_words(x)
        if self.vocab_size == 1 << self.num_bits:
            return words
        u = self._top_bits.to(x.device)  # [B] U's bits as +1/-1
        gain = x * u  # [..., B] score of copying U's bit i
        prefix = torch.cumsum(gain, -1) - gain  # sum over bits above i (exclusive)
        absx = x.abs()
        suffix = absx.flip(-1).cumsum(-1).flip(-1) - absx  # free bits below i (exclusive)
        # Candidate j (U_j = 1): copy U above j, put 0 (-1) at j, best bits below j.
        cand = prefix - x + suffix
        cand = cand.masked_fill(u < 0, float("-inf"))
        score_u = gain.sum(-1, keepdim=True)  # candidate c == U
        best = torch.cat([cand, score_u], -1).argmax(-1)  # [...], B means "U"
        B = self.num_bits
        i = torch.arange(B, device=x.device)
        j = best.unsqueeze(-1)
        top_word = self.vocab_size - 1
        shifts = self._shifts.to(x.device)
        u_bit = (top_word >> shifts) & 1  # [B]
        free_bit = (x >= 0).long()
        bit = torch.where(i < j, u_bit, torch.where(i == j, torch.zeros_like(free_bit), free_bit))
        repaired = (bit << shifts).sum(-1)
        return torch.where(words < self.vocab_size, words, repaired)

    # ---- mean-field likelihood ---------------------------------------------------------------
    def mean_field_log_prob(
        self, p_one: torch.Tensor, ids: torch.Tensor, eps: float = 1e-5
    ) -> torch.Tensor:
        """log q(id) in nats under independent bits P(bit_i = 1) = p_one[..., i], renormalised
        over the valid codes [0, V). p is clamped to [eps, 1 - eps]. Returns [...]."""
        p = p_one.double().clamp(eps, 1 - eps)
        log1, log0 = p.log(), (1 - p).log()
        bits = self.words_to_bits(self.to_codewords(ids), torch.float64) > 0
        logp = torch.where(bits, log1, log0).sum(-1)
        return logp - self.mean_field_log_normaliser(p_one, eps)

    def mean_field_log_normaliser(self, p_one: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
        """log sum_{c < V} prod_i q_i(c_i), exact by the same digit decomposition as repair."""
        p = p_one.double().clamp(eps, 1 - eps)
        if self.vocab_size == 1 << self.num_bits:
            return torch.zeros(p.shape[:-1], dtype=p.dtype, device=p.device)
        log1, log0 = p.log(), (1 - p).log()
        u = self._top_bits.to(p.device) > 0
        follow = torch.where(u, log1, log0)  # log prob of copying U's bit
        prefix = torch.cumsum(follow, -1) - follow
        cand = (prefix + log0).masked_fill(~u, float("-inf"))  # below j sums to 1
        terms = torch.cat([cand, follow.sum(-1, keepdim=True)], -1)
        return torch.logsumexp(terms, -1)
