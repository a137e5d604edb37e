"""``verify(dataset)``: every shard against the manifest, code words < V, and a decode sample.

Checks: tokenizer.json and code_table.json hashes; per shard the sha256, byte size, row and token
counts, row length L, every code word < V, document offsets in range and document counts; shard
files not listed in the manifest (left by an interrupted run) are reported as warnings. Then, for
``sample_units`` units, the input files are read again (under the limits of the run that
processed them), the same steps applied, duplicates replayed from the index files and late drops
from the manifest, and the decoded shard documents must equal the kept documents exactly.

With near_dedup, the LSH lookup is replayed from the index files' band keys over every input: each
input's ``near_duplicate`` count must equal the manifest's, and for the sampled units the band
keys are computed again from the text and must equal the index's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitlm.dataset_format import (
    CODE_TABLE_FILE,
    MANIFEST_FILE,
    SPLITS,
    TOKENIZER_FILE,
    DataError,
    Manifest,
    code_of_id,
    shard_dir,
    tokenizer_hash,
)
from pipeline.driver import IndexReader, PreprocessError, _root, read_manifest, storage_for
from pipeline.neardedup import Banding, near_duplicates
from pipeline.shards import decode_shard, sha256_hex
from pipeline.steps import (
    MarkDropped,
    MarkDuplicates,
    MarkNearDuplicates,
    MinHashBands,
    SplitByHash,
    alive,
    run_steps,
    scan_steps,
    unpack,
)
from pipeline.units import read_input

__all__ = ["decode_dataset", "verify"]


def _codec(storage: Any, root: str) -> tuple[Any, np.ndarray, str, str]:
    from tokenizers import Tokenizer

    tok_text = storage.read_bytes(f"{root}/{TOKENIZER_FILE}").decode()
    table_text = storage.read_bytes(f"{root}/{CODE_TABLE_FILE}").decode()
    codes = code_of_id(table_text, f"{root}/{CODE_TABLE_FILE}")
    return Tokenizer.from_str(tok_text), codes, tok_text, table_text


def decode_dataset(dataset: str, split: str = "train") -> list[str]:
    """All documents of a split, decoded to text, in manifest order."""
    root = _root(dataset)
    storage = storage_for(root)
    manifest = read_manifest(storage, root)
    if manifest is None:
        raise FileNotFoundError(f"{root}/{MANIFEST_FILE}")
    tok, codes_of_ids, _, _ = _codec(storage, root)
    id_of_code = np.argsort(codes_of_ids)
    out = []
    for s in manifest.split(split):
        codes, starts = decode_shard(storage.read_bytes(f"{root}/{s.path}"))
        for d in unpack(codes, starts, manifest.eod_code):
            out.append(
                tok.decode(id_of_code[d.astype(np.int64)].tolist(), skip_special_tokens=False)
            )
    return out


def verify(dataset: str, sample_units: int = 2) -> dict[str, Any]:
    """Checks a dataset (see the module docstring); returns a report with ``ok`` and ``errors``."""
    root = _root(dataset)
    storage = storage_for(root)
    errors: list[str] = []
    warnings: list[str] = []
    try:
        manifest = read_manifest(storage, root)
        if manifest is None:
            return {
                "ok": False,
                "errors": [f"{root}: no {MANIFEST_FILE} (unfinished or not a dataset)"],
            }
        tok, codes_of_ids, tok_text, table_text = _codec(storage, root)
    except (PreprocessError, DataError) as e:  # a malformed manifest or code table
        return {"ok": False, "errors": [str(e)]}
    from bitlm.codec import CodeTable

    if tokenizer_hash(tok_text) != manifest.tokenizer_hash:
        errors.append(f"{TOKENIZER_FILE}: sha256 differs from the manifest")
    if CodeTable.from_json(table_text).hash != manifest.code_table_hash:
        errors.append(f"{CODE_TABLE_FILE}: hash differs from the manifest")
    V, L, eod = manifest.vocab_size, manifest.seq_len, manifest.eod_code
    if len(codes_of_ids) != V:
        errors.append(f"code table has {len(codes_of_ids)} entries, manifest V={V}")
    decoded: dict[str, list[np.ndarray]] = {}
    rows = tokens = 0
    for s in manifest.shards:
        try:
            data = storage.read_bytes(f"{root}/{s.path}")
        except (OSError, FileNotFoundError):
            errors.append(f"{s.path}: missing")
            continue
        if sha256_hex(data) != s.sha256 or len(data) != s.bytes:
            errors.append(f"{s.path}: checksum or size differs from the manifest")
            continue
        codes, starts = decode_shard(data)
        if codes.dtype.name != manifest.codeword_dtype:
            errors.append(f"{s.path}: dtype {codes.dtype} != {manifest.codeword_dtype}")
        if codes.shape[0] != s.rows or codes.size != s.tokens or codes.shape[1:] != (L,):
            errors.append(f"{s.path}: shape {codes.shape} does not match rows/tokens/seq_len")
            continue
        if codes.size and int(codes.max()) >= V:
            errors.append(f"{s.path}: code word {int(codes.max())} >= V={V}")
        if any(not (0 <= x < L) for row in starts for x in row) or any(
            row != sorted(row) for row in starts
        ):
            errors.append(f"{s.path}: doc_starts out of range or unsorted")
            continue
        docs = unpack(codes, starts, eod)
        if len(docs) != s.docs:
            errors.append(f"{s.path}: {len(docs)} documents, manifest says {s.docs}")
        decoded[s.path] = docs
        rows += s.rows
        tokens += s.tokens or 0
    listed = {s.path for s in manifest.shards}
    for split in SPLITS:
        for name in storage.list_names(f"{root}/{shard_dir(split)}"):
            if f"{shard_dir(split)}/{name}" not in listed:
                warnings.append(
                    f"{shard_dir(split)}/{name}: not in the manifest (ignored by readers)"
                )
    checked = _decode_sample(
        storage, root, manifest, tok, codes_of_ids, decoded, sample_units, errors, warnings
    )
    return {
        "ok": not errors,
        "dataset": root,
        "shards": len(manifest.shards),
        "rows": rows,
        "tokens": tokens,
        "sample_units": checked,
        "errors": errors,
        "warnings": warnings,
    }


def _decode_sample(
    storage: Any,
    root: str,
    manifest: Manifest,
    tok: Any,
    code_of_id: np.ndarray,
    decoded: dict[str, list[np.ndarray]],
    sample_units: int,
    errors: list[str],
    warnings: list[str],
) -> list[str]:
    units: list[str] = []
    for rec in manifest.inputs:
        if rec.unit is not None and rec.unit not in units:
            units.append(rec.unit)
    if manifest.recipe is None:
        errors.append(f"{MANIFEST_FILE}: no recipe, so no document can be replayed")
        return []
    near_cfg = manifest.recipe.get("near_dedup", {})
    banding = (
        Banding(near_cfg["num_perm"], near_cfg["bands"], near_cfg["rows"], near_cfg["ngram"])
        if near_cfg.get("enabled")
        else None
    )
    if banding is None and (not units or sample_units <= 0):
        return []
    n = min(max(sample_units, 0), len(units))
    pick = [
        units[i] for i in sorted({round(k * (len(units) - 1) / max(1, n - 1)) for k in range(n)})
    ]
    id_of_code = np.argsort(code_of_id)
    flt = manifest.recipe["filters"]
    split = SplitByHash(manifest.recipe["val_fraction"])
    seen: set[bytes] = set()
    want = set(pick)
    expected: dict[str, dict[str, list[str]]] = {u: {sp: [] for sp in SPLITS} for u in pick}
    reader = IndexReader(storage, root)
    is_near = np.zeros(0, bool)
    if banding is not None:  # the LSH lookup over the whole dataset, in manifest order
        parts = [reader.bands(rec.index, rec.path) for rec in manifest.inputs]
        keys = np.concatenate([np.zeros(0, np.uint64), *(k for k, _ in parts)])
        is_near = near_duplicates(
            keys, np.concatenate([np.zeros(0, np.int64), *(n for _, n in parts)])
        )
    off = 0
    # limits of the run that read each file; None (no caps) for runs recorded before limits
    limits_of = {r.run: r.limits for r in manifest.runs}
    for rec in manifest.inputs:
        positions, hashes, _ = reader.rows(rec.index, rec.path)
        hits = is_near[off : off + len(positions)] if banding else np.zeros(len(positions), bool)
        off += len(positions)
        dups, near = [], []
        for pos, h, hit in zip(positions, hashes, hits.tolist(), strict=True):
            if h is None:
                continue
            if h in seen:
                dups.append(pos)
            elif hit:
                near.append(pos)
            seen.add(h)
        if len(near) != rec.dropped.get("near_duplicate", 0):
            errors.append(
                f"{rec.path}: {len(near)} near duplicates in the index, manifest says "
                f"{rec.dropped.get('near_duplicate', 0)}"
            )
        if rec.unit not in want:
            continue
        try:
            if storage.size(rec.path) != rec.size:
                warnings.append(f"{rec.path}: input changed since it was processed, check skipped")
                want.discard(rec.unit)
                continue
            batch = read_input(storage, rec.to_dict(), limits_of.get(rec.run))
        except Exception:  # InputUnreadable, or the storage failing on size()
            warnings.append(f"{rec.path}: input unreadable, decode check skipped")
            want.discard(rec.unit)
            continue
        steps = [
            *scan_steps(flt["max_control_fraction"], flt["min_chars"], flt["max_chars"]),
            *([MinHashBands(banding)] if banding else []),
        ]
        batch = run_steps(steps, batch)
        if banding is not None:
            got = [
                (b or ()) if r is None else ()
                for b, r in zip(batch["bands"], batch["reason"], strict=True)
            ]
            keys, lens = reader.bands(rec.index, rec.path)
            if [len(b) for b in got] != lens.tolist() or [
                k for b in got for k in b
            ] != keys.tolist():
                errors.append(f"{rec.path}: LSH band keys in the index differ from the text's")
        steps = [
            MarkDuplicates(dups),
            MarkNearDuplicates(near),
            *(MarkDropped(pos, r) for r, pos in sorted((rec.late_drops or {}).items())),
            split,
        ]
        batch = run_steps(steps, batch)
        for i in alive(batch):
            expected[rec.unit][batch["split"][i]].append(batch["text"][i])
    checked = []
    for u in pick:
        if u not in want:
            continue
        for s in manifest.shards:
            if s.unit != u or s.path not in decoded:
                continue
            got = [
                tok.decode(id_of_code[d.astype(np.int64)].tolist(), skip_special_tokens=False)
                for d in decoded[s.path]
            ]
            exp = expected[u][s.split]
            if got != exp:
                bad = next(
                    (i for i, (a, b) in enumerate(zip(got, exp, strict=False)) if a != b),
                    min(len(got), len(exp)),
                )
                errors.append(
                    f"{s.path}: decoded documents differ from the input at document {bad} "
                    f"({len(got)} decoded, {len(exp)} expected)"
                )
        checked.append(u)
    return checked
