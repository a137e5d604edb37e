"""Dedup state on storage, sharded by key prefix, resolved by workers (never whole in the driver).

Keys: a document's exact hash (16 bytes, as two big-endian uint64 ``hi``/``lo``, ``kind`` 0) and,
with near_dedup, each of its LSH band keys (``hi`` = the key, ``lo`` = 0, ``kind`` 1). A key's
prefix is the top ``PREFIX_BITS`` bits of ``hi``; both kinds are uniform hashes, so prefixes are
even.

- The dataset's state: ``dedup/<run id>/<part>.parquet``, per run and part (a range of
  prefixes), the keys that run added and no earlier run held (``kind, hi, lo``, sorted by ``hi``,
  row groups of ``STATE_ROWS`` keys with statistics). Immutable: a committed run's files are never
  rewritten; the manifest's ``runs[].dedup`` names each run's id and part count, and only files
  of committed runs are read, so files left by a killed attempt are ignored (and removed after
  the next commit).
- A scan task writes its unit's keys (``_work/keys/...``): one row group per *part* (a range of
  prefixes), each row a key with the document's place in this run (``f``: file ordinal in
  processing order, ``pos``: position in the file).
- A resolve task per part reads that row group of every unit's keys file, and of the earlier
  runs' state files that cover its prefixes the row groups whose ``hi`` range holds one of its
  keys (an incremental run with few new
  documents reads few of them, never an earlier index file). A key is a *hit* when an earlier
  holder exists: one in the state, or one earlier in this run (smaller ``(f, pos)``). It writes
  the part's new keys to the state and the hits (``f, pos, kind``) to ``_work/verdicts/``.
- The encode task of a unit reads the hits of its files from every part: an exact hit is a
  ``duplicate``; otherwise a near hit is a ``near_duplicate``. That is the rule of
  ``pipeline.neardedup.near_duplicates`` and of first-occurrence exact dedup, decided key by key,
  so the result does not depend on the number of parts or of CPUs.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import Storage, with_env_credentials

__all__ = [
    "PREFIX_BITS",
    "doc_keys",
    "keys_table_bytes",
    "read_hits",
    "resolve_part",
    "state_files",
]

PREFIX_BITS = 8  # 256 prefixes: ~4M documents each at 1B (docs/preprocessing.md)
STATE_ROWS = 1 << 16  # keys per state row group (the unit an incremental lookup reads)
EXACT, NEAR = 0, 1
_SHIFT = np.uint64(64 - PREFIX_BITS)

KEYS_SCHEMA = pa.schema(
    [
        ("part", pa.uint16()),
        ("kind", pa.uint8()),
        ("hi", pa.uint64()),
        ("lo", pa.uint64()),
        ("f", pa.int32()),
        ("pos", pa.int64()),
    ]
)
STATE_SCHEMA = pa.schema([("kind", pa.uint8()), ("hi", pa.uint64()), ("lo", pa.uint64())])
HITS_SCHEMA = pa.schema([("f", pa.int32()), ("pos", pa.int64()), ("kind", pa.uint8())])


def part_of(hi: np.ndarray, parts: int) -> np.ndarray:
    """The part (resolve task) of each key: its prefix scaled to ``parts`` contiguous ranges."""
    prefix = (hi >> _SHIFT).astype(np.int64)
    return (prefix * parts >> PREFIX_BITS).astype(np.uint16)


def doc_keys(
    f: int, positions: list[int], hashes: list[bytes], bands: list[list[int] | None] | None
) -> dict[str, np.ndarray]:
    """Key columns (``kind, hi, lo, f, pos``) of one file's documents (hash and band keys of
    those given; ``bands`` None without near_dedup)."""
    n = len(positions)
    pos = np.asarray(positions, np.int64)
    h = np.frombuffer(b"".join(hashes), ">u8").reshape(n, 2).astype(np.uint64)
    kind, hi, lo, dpos = [np.zeros(n, np.uint8)], [h[:, 0]], [h[:, 1]], [pos]
    if bands is not None:
        lens = np.fromiter((len(b or ()) for b in bands), np.int64, count=n)
        flat = np.fromiter((k for b in bands for k in b or ()), np.uint64, count=int(lens.sum()))
        kind.append(np.ones(flat.size, np.uint8))
        hi.append(flat)
        lo.append(np.zeros(flat.size, np.uint64))
        dpos.append(np.repeat(pos, lens))
    p = np.concatenate(dpos)
    return {
        "kind": np.concatenate(kind),
        "hi": np.concatenate(hi),
        "lo": np.concatenate(lo),
        "f": np.full(p.size, f, np.int32),
        "pos": p,
    }


def keys_table_bytes(cols: list[dict[str, np.ndarray]], parts: int) -> bytes:
    """A unit's keys file: one row group per part that has keys (part order)."""
    kind, hi, lo, f, pos = (
        np.concatenate([np.zeros(0, dt), *(k[c] for k in cols)])
        for c, dt in (
            ("kind", np.uint8),
            ("hi", np.uint64),
            ("lo", np.uint64),
            ("f", np.int32),
            ("pos", np.int64),
        )
    )
    part = part_of(hi, parts)
    order = np.argsort(part, kind="stable")
    table = pa.table(
        {
            "part": part[order],
            "kind": kind[order],
            "hi": hi[order],
            "lo": lo[order],
            "f": f[order],
            "pos": pos[order],
        },
        schema=KEYS_SCHEMA,
    )
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, KEYS_SCHEMA, compression="zstd") as w:
        bounds = np.searchsorted(part[order], np.arange(parts + 1))
        for r in range(parts):
            if bounds[r + 1] > bounds[r]:
                w.write_table(table.slice(bounds[r], bounds[r + 1] - bounds[r]))
        if not table.num_rows:
            w.write_table(table)
    return buf.getvalue()


def _row_group_of_part(pf: pq.ParquetFile, part: int) -> int | None:
    md = pf.metadata
    col = pf.schema_arrow.get_field_index("part")
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        if rg.num_rows and rg.column(col).statistics.min == part:
            return g
    return None


def _read_part(storage: Storage, url: str, part: int) -> pa.Table | None:
    pf = pq.ParquetFile(pa.BufferReader(storage.read_bytes(url)))
    g = _row_group_of_part(pf, part)
    return None if g is None else pf.read_row_group(g, columns=["kind", "hi", "lo", "f", "pos"])


def _prefix_range(part: int, parts: int) -> tuple[int, int]:
    """The prefixes ``[first, end)`` of ``part`` (the inverse of ``part_of``)."""
    n = 1 << PREFIX_BITS
    return -(-part * n // parts), -(-(part + 1) * n // parts)


def state_files(committed: list[dict[str, Any]], part: int, parts: int) -> list[str]:
    """The state files of committed runs (``{"id", "parts"}`` each) that hold prefixes of
    ``part`` of ``parts``: ``dedup/<id>/<part>.parquet``."""
    first, end = _prefix_range(part, parts)
    out = []
    for run in committed:
        for q in range(run["parts"]):
            a, b = _prefix_range(q, run["parts"])
            if a < end and first < b:
                out.append(f"dedup/{run['id']}/{q:05d}.parquet")
    return out


def _earlier(storage: Storage, root: str, files: list[str], hi: np.ndarray) -> pa.Table:
    """The state keys in the row groups of ``files`` whose ``hi`` range holds one of ``hi``
    (sorted); the files are opened for random access, so only those row groups are fetched."""
    parts = [STATE_SCHEMA.empty_table()]
    for name in files:
        fobj = storage.open_input(f"{root}/{name}")
        try:
            pf = pq.ParquetFile(fobj)
            col = pf.schema_arrow.get_field_index("hi")
            for g in range(pf.metadata.num_row_groups):
                st = pf.metadata.row_group(g).column(col).statistics
                if st is None or not st.has_min_max:
                    continue
                first = np.searchsorted(hi, np.uint64(st.min), side="left")
                if np.searchsorted(hi, np.uint64(st.max), side="right") > first:
                    parts.append(pf.read_row_group(g))
        finally:
            fobj.close()
    return pa.concat_tables(parts)


def _np(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy()


def _seed_keys(storage: Storage, root: str, index: str, part: int, parts: int) -> pa.Table:
    """Keys of an index file written before the state existed (a dataset made by an older
    version): its documents' hashes and band keys that fall in ``part``, as state keys."""
    t = pq.read_table(pa.BufferReader(storage.read_bytes(f"{root}/{index}")))
    t = t.filter(t.column("hash").is_valid())
    bands = t.column("bands").to_pylist() if "bands" in t.column_names else None
    k = doc_keys(0, list(range(t.num_rows)), t.column("hash").to_pylist(), bands)
    keep = part_of(k["hi"], parts) == part
    return pa.table({c: k[c][keep] for c in ("kind", "hi", "lo")}, schema=STATE_SCHEMA)


def resolve_part(spec: dict[str, Any]) -> dict[str, Any]:
    """One part: hits of this run's keys against the state and earlier keys of this run; writes
    the new state files of its prefixes and ``_work/verdicts/<key>/<part>.parquet`` (last)."""
    storage = Storage(with_env_credentials(spec["s3"]))
    root, part, parts, run_id = spec["root"], spec["part"], spec["parts"], spec["run_id"]
    tables = [t for u in spec["keys"] if (t := _read_part(storage, f"{root}/{u}", part))]
    new = pa.concat_tables([KEYS_SCHEMA.remove(0).empty_table(), *tables])
    seed = pa.concat_tables(
        [
            STATE_SCHEMA.empty_table(),
            *(_seed_keys(storage, root, i, part, parts) for i in spec["seed"]),
        ]
    )
    # entries: 0 = in the state, 1 = seeded from an old index, 2 = this run's
    kind = np.concatenate([_np(seed, "kind"), _np(new, "kind")])
    hi = np.concatenate([_np(seed, "hi"), _np(new, "hi")])
    lo = np.concatenate([_np(seed, "lo"), _np(new, "lo")])
    f = np.concatenate([np.full(seed.num_rows, -1, np.int32), _np(new, "f")])
    pos = np.concatenate([np.full(seed.num_rows, -1, np.int64), _np(new, "pos")])
    src = np.concatenate([np.ones(seed.num_rows, np.int8), np.full(new.num_rows, 2, np.int8)])
    old = _earlier(storage, root, state_files(spec["committed"], part, parts), np.sort(hi))
    keep = part_of(_np(old, "hi"), parts) == part  # an earlier run's file may span more prefixes
    n = int(keep.sum())
    a_kind = np.concatenate([_np(old, "kind")[keep], kind])
    a_hi = np.concatenate([_np(old, "hi")[keep], hi])
    a_lo = np.concatenate([_np(old, "lo")[keep], lo])
    a_f = np.concatenate([np.full(n, -1, np.int32), f])
    a_pos = np.concatenate([np.full(n, -1, np.int64), pos])
    a_src = np.concatenate([np.zeros(n, np.int8), src])
    # by key, then state before seed before this run, then by place: the first of each key is
    # its earliest holder
    order = np.lexsort((a_pos, a_f, a_src, a_lo, a_hi, a_kind))
    k_kind, k_hi, k_lo = a_kind[order], a_hi[order], a_lo[order]
    same = np.zeros(order.size, bool)
    same[1:] = (k_kind[1:] == k_kind[:-1]) & (k_hi[1:] == k_hi[:-1]) & (k_lo[1:] == k_lo[:-1])
    hit = order[same & (a_src[order] == 2)]
    h = np.stack([a_f[hit].astype(np.int64), a_pos[hit], a_kind[hit].astype(np.int64)])
    first = order[~same & (a_src[order] > 0)]  # keys no committed run held: this run's state
    s = np.lexsort((a_lo[first], a_kind[first], a_hi[first]))
    add = pa.table(
        {"kind": a_kind[first][s], "hi": a_hi[first][s], "lo": a_lo[first][s]},
        schema=STATE_SCHEMA,
    )
    storage.write_atomic(f"{root}/dedup/{run_id}/{part:05d}.parquet", _parquet(add, STATE_ROWS))
    order = np.lexsort((h[2], h[1], h[0]))
    out = pa.table(
        {
            "f": h[0][order].astype(np.int32),
            "pos": h[1][order],
            "kind": h[2][order].astype(np.uint8),
        },
        schema=HITS_SCHEMA,
    )
    storage.write_atomic(f"{root}/{spec['verdicts']}", _parquet(out, STATE_ROWS))
    return {"part": part, "keys": int(hi.size), "hits": out.num_rows, "state_keys_read": n}


def _parquet(table: pa.Table, rows: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=rows, compression="zstd", write_statistics=True)
    return buf.getvalue()


def read_hits(
    storage: Storage, root: str, verdicts: list[str], f_lo: int, f_hi: int
) -> dict[int, dict[int, int]]:
    """{file ordinal: {position: kind}} of the hits of files ``f_lo..f_hi`` (every part; an exact
    hit wins over a near one)."""
    out: dict[int, dict[int, int]] = {}
    for v in verdicts:
        pf = pq.ParquetFile(pa.BufferReader(storage.read_bytes(f"{root}/{v}")))
        col = pf.schema_arrow.get_field_index("f")
        for g in range(pf.metadata.num_row_groups):
            st = pf.metadata.row_group(g).column(col).statistics
            if st is None or not st.has_min_max or st.max < f_lo or st.min > f_hi:
                continue
            t = pf.read_row_group(g)
            for fi, p, k in zip(
                *(t.column(c).to_pylist() for c in ("f", "pos", "kind")), strict=True
            ):
                if f_lo <= fi <= f_hi:
                    d = out.setdefault(fi, {})
                    d[p] = min(k, d.get(p, k))
    return out
