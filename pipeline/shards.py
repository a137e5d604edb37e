"""Deterministic Parquet shards: ``codes`` (list<uintN>) and ``doc_starts`` (list<int32>).

Shards are serialised in memory with fixed writer options and no timestamps, so the same rows
always give the same bytes (and sha256); the caller writes them with an atomic rename or PUT.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["decode_shard", "encode_shard", "sha256_hex"]

_PA_TYPES = {
    "uint8": pa.uint8(),
    "uint16": pa.uint16(),
    "uint32": pa.uint32(),
    "uint64": pa.uint64(),
}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_shard(codes: np.ndarray, doc_starts: list[list[int]], row_group_rows: int) -> bytes:
    """Rows [R, L] of code words + per-row document offsets -> Parquet bytes."""
    rows, L = codes.shape
    values = pa.array(codes.reshape(-1), type=_PA_TYPES[codes.dtype.name])
    offsets = pa.array(np.arange(0, (rows + 1) * L, L, dtype=np.int32))
    codes_col = pa.ListArray.from_arrays(offsets, values)
    lens = np.fromiter((len(s) for s in doc_starts), dtype=np.int32, count=rows)
    starts_off = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    flat = [s for row in doc_starts for s in row]
    starts_col = pa.ListArray.from_arrays(starts_off, pa.array(flat, type=pa.int32()))
    table = pa.table({"codes": codes_col, "doc_starts": starts_col})
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        row_group_size=row_group_rows,
        compression="zstd",
        compression_level=3,
        use_dictionary=False,
        write_statistics=False,
        store_schema=True,
    )
    return buf.getvalue()


def decode_shard(data: bytes) -> tuple[np.ndarray, list[list[int]]]:
    """Parquet bytes -> (codes [R, L], doc_starts per row)."""
    table = pq.read_table(pa.BufferReader(data))
    col = table.column("codes").combine_chunks()
    rows = len(col)
    values = col.flatten().to_numpy(zero_copy_only=False)
    codes = values.reshape(rows, -1) if rows else values.reshape(0, 0)
    starts = table.column("doc_starts").to_pylist()
    return codes, starts
