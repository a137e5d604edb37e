"""Training-side reader of a preprocessed dataset (docs/dataset-format.md; the manifest and
its versions are ``bitlm.dataset_format``'s).

    manifest.json -> shards of one split -> global rows 0..N-1 (shard order as in the manifest)
    position p (samples consumed since the start of training) -> epoch p // N, and the row
        perm_epoch(p % N), where perm_epoch is a keyed Feistel permutation of [0, N)
    optimizer step s consumes positions [s G, (s+1) G) (G = global batch); rank r of W takes the
        r-th contiguous slice of G / W, cut into micro-batches.

The order is a pure function of (seed, position): it does not depend on the number of workers
and resuming is index arithmetic (no replay, no state beyond the position). A permutation costs
O(1) memory, so it scales to billions of rows (levanter's design).

Versions: each preprocessing run that commits the manifest is a version (its ``run`` number);
version v is the shards of runs 1..v. Runs only append, so version v's rows are the first rows of
every later version, and a reader pinned to v sees the same rows (and order) however much the
dataset grows. ``select_version`` is the rule a launch uses to pick one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq

from ..codec import BitCodec
from ..dataset_format import DataError, Manifest
from ..storage import open_fs

__all__ = [
    "DataError",
    "Dataset",
    "FeistelPermutation",
    "Manifest",
    "open_fs",
    "rank_positions",
    "select_version",
]

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A keyed pseudo-random permutation of [0, n): a balanced Feistel network on the smallest
    even number of bits covering n, with cycle walking back into range."""

    ROUNDS = 6

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError("cannot permute an empty range")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.half = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        seeds = [(key * 0x9E3779B1 + r * 0x632BE5AB) & 0xFFFFFFFFFFFFFFFF for r in range(6)]
        self.keys = _splitmix64(np.array(seeds[: self.ROUNDS], dtype=np.uint64))

    def _round_trip(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_splitmix64(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        x = np.asarray(idx, dtype=np.uint64)
        if x.size and int(x.max()) >= self.n:
            raise IndexError("index out of range")
        y = self._round_trip(x)
        out_of_range = y >= np.uint64(self.n)
        while out_of_range.any():
            y[out_of_range] = self._round_trip(y[out_of_range])
            out_of_range = y >= np.uint64(self.n)
        return y.astype(np.int64)


def select_version(
    setting: Literal["pinned", "latest"] | int, latest: int, pinned: int | None
) -> int:
    """The dataset version a launch trains on (``data.dataset_version``): ``"pinned"`` keeps the
    checkpoint's version ``pinned`` (a fresh run, ``pinned`` None, takes ``latest``), ``"latest"``
    takes ``latest``, an integer takes that version."""
    if isinstance(setting, int):
        if not 1 <= setting <= latest:
            raise DataError(f"data.dataset_version={setting}: the dataset has versions 1..{latest}")
        return setting
    if setting == "latest" or pinned is None:
        return latest
    return pinned


def rank_positions(step: int, rank: int, world_size: int, global_batch: int) -> np.ndarray:
    """The sample positions rank ``rank`` consumes at optimizer step ``step`` (0-based)."""
    per_rank = global_batch // world_size
    start = step * global_batch + rank * per_rank
    return np.arange(start, start + per_rank, dtype=np.int64)


class Dataset:
    """One split, random access by global row, deterministic order by position."""

    def __init__(
        self,
        root: str,
        split: str = "train",
        seed: int = 0,
        cache_row_groups: int = 64,
        version: int | None = None,
    ) -> None:
        """``version``: the dataset version to read (None: the newest)."""
        self.manifest = Manifest.load(root)
        if version is not None:
            self.manifest = self.manifest.at_version(version)
        self.version = self.manifest.version
        self.split = split
        self.seed = seed
        shards = self.manifest.split(split)
        if not shards:
            raise DataError(f"{root}: no shards in split {split!r}")
        self.shards = shards
        self.offsets = np.cumsum([0] + [s.rows for s in shards])
        self.num_rows = int(self.offsets[-1])
        if self.num_rows == 0:
            raise DataError(f"{root}: split {split!r} has no rows")
        self.fingerprint = self.manifest.fingerprint(split)
        self.codec = BitCodec(self.manifest.vocab_size, self.manifest.code_table())
        self._fs, self._base = open_fs(root)
        self._files: dict[int, tuple[pq.ParquetFile, np.ndarray]] = {}
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_size = cache_row_groups
        self._perms: dict[int, FeistelPermutation] = {}
        self._lock = threading.Lock()

    # ---- order -------------------------------------------------------------------------------
    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        """Sample positions -> global row indices (epoch e uses permutation key (seed, e))."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, within = np.divmod(positions, self.num_rows)
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            e = int(e)
            if e not in self._perms:
                self._perms[e] = FeistelPermutation(self.num_rows, self.seed * 1_000_003 + e)
            sel = epochs == e
            out[sel] = self._perms[e](within[sel])
        return out

    # ---- rows --------------------------------------------------------------------------------
    def _file(self, i: int) -> tuple[pq.ParquetFile, np.ndarray]:
        if i not in self._files:
            info = self.shards[i]
            f = pq.ParquetFile(self._fs.open_input_file(f"{self._base}/{info.path}"))
            md = f.metadata
            if md.num_rows != info.rows:
                raise DataError(
                    f"{info.path}: {md.num_rows} rows but the manifest says {info.rows}"
                )
            rg_starts = np.cumsum(
                [0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)]
            )
            self._files[i] = (f, rg_starts)
        return self._files[i]

    def _row_group(self, shard: int, rg: int) -> np.ndarray:
        key = (shard, rg)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        f, _ = self._file(shard)
        col = f.read_row_group(rg, columns=["codes"]).column("codes").combine_chunks()
        flat = col.flatten().to_numpy(zero_copy_only=False)
        L = self.manifest.seq_len
        if len(flat) != len(col) * L:
            raise DataError(f"{self.shards[shard].path}: rows are not all {L} codes long")
        arr = flat.reshape(len(col), L)
        self._cache[key] = arr
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return arr

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Global row indices -> code words [n, seq_len] (int64)."""
        out = np.empty((len(rows), self.manifest.seq_len), dtype=np.int64)
        with self._lock:
            shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
            for j, (row, s) in enumerate(zip(rows, shard_of, strict=True)):
                local = int(row - self.offsets[s])
                _, rg_starts = self._file(int(s))
                g = int(np.searchsorted(rg_starts, local, side="right") - 1)
                out[j] = self._row_group(int(s), g)[local - rg_starts[g]]
        return out

    def tokens_at(self, positions: np.ndarray) -> Any:
        """Sample positions -> token ids as a torch LongTensor [n, seq_len]."""
        import torch

        words = torch.from_numpy(self.read_rows(self.rows_at(positions)))
        return self.codec.from_codewords(words)
