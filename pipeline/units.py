"""Units of work, run inside Ray Data tasks (and directly by unit tests): ``scan`` and ``encode``.

A unit is a deterministic group of input files (its id is a hash of their paths). Both functions
take a plain JSON-able spec, write their outputs with atomic whole-object writes, and finish with a
marker, so a killed run that is rerun finds the finished units and redoes only the rest:

- scan: read -> decode -> normalise -> filters -> hash (-> MinHash band keys with near_dedup),
  for each file; writes one ``index/<key>.parquet`` for the unit (one row per document: file path,
  position, hash, drop reason, and the ``bands`` keys with near_dedup; <key> hashes the run
  number, the limits, the near_dedup banding and the files' paths, sizes and mtimes). Its
  presence is the marker. The driver resolves duplicates and near duplicates globally from these
  files.
- encode: the same steps again, then mark the (near) duplicates the driver resolved -> split ->
  tokenise -> bit-encode -> pack -> write ``shards/<split>/<unit>-00000.parquet`` (and optional
  ``rejects/<unit>.jsonl.gz``), then the marker ``_work/units/<unit>.json``.

Bad content never fails a unit (readers and steps turn it into counted drops). A file whose bytes
cannot be fetched (``InputUnreadable``), or that changed between the two passes, is *skipped*: it
has no index rows / is left out of the shards, the result names it under ``skipped``, and the
driver leaves it out of the manifest so that the next run tries it again. A document that only
the encode pass can lose (``tokenise_error``, ``encode_error``, ``split_error``) is a *late drop*:
the marker lists its position under ``late_drops`` and the driver moves it from kept to dropped.

This module must not import torch (workers stay light): code words are looked up with numpy.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.neardedup import Banding
from pipeline.readers import InputUnreadable, read_documents
from pipeline.shards import encode_shard, sha256_hex
from pipeline.steps import (
    Batch,
    Encode,
    MarkDuplicates,
    MarkNearDuplicates,
    MinHashBands,
    Packer,
    SplitByHash,
    Step,
    Tokenise,
    alive,
    merge_counters,
    run_steps,
    scan_steps,
    step_counters,
)
from pipeline.storage import Storage, with_env_credentials

__all__ = [
    "codeword_dtype",
    "encode_unit",
    "index_bands",
    "index_rows",
    "index_table",
    "read_input",
    "run_task",
    "scan_unit",
]

_CACHE: dict[str, Any] = {}


def codeword_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding B = ceil(log2 V) bits (as ``BitCodec.codeword_dtype``)."""
    bits = max(1, math.ceil(math.log2(vocab_size)))
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if bits <= np.iinfo(dt).bits:
            return np.dtype(dt)
    raise ValueError(f"vocab_size {vocab_size} too large")


def read_input(storage: Storage, f: dict[str, Any], limits: dict[str, Any] | None) -> Batch:
    """The raw documents of one input file, streamed from storage under ``limits`` (None: no
    caps, for datasets recorded before limits existed). Raises only ``InputUnreadable``."""
    limits = limits or {}
    try:
        fobj = storage.open_input(f["path"])
    except Exception as e:
        raise InputUnreadable(f"{type(e).__name__}: {e}") from None
    try:
        return read_documents(
            fobj,
            f["path"],
            f["format"],
            f["text_unit"],
            f["text_field"],
            limits.get("max_file_bytes"),
            limits.get("max_doc_bytes"),
            limits.get("max_docs_per_file"),
        )
    finally:
        with contextlib.suppress(Exception):
            fobj.close()


class _Read(Step):
    """Counters of the reader (the documents it found and those it already dropped), so that the
    summary's stage table starts with them."""

    name = "read"

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["reason"])
        self.counters["in"] += n
        for r in batch["reason"]:
            if r is not None:
                self.counters[f"dropped.{r}"] += 1
        self.counters["out"] += n - sum(r is not None for r in batch["reason"])
        return batch


def _read_file(
    storage: Storage,
    f: dict[str, Any],
    filters: dict[str, Any],
    limits: dict[str, Any] | None,
    banding: Banding | None = None,
) -> tuple[Batch, list]:
    batch = read_input(storage, f, limits)
    steps = [
        _Read(),
        *scan_steps(filters["max_control_fraction"], filters["min_chars"], filters["max_chars"]),
        *([MinHashBands(banding)] if banding else []),
    ]
    return run_steps(steps, batch), steps


INDEX_SCHEMA = pa.schema(
    [("path", pa.string()), ("index", pa.int64()), ("hash", pa.binary(16)), ("reason", pa.string())]
)
BANDS_FIELD = pa.field("bands", pa.list_(pa.uint64()))  # with near_dedup only


def index_table(path: str, batch: Batch, bands: bool = False) -> pa.Table:
    """One row per document of a file: path, position, 16-byte hash (null if dropped), reason,
    and with ``bands`` its LSH band keys (null if dropped or without a word)."""
    n = len(batch["reason"])
    alive = [r is None for r in batch["reason"]]
    hashes = batch.get("hash", [None] * n)
    cols = {
        "path": pa.array([path] * n, type=pa.string()),
        "index": pa.array(batch["index"], type=pa.int64()),
        "hash": pa.array(
            [h if a else None for h, a in zip(hashes, alive, strict=True)], type=pa.binary(16)
        ),
        "reason": pa.array(batch["reason"], type=pa.string()),
    }
    schema = INDEX_SCHEMA
    if bands:
        keys = batch.get("bands", [None] * n)
        cols["bands"] = pa.array(
            [k if a else None for k, a in zip(keys, alive, strict=True)], type=BANDS_FIELD.type
        )
        schema = schema.append(BANDS_FIELD)
    return pa.table(cols, schema=schema)


def index_rows(
    table: pa.Table,
) -> dict[str, tuple[list[int], list[bytes | None], list[str | None]]]:
    """An index table -> {path: (positions, hashes, reasons)}, in file and document order."""
    out: dict[str, tuple[list[int], list[bytes | None], list[str | None]]] = {}
    cols = [table.column(c).to_pylist() for c in ("path", "index", "hash", "reason")]
    for path, pos, h, r in zip(*cols, strict=True):
        rows = out.setdefault(path, ([], [], []))
        rows[0].append(pos)
        rows[1].append(h)
        rows[2].append(r)
    return out


def index_bands(table: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """An index table -> {path: (its rows' band keys, concatenated; keys per row)}, as numpy
    arrays (no Python object per key); no keys in an index written without near_dedup."""
    out = {}
    paths = table.column("path")
    for path in pc.unique(paths).to_pylist():
        rows = table.filter(pc.equal(paths, path))
        if "bands" not in rows.column_names:
            out[path] = (np.zeros(0, np.uint64), np.zeros(rows.num_rows, np.int64))
            continue
        col = rows.column("bands").combine_chunks()
        lens = col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        out[path] = (col.flatten().to_numpy(zero_copy_only=False), lens)
    return out


def _table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=False)
    return buf.getvalue()


def scan_unit(spec: dict[str, Any]) -> dict[str, Any]:
    """Writes the unit's index file (all its files' documents); returns counters."""
    storage = Storage(with_env_credentials(spec["s3"]))
    t0 = time.perf_counter()
    counters: dict[str, dict[str, int]] = {}
    nbytes = 0
    tables = []
    skipped: dict[str, str] = {}
    banding = Banding(**spec["near"]) if spec.get("near") else None
    for f in spec["files"]:
        try:
            batch, steps = _read_file(storage, f, spec["filters"], spec.get("limits"), banding)
        except InputUnreadable as e:
            skipped[f["path"]] = f"unreadable: {e}"
            continue
        merge_counters(counters, step_counters(steps))
        nbytes += f["size"]
        tables.append(index_table(f["path"], batch, banding is not None))
    schema = INDEX_SCHEMA.append(BANDS_FIELD) if banding else INDEX_SCHEMA
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    storage.write_atomic(f"{spec['root']}/{spec['index']}", _table_bytes(table))
    return {
        "unit": spec["unit"],
        "bytes": nbytes,
        "seconds": time.perf_counter() - t0,
        "skipped": skipped,
    }


def _reject_line(rec: dict[str, Any]) -> bytes:
    line = json.dumps(rec, ensure_ascii=False)
    try:
        return line.encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # lone surrogates: keep them as JSON escapes
        return json.dumps(rec).encode("ascii") + b"\n"


def _dataset_codec(storage: Storage, root: str, tok_hash: str) -> tuple[Any, np.ndarray]:
    """(tokenizer, code_of_id) of a dataset, cached per worker process."""
    key = f"{root}|{tok_hash}"
    if key not in _CACHE:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(storage.read_bytes(f"{root}/tokenizer.json").decode())
        table = json.loads(storage.read_bytes(f"{root}/code_table.json"))
        v = int(table["vocab_size"])
        code = table["code_of_id"]
        code_of_id = np.arange(v, dtype=np.int64) if code is None else np.asarray(code, np.int64)
        _CACHE.clear()
        _CACHE[key] = (tok, code_of_id)
    return _CACHE[key]


def encode_unit(spec: dict[str, Any]) -> dict[str, Any]:
    """Writes the unit's shards (and rejects), then its marker; returns the marker's content."""
    storage = Storage(with_env_credentials(spec["s3"]))
    root, unit = spec["root"], spec["unit"]
    t0 = time.perf_counter()
    tok, code_of_id = _dataset_codec(storage, root, spec["tokenizer_hash"])
    eod_id = int(spec["eod_id"])
    dtype = codeword_dtype(len(code_of_id))
    counters: dict[str, dict[str, int]] = {}
    tokenise, encode = Tokenise(tok), Encode(code_of_id, dtype)
    split = SplitByHash(spec["val_fraction"])
    docs: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    rejects: list[bytes] = []
    skipped: dict[str, str] = {}
    late_drops: dict[str, dict[str, list[int]]] = {}
    inputs: list[str] = []
    for f in spec["files"]:
        try:
            batch, steps = _read_file(storage, f, spec["filters"], spec.get("limits"))
        except InputUnreadable as e:
            skipped[f["path"]] = f"unreadable: {e}"
            continue
        dedup: Step = MarkDuplicates(f["dups"])
        near: Step = MarkNearDuplicates(f.get("near_dups", []))
        batch = near(dedup(batch))
        live = alive(batch)
        if len(live) != f["expect_kept"]:
            skipped[f["path"]] = (
                f"changed: {len(live)} documents kept now, {f['expect_kept']} at scan time"
            )
            continue
        merge_counters(counters, step_counters([*steps, dedup, near]))
        inputs.append(f["path"])
        batch = run_steps([split, tokenise, encode], batch)
        late: dict[str, list[int]] = {}
        for i in live:
            r = batch["reason"][i]
            if r is None:
                docs[batch["split"][i]].append(batch["codes"][i])
            else:
                late.setdefault(r, []).append(int(batch["index"][i]))
        if late:
            late_drops[f["path"]] = late
        if spec["rejects"]:
            for i, r in enumerate(batch["reason"]):
                if r is None:
                    continue
                text = batch["text"][i]
                rec = {"source": f["path"], "index": batch["index"][i], "reason": r, "text": text}
                rejects.append(_reject_line(rec))
    merge_counters(counters, step_counters([split, tokenise, encode]))
    packer = Packer(spec["seq_len"], int(code_of_id[eod_id]), dtype)
    shards = []
    for name in ("train", "val"):
        path = f"shards/{name}/{unit}-00000.parquet"
        if not docs[name]:
            storage.remove_tree(f"{root}/{path}")  # left by an attempt that had more documents
            continue
        codes, starts, pad = packer.pack(docs[name])
        data = encode_shard(codes, starts, spec["row_group_rows"])
        storage.write_atomic(f"{root}/{path}", data)
        shards.append(
            {
                "path": path,
                "split": name,
                "rows": int(codes.shape[0]),
                "tokens": int(codes.size),
                "pad_tokens": int(pad),
                "docs": len(docs[name]),
                "bytes": len(data),
                "sha256": sha256_hex(data),
                "unit": unit,
                "inputs": inputs,
            }
        )
    if rejects:
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
            gz.write(b"".join(rejects))
        storage.write_atomic(f"{root}/rejects/{unit}.jsonl.gz", buf.getvalue())
    marker = {
        "unit": unit,
        "plan": spec["plan"],
        "inputs": inputs,
        "shards": shards,
        "counters": counters,
        "skipped": skipped,
        "late_drops": late_drops,
    }
    storage.write_atomic(f"{root}/_work/units/{unit}.json", json.dumps(marker).encode())
    marker["seconds"] = time.perf_counter() - t0
    return marker


def run_task(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` entry: each row holds one JSON spec; returns one JSON result."""
    out = []
    for item in batch["spec"]:
        spec = json.loads(str(item))
        fn = scan_unit if spec["kind"] == "scan" else encode_unit
        out.append(json.dumps(fn(spec)))
    return {"result": np.array(out, dtype=object)}
