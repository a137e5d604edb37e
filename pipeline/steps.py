"""Pipeline steps: small classes, each a pure function over a batch plus counters (datatrove style).

A batch is a dict of equal-length lists, one entry per document, in file order. ``reason`` is None
while a document is alive; the step that drops it writes the reason and counts it. Steps never
remove entries, so document positions (``index``) stay stable for dedup, rejects and verify.
Nothing here imports Ray; the driver composes the steps inside Ray tasks.

No step raises on its input: each document is handled on its own, and any exception on one
document (a bug, a library error, a value of an unexpected type) drops that document as
``<step>_error`` (e.g. ``tokenise_error``), counted like every other reason. Text that cannot be
encoded back to UTF-8 (lone surrogates, e.g. from a JSON ``"\\ud800"`` escape or a docstring)
is dropped by ``Normalise`` as ``invalid_unicode``.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from pipeline.neardedup import Banding, band_keys
from pipeline.readers import READER_REASONS

__all__ = [
    "REASONS",
    "Batch",
    "BinaryFilter",
    "Decode",
    "Dedup",
    "Encode",
    "Filter",
    "HashDocs",
    "LengthFilter",
    "MarkDropped",
    "MarkDuplicates",
    "MarkNearDuplicates",
    "MinHashBands",
    "Normalise",
    "Packer",
    "SplitByHash",
    "Step",
    "Tokenise",
    "doc_hash",
    "is_binary",
    "merge_counters",
    "normalise_text",
    "run_steps",
    "scan_steps",
    "step_counters",
    "unpack",
]

Batch = dict[str, list[Any]]

# Every reason a document can be dropped for: the readers' (pipeline.readers), then the steps' in
# the order they apply, then ``<step>_error`` for a step that failed on a document.
STEP_NAMES = (
    "decode",
    "normalise",
    "binary",
    "length",
    "hash",
    "dedup",
    "near_dedup",
    "split",
    "tokenise",
    "encode",
)
REASONS = (
    *READER_REASONS,
    "binary",
    "invalid_unicode",
    "too_short",
    "too_long",
    "duplicate",
    "near_duplicate",
    *(f"{n}_error" for n in STEP_NAMES),
)
_FATAL = (KeyboardInterrupt, SystemExit)

_CONTROL_BYTES = bytes([*range(0, 9), *range(14, 32), 127])
_CONTROL_TABLE = bytes.maketrans(b"", b"")
# C0/C1 controls except tab and newline; carriage returns are handled before.
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_OR_SURROGATE_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def is_binary(data: bytes | str, max_control_fraction: float) -> bool:
    """Mostly non-text: any NUL, or more than ``max_control_fraction`` control bytes/chars
    (U+FFFD counts too for text)."""
    if not data:
        return False
    if isinstance(data, bytes):
        if b"\x00" in data:
            return True
        n = len(data) - len(data.translate(_CONTROL_TABLE, _CONTROL_BYTES))
    else:
        if "\x00" in data:
            return True
        n = len(_CONTROL_RE.findall(data)) + data.count("\ufffd")
    return n > max_control_fraction * len(data)


def normalise_text(text: str) -> str:
    """Unicode NFC; CRLF and CR -> LF; strip a BOM and control characters except tab/newline."""
    return _normalise(text)[0]


def _normalise(text: str) -> tuple[str, bool]:
    """(``normalise_text(text)``, whether it holds lone surrogates), in one regex pass."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.removeprefix("\ufeff")
    if text.isascii():
        return _CONTROL_RE.sub("", text), False
    text = unicodedata.normalize("NFC", text)
    surrogates = False

    def strip(m: re.Match[str]) -> str:
        nonlocal surrogates
        if m.group() < "\ud800":
            return ""  # a control character
        surrogates = True
        return m.group()

    return _CONTROL_OR_SURROGATE_RE.sub(strip, text), surrogates


def doc_hash(text: str) -> bytes:
    """128-bit hash of the normalised text (exact dedup key; also decides the split)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class Step:
    """A batch -> batch function with counters. Subclasses implement ``one`` (a document) or
    ``apply`` (a batch, guarding each document with ``each``)."""

    name = "step"

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()

    @property
    def error_reason(self) -> str:
        return f"{self.name}_error"

    def __call__(self, batch: Batch) -> Batch:
        self.counters["in"] += alive_count(batch)
        try:
            out = self.apply(batch)
        except BaseException as e:
            if isinstance(e, _FATAL):
                raise
            out = batch  # a batch-level failure: every document still alive is lost to it
            for i in alive(batch):
                self.drop(batch, i, self.error_reason)
        self.counters["out"] += alive_count(out)
        return out

    def apply(self, batch: Batch) -> Batch:
        return self.each(batch, self.one)

    def one(self, batch: Batch, i: int) -> None:
        raise NotImplementedError

    def each(
        self, batch: Batch, fn: Callable[[Batch, int], None], docs: Iterable[int] | None = None
    ) -> Batch:
        """``fn(batch, i)`` for each alive document (or ``docs``); an exception drops that
        document as ``<step>_error`` and the others go on."""
        for i in alive(batch) if docs is None else docs:
            try:
                fn(batch, i)
            except BaseException as e:
                if isinstance(e, _FATAL):
                    raise
                self.drop(batch, i, self.error_reason)
        return batch

    def drop(self, batch: Batch, i: int, reason: str) -> None:
        batch["reason"][i] = reason
        self.counters[f"dropped.{reason}"] += 1


def alive(batch: Batch) -> list[int]:
    return [i for i, r in enumerate(batch["reason"]) if r is None]


def alive_count(batch: Batch) -> int:
    return sum(r is None for r in batch["reason"])


def run_steps(steps: Iterable[Step], batch: Batch) -> Batch:
    for step in steps:
        batch = step(batch)
    return batch


class Decode(Step):
    """Raw bytes -> text: ``binary`` (NUL or many control bytes), then ``invalid_utf8``."""

    name = "decode"

    def __init__(self, max_control_fraction: float = 0.05) -> None:
        super().__init__()
        self.max_control_fraction = max_control_fraction

    def one(self, batch: Batch, i: int) -> None:
        raw = batch["raw"][i]
        if raw is None:
            return
        batch["raw"][i] = None
        if is_binary(raw, self.max_control_fraction):
            self.drop(batch, i, "binary")
            return
        try:
            batch["text"][i] = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.drop(batch, i, "invalid_utf8")


class Normalise(Step):
    """NFC, newlines, no control characters (``normalise_text``); ``invalid_unicode`` for text
    holding lone surrogates, which has no UTF-8 form (and would break hashing and tokenising)."""

    name = "normalise"

    def one(self, batch: Batch, i: int) -> None:
        text = batch["text"][i]
        if not isinstance(text, str):
            raise TypeError(f"text is {type(text).__name__}, not str")
        t, surrogates = _normalise(text)
        if surrogates:
            self.drop(batch, i, "invalid_unicode")
            return
        if t != text:
            self.counters["changed"] += 1
        batch["text"][i] = t


class Filter(Step):
    """Keeps a document when ``reason(text)`` returns None, else drops it with that reason."""

    def reason(self, text: str) -> str | None:
        raise NotImplementedError

    def one(self, batch: Batch, i: int) -> None:
        r = self.reason(batch["text"][i])
        if r is not None:
            self.drop(batch, i, r)


class BinaryFilter(Filter):
    """``binary`` for decoded text that is mostly control characters / replacement chars."""

    name = "binary"

    def __init__(self, max_control_fraction: float = 0.05) -> None:
        super().__init__()
        self.max_control_fraction = max_control_fraction

    def reason(self, text: str) -> str | None:
        return "binary" if is_binary(text, self.max_control_fraction) else None


class LengthFilter(Filter):
    """``empty`` (only whitespace), ``too_short`` and ``too_long`` in characters."""

    name = "length"

    def __init__(self, min_chars: int = 1, max_chars: int = 1_000_000) -> None:
        super().__init__()
        self.min_chars, self.max_chars = min_chars, max_chars

    def reason(self, text: str) -> str | None:
        if not text.strip():
            return "empty"
        if len(text) < self.min_chars:
            return "too_short"
        if len(text) > self.max_chars:
            return "too_long"
        return None


class HashDocs(Step):
    """``hash`` column: ``doc_hash`` of each alive document."""

    name = "hash"

    def apply(self, batch: Batch) -> Batch:
        batch.setdefault("hash", [None] * len(batch["reason"]))
        return self.each(batch, self.one)

    def one(self, batch: Batch, i: int) -> None:
        batch["hash"][i] = doc_hash(batch["text"][i])


class MinHashBands(Step):
    """``bands`` column: the LSH band keys of each alive document (``pipeline.neardedup``); None
    for a document without a word. It never drops: the encode pass does not run it, so a
    failure leaves the document without keys (counted as ``unsigned``), never a near duplicate."""

    name = "minhash"

    def __init__(self, banding: Banding) -> None:
        super().__init__()
        self.banding = banding

    def apply(self, batch: Batch) -> Batch:
        batch.setdefault("bands", [None] * len(batch["reason"]))
        return self.each(batch, self.one)

    def one(self, batch: Batch, i: int) -> None:
        try:
            batch["bands"][i] = band_keys(batch["text"][i], self.banding)
        except Exception:
            self.counters["unsigned"] += 1


class Dedup(Step):
    """Exact dedup, first occurrence wins: drops a document whose hash is in ``seen``, else adds it.
    Feed batches in the global order (earlier runs, then sorted paths, then file order)."""

    name = "dedup"

    def __init__(self, seen: set[bytes] | None = None) -> None:
        super().__init__()
        self.seen: set[bytes] = seen if seen is not None else set()

    def one(self, batch: Batch, i: int) -> None:
        h = batch["hash"][i]
        if not isinstance(h, bytes):
            raise TypeError("no hash")
        if h in self.seen:
            self.drop(batch, i, "duplicate")
        else:
            self.seen.add(h)


class MarkDropped(Step):
    """Drops the documents at ``positions`` (``index`` values) with ``reason``: decisions taken
    elsewhere (the driver's global dedup, drops recorded in the manifest) replayed on a batch."""

    name = "mark"

    def __init__(self, positions: Iterable[int], reason: str) -> None:
        super().__init__()
        self.positions = set(positions)
        self.reason = reason

    def one(self, batch: Batch, i: int) -> None:
        if batch["index"][i] in self.positions:
            self.drop(batch, i, self.reason)


class MarkDuplicates(MarkDropped):
    """Drops the documents at ``positions`` as ``duplicate`` (the driver resolved them globally)."""

    name = "dedup"

    def __init__(self, positions: Iterable[int]) -> None:
        super().__init__(positions, "duplicate")


class MarkNearDuplicates(MarkDropped):
    """Drops the documents at ``positions`` as ``near_duplicate`` (resolved by the driver)."""

    name = "near_dedup"

    def __init__(self, positions: Iterable[int]) -> None:
        super().__init__(positions, "near_duplicate")


class SplitByHash(Step):
    """``split`` column: 'val' for a ``val_fraction`` of documents chosen by hash, else 'train'."""

    name = "split"

    def __init__(self, val_fraction: float) -> None:
        super().__init__()
        self.threshold = round(val_fraction * 1_000_000)

    def split_of(self, h: bytes) -> str:
        return "val" if int.from_bytes(h[:8], "big") % 1_000_000 < self.threshold else "train"

    def apply(self, batch: Batch) -> Batch:
        batch.setdefault("split", [None] * len(batch["reason"]))
        return self.each(batch, self.one)

    def one(self, batch: Batch, i: int) -> None:
        split = self.split_of(batch["hash"][i])
        batch["split"][i] = split
        self.counters[split] += 1


class Tokenise(Step):
    """``ids`` column (int32 arrays) with a ``tokenizers.Tokenizer``; special tokens inside the
    text are encoded as plain text, so the end-of-document id never occurs inside a document."""

    name = "tokenise"

    def __init__(self, tokenizer: Any, batch_docs: int = 256) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True
        self.batch_docs = batch_docs

    def apply(self, batch: Batch) -> Batch:
        batch.setdefault("ids", [None] * len(batch["reason"]))
        live = alive(batch)
        for s in range(0, len(live), self.batch_docs):
            part = live[s : s + self.batch_docs]
            try:
                encs = self._encode([batch["text"][i] for i in part])
            except BaseException as e:
                if isinstance(e, _FATAL):
                    raise
                self.each(batch, self.one, part)  # find the document(s) it failed on
                continue
            for i, ids in zip(part, encs, strict=True):
                self._set(batch, i, ids)
        return batch

    def _encode(self, texts: list[str]) -> list[list[int]]:
        encs = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        if len(encs) != len(texts):
            raise RuntimeError("tokenizer returned a different number of encodings")
        return [e.ids for e in encs]

    def _set(self, batch: Batch, i: int, ids: list[int]) -> None:
        batch["ids"][i] = np.asarray(ids, dtype=np.int32)
        self.counters["tokens"] += len(ids)

    def one(self, batch: Batch, i: int) -> None:
        self._set(batch, i, self._encode([batch["text"][i]])[0])


class Encode(Step):
    """``codes`` column: token ids mapped through the code table (``code_of_id``), as the
    smallest unsigned dtype holding B bits. Same result as ``BitCodec.to_codewords``."""

    name = "encode"

    def __init__(self, code_of_id: np.ndarray, dtype: np.dtype) -> None:
        super().__init__()
        self.code_of_id = np.asarray(code_of_id).astype(dtype)
        self.dtype = np.dtype(dtype)

    def apply(self, batch: Batch) -> Batch:
        batch.setdefault("codes", [None] * len(batch["reason"]))
        return self.each(batch, self.one)

    def one(self, batch: Batch, i: int) -> None:
        ids = np.asarray(batch["ids"][i])
        if ids.dtype.kind not in "iu" or ids.ndim != 1:
            raise TypeError(f"token ids of dtype {ids.dtype}, shape {ids.shape}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= len(self.code_of_id)):
            raise IndexError("token id outside the code table")
        batch["codes"][i] = self.code_of_id[ids]


class Packer:
    """Joins documents, each followed by the end-of-document code, into rows of ``seq_len``.
    The last row is padded with end-of-document codes; ``doc_starts`` lists, per row, the offsets
    where a document begins (a document continuing from the previous row has no entry)."""

    def __init__(self, seq_len: int, eod_code: int, dtype: np.dtype) -> None:
        self.seq_len, self.eod_code, self.dtype = seq_len, eod_code, np.dtype(dtype)

    def pack(self, docs: list[np.ndarray]) -> tuple[np.ndarray, list[list[int]], int]:
        """(codes [rows, L], doc_starts per row, pad tokens)."""
        L = self.seq_len
        if not docs:
            return np.zeros((0, L), self.dtype), [], 0
        lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        total = int(lengths.sum())
        rows = -(-total // L)
        flat = np.full(rows * L, self.eod_code, dtype=self.dtype)
        for s, d in zip(starts.tolist(), docs, strict=True):
            flat[s : s + len(d)] = d
        row_of = starts // L
        doc_starts: list[list[int]] = [[] for _ in range(rows)]
        for r, off in zip(row_of.tolist(), (starts % L).tolist(), strict=True):
            doc_starts[r].append(off)
        return flat.reshape(rows, L), doc_starts, rows * L - total


def unpack(codes: np.ndarray, doc_starts: list[list[int]], eod_code: int) -> list[np.ndarray]:
    """Inverse of ``Packer.pack``: the documents (without their end-of-document code)."""
    if len(codes) == 0:
        return []
    L = codes.shape[1]
    flat = codes.reshape(-1)
    starts = np.array([r * L + s for r, row in enumerate(doc_starts) for s in row], dtype=np.int64)
    eods = np.flatnonzero(flat == eod_code)
    ends = eods[np.searchsorted(eods, starts)]
    return [flat[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]


def step_counters(steps: Iterable[Step]) -> dict[str, dict[str, int]]:
    return {s.name: dict(s.counters) for s in steps}


def merge_counters(into: dict[str, dict[str, int]], more: dict[str, dict[str, int]]) -> None:
    for name, c in more.items():
        d = into.setdefault(name, {})
        for k, v in c.items():
            d[k] = d.get(k, 0) + int(v)


def scan_steps(max_control_fraction: float, min_chars: int, max_chars: int) -> list[Step]:
    """decode -> normalise -> binary -> length -> hash: the steps that decide what is kept."""
    return [
        Decode(max_control_fraction),
        Normalise(),
        BinaryFilter(max_control_fraction),
        LengthFilter(min_chars, max_chars),
        HashDocs(),
    ]
