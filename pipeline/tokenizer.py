"""Tokenizer and code table of a dataset, built once (first run) and then kept.

The tokenizer is either copied from a given tokenizer.json or a byte-level BPE trained with the
``tokenizers`` library on a deterministic sample: documents that pass the filters, taken from the
input files in the order of sha256(path), until ``sample_bytes`` of text. The end-of-document
token is the first special token (id 0). The code table (``bitlm.codec.CodeTable``) is the
identity ("binary") or ranks ids by their frequency in the tokenised sample ("frequency").
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:
    from bitlm.codec import CodeTable

__all__ = ["build_code_table", "eod_id_of", "frequency_table", "sample_order", "train_bpe"]


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, eod_token: str) -> str:
    """A byte-level BPE trained on ``texts``; returns its tokenizer.json text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eod_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def eod_id_of(tokenizer: Tokenizer, eod_token: str) -> int:
    i = tokenizer.token_to_id(eod_token)
    if i is None:
        raise ValueError(f"the tokenizer has no end-of-document token {eod_token!r}")
    return int(i)


def build_code_table(kind: str, tokenizer: Tokenizer, sample: list[str], eod_id: int) -> CodeTable:
    """'binary' (identity), 'frequency' (ids ranked by count in the tokenised sample) or
    'semantic' (ids that occur in alike contexts of the sample share their high bits)."""
    from bitlm.codec import CodeTable

    vocab = tokenizer.get_vocab_size()
    if kind == "binary":
        return CodeTable.binary(vocab)
    counts = np.zeros(vocab, dtype=np.int64)
    docs: list[list[int]] = []
    tokenizer.encode_special_tokens = True
    for s in range(0, len(sample), 256):
        for e in tokenizer.encode_batch_fast(sample[s : s + 256], add_special_tokens=False):
            counts += np.bincount(np.asarray(e.ids, dtype=np.int64), minlength=vocab)
            if kind == "semantic":
                docs.append([*e.ids, eod_id])
    counts[eod_id] += len(sample)
    if kind == "semantic":
        return CodeTable.semantic(docs, vocab)
    return frequency_table(counts)


def frequency_table(counts: np.ndarray) -> CodeTable:
    """The ``frequency`` code table of per-id token counts (the end-of-document token counted
    once per document). The first run's scan tasks count the sample's tokens for it."""
    from bitlm.codec import CodeTable

    return CodeTable.frequency(np.asarray(counts, np.int64).tolist(), len(counts))


def sample_order(paths: list[str]) -> list[str]:
    """Deterministic pseudo-random file order for the training sample."""
    return sorted(paths, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
