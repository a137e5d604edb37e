"""Near-duplicate detection: MinHash (datasketch) over word n-gram shingles, LSH band keys.

A document's words are ``\\w+`` runs of its lower-cased text; its shingles are the sets of
``ngram`` consecutive words (a document of fewer words is one shingle). Each word is hashed with
CRC-32 and each shingle's hash is a 64-bit polynomial of its word hashes, mixed and cut to 32 bits,
all in numpy (1.5x faster than datasketch's per-shingle SHA-1 in Python, measured on the stdlib);
datasketch's ``MinHash`` (seeded permutations, the same in every process) turns those into
``num_perm`` minimum hashes. The signature is cut into ``bands`` bands of ``rows`` values; each
band's key is an 8-byte blake2b of (band number, its values), so two documents share a key
exactly when they agree on a whole band.

Resolution (``near_duplicates``), in processing order: a document is a near duplicate when one of
its band keys belongs to an earlier document; every document's keys count, so near copies chain
(as datatrove's clusters: one document is kept per group). Documents without a word have no
signature and are never near duplicates. The rule is decided key by key (is this document the
earliest holder of each of its keys?), so it is computed with one sort in numpy, and could be
computed shard by shard of the keys. Nothing here imports Ray.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from zlib import crc32

import numpy as np

__all__ = [
    "Banding",
    "band_keys",
    "lsh_params",
    "near_duplicates",
    "shingle_hashes",
    "signature_scheme",
    "words",
]

SEED = 1  # datasketch's permutation seed (fixed: it is part of the dataset's content)
_WORD = re.compile(r"\w+")
_K = np.uint64(0x9E3779B97F4A7C15)
_M = np.uint64(0xFF51AFD7ED558CCD)
_S33 = np.uint64(33)
_LOW32 = np.uint64(0xFFFFFFFF)


def signature_scheme() -> str:
    """Names what decides the band keys beyond the recipe (the library's permutations and our
    hashing); a dataset refuses a run whose scheme differs."""
    from importlib.metadata import version

    return f"datasketch-{version('datasketch')}/affine32/seed{SEED}/crc32-poly-shingles"


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising false positives + false negatives at ``threshold``
    (datasketch's ``MinHashLSH`` choice, equal weights)."""
    from datasketch.lsh import _optimal_param

    b, r = _optimal_param(threshold, num_perm, 0.5, 0.5)
    return int(b), int(r)


@dataclass(frozen=True)
class Banding:
    """MinHash size, LSH bands x rows and shingle width of a dataset."""

    num_perm: int
    bands: int
    rows: int
    ngram: int


def words(text: str) -> list[str]:
    """The words a document is shingled by: ``\\w+`` runs of its lower-cased text."""
    return _WORD.findall(text.lower())


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """Sorted unique 32-bit hashes of the word ``ngram``-shingles of ``text`` (empty: no words)."""
    ws = words(text)
    if not ws:
        return np.zeros(0, np.uint32)
    h = np.fromiter((crc32(w.encode()) for w in ws), np.uint64, count=len(ws))
    m = max(1, len(ws) - ngram + 1)
    acc = np.zeros(m, np.uint64)
    for j in range(min(ngram, len(ws))):
        acc = acc * _K + h[j : j + m]
    acc ^= acc >> _S33
    acc *= _M
    acc ^= acc >> _S33
    return np.unique((acc & _LOW32).astype(np.uint32))


@lru_cache(maxsize=4)
def _permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    from datasketch import MinHash

    return MinHash(num_perm, seed=SEED).permutations


def band_keys(text: str, banding: Banding) -> list[int] | None:
    """The LSH band keys (``bands`` unsigned 64-bit ints) of ``text``; None when it has no word."""
    from datasketch import MinHash

    hv = shingle_hashes(text, banding.ngram)
    if not hv.size:
        return None
    m = MinHash(
        banding.num_perm,
        seed=SEED,
        hashfunc=int,
        permutations=_permutations(banding.num_perm),
        scheme="affine32",
    )
    m.update_batch(hv.tolist())
    sig = m.hashvalues.astype("<u4")
    r = banding.rows
    return [
        int.from_bytes(
            hashlib.blake2b(
                b.to_bytes(2, "little") + sig[b * r : (b + 1) * r].tobytes(), digest_size=8
            ).digest(),
            "little",
        )
        for b in range(banding.bands)
    ]


def near_duplicates(
    keys: np.ndarray, lens: np.ndarray, earlier: np.ndarray | None = None
) -> np.ndarray:
    """Per document (processing order; ``lens[i]`` keys each, concatenated in ``keys``): True when
    one of its keys belongs to an earlier document or is in ``earlier`` (the sorted keys of
    documents before all of them)."""
    hit = np.zeros(len(lens), bool)
    if not keys.size:
        return hit
    doc = np.repeat(np.arange(len(lens)), lens)
    if earlier is not None and earlier.size:
        pos = np.minimum(np.searchsorted(earlier, keys), earlier.size - 1)
        hit[doc[earlier[pos] == keys]] = True
    order = np.lexsort((doc, keys))  # by key, then by document: the first is the earliest holder
    k = keys[order]
    later = np.zeros(k.size, bool)
    later[1:] = k[1:] == k[:-1]
    hit[doc[order[later]]] = True
    return hit
