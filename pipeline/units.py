"""Units of work, run inside Ray tasks (and directly by unit tests): ``scan`` and ``encode``.

A unit is a deterministic group of input files (its id is a hash of their paths). Both functions
take a plain JSON-able spec, write their outputs with atomic whole-object writes, and finish with a
marker, so a killed run that is rerun finds the finished units and redoes only the rest:

- scan, the only read of the inputs: read -> decode -> normalise -> filters -> hash (-> MinHash
  band keys with near_dedup) -> split -> tokenise -> bit-encode, for each file. Writes the
  unit's staged documents (``_work/docs/``: place, reasons, split, token ids; with rejects the
  text), its dedup keys (``_work/keys/``, ``pipeline.dedup``) and, last, one
  ``index/<key>.parquet`` (one row per document: file path, position, hash, drop reason, and
  the ``bands`` keys with near_dedup; <key> hashes the run number, the limits, the near_dedup
  banding and the files' paths, sizes and mtimes), whose presence is the marker.
- encode: the staged documents less the (near) duplicates the dedup tasks found -> pack ->
  write ``shards/<split>/<unit>-00000.parquet`` (``bitlm.dataset_format.shard_path``) and
  optionally ``rejects/<unit>.jsonl.gz``, then the marker ``_work/units/<unit>.json`` with each
  file's counts.

Bad content never fails a unit (readers and steps turn it into counted drops). A file whose bytes
cannot be fetched (``InputUnreadable``) is *skipped*: it has no index rows, the result names it
under ``skipped``, and the driver leaves it out of the manifest so that the next run tries it
again. A document that tokenise, encode or split lose (``tokenise_error``, ``encode_error``,
``split_error``) is a *late drop*: the index keeps it (it takes part in dedup as at scan time),
the encode marker lists its position under ``late_drops``, and verify replays it.

This module must not import torch (workers stay light): code words are looked up with numpy, and
``bitlm.dataset_format`` (names, the code table's id -> code map) is a torch-free leaf.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bitlm.dataset_format import (
    CODE_TABLE_FILE,
    SPLITS,
    TOKENIZER_FILE,
    code_of_id,
    codeword_dtype,
    shard_path,
)
from pipeline.dedup import EXACT, NEAR, doc_keys, keys_table_bytes, read_hits, resolve_part
from pipeline.neardedup import Banding
from pipeline.readers import InputUnreadable, read_documents
from pipeline.shards import encode_shard, sha256_hex
from pipeline.steps import (
    Batch,
    Encode,
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
    "encode_unit",
    "index_bands",
    "index_rows",
    "index_table",
    "read_input",
    "run_batch",
    "run_spec",
    "scan_unit",
]

_TOKENIZERS: dict[str, Any] = {}  # per worker process: the last dataset's tokenizer
_TABLES: dict[str, np.ndarray] = {}  # and code table


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


DOCS_META = b"bitlm.docs"


def _docs_table(rows: dict[str, list[Any]], codes: list[np.ndarray], dtype: np.dtype) -> pa.Table:
    """A unit's staged documents (every document of its files, in file order): place, scan
    reason, late reason, split, token count, token ids, and the text / reject line for
    rejects."""
    lens = np.fromiter((len(c) for c in codes), np.int64, count=len(codes))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
    flat = np.concatenate([np.zeros(0, dtype), *codes])
    cols = {
        "f": pa.array(rows["f"], pa.int32()),
        "pos": pa.array(rows["pos"], pa.int64()),
        "reason": pa.array(rows["reason"], pa.string()),
        "late": pa.array(rows["late"], pa.string()),
        "val": pa.array(rows["val"], pa.bool_()),
        "ntok": pa.array(rows["ntok"], pa.int64()),
        "codes": pa.LargeListArray.from_arrays(offsets, pa.array(flat)),
    }
    if "text" in rows:
        cols["text"] = pa.array(rows["text"], pa.string())
        cols["reject"] = pa.array(rows["reject"], pa.binary())
    return pa.table(cols)


def scan_unit(spec: dict[str, Any]) -> dict[str, Any]:
    """The unit's only read of its inputs: read -> scan steps (-> band keys) -> split ->
    tokenise -> encode. Writes the staged documents (``spec['docs']``), the dedup keys
    (``spec['keys']``, ``pipeline.dedup``) and, last, the index file (its marker)."""
    storage = Storage(with_env_credentials(spec["s3"]))
    root = spec["root"]
    t0 = time.perf_counter()
    tok = _dataset_tokenizer(storage, root, spec["tokenizer_hash"])
    vocab = tok.get_vocab_size()
    dtype = codeword_dtype(vocab)
    # token ids are staged as they are (the identity table: the same dtype and range checks as
    # code words); the encode pass maps them through the code table, which the first run
    # counts from the scan (``sample``: {path: its first documents in the tokenizer sample})
    tokenise, encode = Tokenise(tok), Encode(np.arange(vocab), dtype)
    sample: dict[str, int] = spec.get("sample") or {}
    sample_ids: list[np.ndarray] = []
    split = SplitByHash(spec["val_fraction"])
    counters: dict[str, dict[str, int]] = {}
    nbytes = 0
    tables = []
    keys = []
    skipped: dict[str, str] = {}
    files = []
    banding = Banding(**spec["near"]) if spec.get("near") else None
    rows: dict[str, list[Any]] = {k: [] for k in ("f", "pos", "reason", "late", "val", "ntok")}
    if spec["rejects"]:
        rows.update(text=[], reject=[])
    codes: list[np.ndarray] = []
    empty = np.zeros(0, dtype)
    for f in spec["files"]:
        try:
            batch, steps = _read_file(storage, f, spec["filters"], spec.get("limits"), banding)
        except InputUnreadable as e:
            skipped[f["path"]] = f"unreadable: {e}"
            continue
        merge_counters(counters, step_counters([s for s in steps if s.name != "minhash"]))
        nbytes += f["size"]
        tables.append(index_table(f["path"], batch, banding is not None))
        scan = list(batch["reason"])
        live = alive(batch)
        keys.append(
            doc_keys(
                f["f"],
                [batch["index"][i] for i in live],
                [batch["hash"][i] for i in live],
                [batch["bands"][i] for i in live] if banding else None,
            )
        )
        files.append({"path": f["path"], "f": f["f"], "docs": len(scan)})
        batch = run_steps([split, tokenise, encode], batch)
        if f["path"] in sample:
            first = [i for i, r in enumerate(scan) if r is None][: sample[f["path"]]]
            sample_ids += [batch["ids"][i] for i in first if batch["ids"][i] is not None]
        for i, r in enumerate(scan):
            rows["f"].append(f["f"])
            rows["pos"].append(batch["index"][i])
            rows["reason"].append(r)
            late = None if r is not None else batch["reason"][i]
            rows["late"].append(late)
            rows["val"].append(r is None and batch["split"][i] == "val")
            ids = batch["ids"][i] if r is None else None
            rows["ntok"].append(0 if ids is None else len(ids))
            kept = r is None and late is None
            codes.append(batch["codes"][i] if kept else empty)
            if spec["rejects"]:
                text = batch["text"][i]
                rec = {"source": f["path"], "index": batch["index"][i], "reason": r, "text": text}
                rows["text"].append(text if r is None else None)
                rows["reject"].append(None if r is None else _reject_line(rec))
    table = _docs_table(rows, codes, dtype)
    sample_counts = None
    if sample:
        c = np.bincount(np.concatenate([np.zeros(0, np.int64), *sample_ids]), minlength=vocab)
        nz = np.flatnonzero(c)
        sample_counts = {"ids": nz.tolist(), "counts": c[nz].tolist()}
    meta = {"files": files, "counters": counters, "sample_counts": sample_counts}
    table = table.replace_schema_metadata({DOCS_META: json.dumps(meta).encode()})
    storage.write_atomic(f"{root}/{spec['docs']}", _table_bytes(table))
    storage.write_atomic(f"{root}/{spec['keys']}", keys_table_bytes(keys, spec["parts"]))
    schema = INDEX_SCHEMA.append(BANDS_FIELD) if banding else INDEX_SCHEMA
    index = pa.concat_tables(tables) if tables else schema.empty_table()
    storage.write_atomic(f"{root}/{spec['index']}", _table_bytes(index))
    return {
        "unit": spec["unit"],
        "bytes": nbytes,
        "seconds": time.perf_counter() - t0,
        "skipped": skipped,
        "sample_counts": sample_counts,
    }


def _reject_line(rec: dict[str, Any]) -> bytes:
    line = json.dumps(rec, ensure_ascii=False)
    try:
        return line.encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # lone surrogates: keep them as JSON escapes
        return json.dumps(rec).encode("ascii") + b"\n"


def _dataset_tokenizer(storage: Storage, root: str, tok_hash: str) -> Any:
    """The dataset's tokenizer, cached per worker process (the last one used)."""
    key = f"{root}|{tok_hash}"
    if key not in _TOKENIZERS:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(storage.read_bytes(f"{root}/{TOKENIZER_FILE}").decode())
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = tok
    return _TOKENIZERS[key]


def _dataset_code_of_id(storage: Storage, root: str, table_hash: str) -> np.ndarray:
    """The dataset's id -> code word map (``code_table.json``), cached per worker process."""
    key = f"{root}|{table_hash}"
    if key not in _TABLES:
        path = f"{root}/{CODE_TABLE_FILE}"
        table = code_of_id(storage.read_bytes(path).decode(), path)
        _TABLES.clear()
        _TABLES[key] = table
    return _TABLES[key]


def _late_counters(
    late: list[str | None], ntok: list[int], val: list[bool]
) -> dict[str, dict[str, int]]:
    """Counters of split -> tokenise -> encode over the documents left after dedup (the scan
    ran these steps on every document; a duplicate's work is not counted)."""
    c: dict[str, dict[str, int]] = {}
    n = len(late)
    for name, prev in (("split", None), ("tokenise", "split_error"), ("encode", "tokenise_error")):
        if prev is not None:
            n -= sum(r == prev for r in late)
        d = {"in": n}
        lost = sum(r == f"{name}_error" for r in late)
        if lost:
            d[f"dropped.{name}_error"] = lost
        d["out"] = n - lost
        c[name] = d
    ok = [v for r, v in zip(late, val, strict=True) if r != "split_error"]
    c["split"].update(train=ok.count(False), val=ok.count(True))
    c["tokenise"]["tokens"] = sum(
        t for r, t in zip(late, ntok, strict=True) if r not in ("split_error", "tokenise_error")
    )
    return c


def encode_unit(spec: dict[str, Any]) -> dict[str, Any]:
    """Packs the unit's staged documents less the (near) duplicates the resolve tasks found,
    writes its shards (and rejects), then its marker; returns the marker's content."""
    storage = Storage(with_env_credentials(spec["s3"]))
    root, unit = spec["root"], spec["unit"]
    t0 = time.perf_counter()
    table = pq.read_table(pa.BufferReader(storage.read_bytes(f"{root}/{spec['docs']}")))
    meta = json.loads(table.schema.metadata[DOCS_META])
    counters: dict[str, dict[str, int]] = meta["counters"]
    code_col = table.column("codes").combine_chunks()
    dtype = codeword_dtype(int(spec["vocab_size"]))
    # the scan staged token ids: code words through the code table
    table_of = _dataset_code_of_id(storage, root, spec["code_table_hash"]).astype(dtype)
    flat = table_of[code_col.values.to_numpy(zero_copy_only=False)]
    offsets = code_col.offsets.to_numpy()
    f_of = [f["f"] for f in meta["files"]]
    hits = read_hits(storage, root, spec["verdicts"], min(f_of, default=0), max(f_of, default=-1))
    cols = {c: table.column(c).to_pylist() for c in ("f", "pos", "reason", "late", "val", "ntok")}
    rejecting = "text" in table.column_names
    texts = table.column("text").to_pylist() if rejecting else []
    reject_lines = table.column("reject").to_pylist() if rejecting else []
    docs: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    rejects: list[bytes] = []
    late_drops: dict[str, dict[str, list[int]]] = {}
    stats: dict[str, dict[str, Any]] = {}
    path_of = {f["f"]: f["path"] for f in meta["files"]}
    dedup = {"in": 0, "out": 0}
    near = {"in": 0, "out": 0}
    left_late: list[str | None] = []
    left_ntok: list[int] = []
    left_val: list[bool] = []
    for i, (fi, pos, r, late, val, ntok) in enumerate(zip(*cols.values(), strict=True)):
        path = path_of[fi]
        st = stats.setdefault(path, {"docs": 0, "kept": 0, "duplicates": 0, "dropped": {}})
        st["docs"] += 1
        if r is None:
            dedup["in"] += 1
            hit = hits.get(fi, {}).get(pos)
            if hit == EXACT:
                r = "duplicate"
                st["duplicates"] += 1
            else:
                dedup["out"] += 1
                near["in"] += 1
                if hit == NEAR and spec["near"]:
                    r = "near_duplicate"
                else:
                    near["out"] += 1
                    left_late.append(late)
                    left_ntok.append(ntok)
                    left_val.append(val)
                    r = late
                    if late is not None:
                        late_drops.setdefault(path, {}).setdefault(late, []).append(pos)
            if r is not None and r != "duplicate":
                st["dropped"][r] = st["dropped"].get(r, 0) + 1
            if r is None:
                st["kept"] += 1
                docs["val" if val else "train"].append(flat[offsets[i] : offsets[i + 1]])
            elif rejecting:
                rec = {"source": path, "index": pos, "reason": r, "text": texts[i]}
                rejects.append(_reject_line(rec))
        else:
            st["dropped"][r] = st["dropped"].get(r, 0) + 1
            if rejecting:
                rejects.append(reject_lines[i])
    for name, d, reason in (("dedup", dedup, "duplicate"), ("near_dedup", near, "near_duplicate")):
        if d["in"] > d["out"]:
            d[f"dropped.{reason}"] = d["in"] - d["out"]
        merge_counters(counters, {name: d})
    merge_counters(counters, _late_counters(left_late, left_ntok, left_val))
    packer = Packer(spec["seq_len"], int(spec["eod_code"]), dtype)
    inputs = [f["path"] for f in meta["files"]]
    shards = []
    for name in SPLITS:
        path = shard_path(name, unit)
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
    for st in stats.values():
        st["dropped"] = dict(sorted(st["dropped"].items()))
    marker = {
        "unit": unit,
        "plan": spec["plan"],
        "inputs": inputs,
        "shards": shards,
        "counters": counters,
        "files": stats,
        "late_drops": late_drops,
    }
    storage.write_atomic(f"{root}/_work/units/{unit}.json", json.dumps(marker).encode())
    marker["seconds"] = time.perf_counter() - t0
    return marker


def run_spec(spec: str) -> str:
    """A Ray task's entry: one JSON spec in, one JSON result out. ``cpus``: the CPUs the task
    holds, which pyarrow's thread pool keeps to (by default it takes every core of the node,
    and on a small node the tasks' pools then compete for the same cores)."""
    d = json.loads(spec)
    cpus = max(1, int(d.get("cpus", 0)))
    if "cpus" in d and pa.cpu_count() != cpus:
        pa.set_cpu_count(cpus)
    fn = {"scan": scan_unit, "resolve": resolve_part, "encode": encode_unit}[d["kind"]]
    return json.dumps(fn(d))


def run_batch(batch: dict[str, Any]) -> dict[str, list[str]]:
    """Ray Data's form of ``run_spec`` (``map_batches``): a batch of specs in, results out."""
    return {"result": [run_spec(s) for s in batch["spec"]]}
