"""The driver: plans units, runs them as Ray tasks, commits the manifest.

Order of a run (each step resumable; the manifest is the commit point, written last):
1. list inputs (sorted); inputs already in the manifest are done: nothing new -> no work.
2. tokenizer + code table: kept from the dataset, or built once (first run) and marked (a
   ``frequency`` table after the scan, from the sample's token counts the scan tasks return).
3. plan units: the new files in sorted order, grouped into units of about ``unit_bytes``.
4. scan pass: the only read of each input; per unit the index file (path, position, hash, drop
   reason of every document), the staged token ids and the dedup keys (``pipeline.units``).
5. dedup pass: one task per part (a range of key prefixes) against the dataset's sharded state
   (``pipeline.dedup``); the driver holds no key.
6. encode pass: code words of each unit's staged documents less its (near) duplicates, packed
   into shards, skipping units whose marker matches the plan.
7. manifest (temp + rename / one PUT), then remove ``_work/`` and uncommitted state files.

No document and no file aborts a run: bad content is a counted drop (readers/steps), and a file
that cannot be read (or has a name that is not UTF-8) is *skipped*: left out of the manifest, so
the next run tries it again, and named in the summary and in the run's record
(``runs[-1].skipped``). A file is read once, so one that changes or vanishes after the scan is
kept as it was read.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bitlm.dataset_format import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    SPLITS,
    DataError,
    InputRecord,
    Manifest,
    RunRecord,
    Shard,
    codeword_dtype,
    shard_path,
    tokenizer_hash,
)
from pipeline.config import CONTENT_KEYS, InputSpec, PreprocessConfig
from pipeline.dedup import PREFIX_BITS
from pipeline.neardedup import signature_scheme
from pipeline.readers import InputUnreadable
from pipeline.steps import alive, run_steps, scan_steps
from pipeline.storage import (
    InputFile,
    Storage,
    StorageError,
    credential_env,
    is_s3,
    s3_options_from_env,
    without_credentials,
)
from pipeline.tokenizer import (
    build_code_table,
    eod_id_of,
    frequency_table,
    sample_order,
    train_bpe,
)
from pipeline.units import (
    DOCS_META,
    index_bands,
    index_rows,
    read_input,
    run_batch,
    run_spec,
)

__all__ = ["FORMAT_VERSION", "PreprocessError", "read_manifest", "run_preprocess", "storage_for"]

KILL_ENV = "BITLM_PREPROCESS_KILL_AT"  # test hook: SIGKILL the driver at a named point


class PreprocessError(RuntimeError):
    """A one-line, user-facing failure of a run (incompatible dataset, storage problem...)."""


def _log(msg: str) -> None:
    print(f"[preprocess] {msg}", file=sys.stderr, flush=True)


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _show(path: str) -> str:
    """A path for a log line (a name that is not UTF-8 shows its bytes as escapes)."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def _maybe_kill(point: str) -> None:
    if os.environ.get(KILL_ENV) == point:
        _log(f"test hook: killing the driver at {point}")
        os.kill(os.getpid(), signal.SIGKILL)


def storage_for(*urls: str) -> Storage:
    return Storage(s3_options_from_env() if any(is_s3(u) for u in urls) else None)


def _root(url: str) -> str:
    return url.rstrip("/") if is_s3(url) else os.path.abspath(url)


def read_manifest(storage: Storage, root: str) -> Manifest | None:
    """The committed manifest of the dataset at ``root``; None when it has none (a new or an
    unfinished dataset). A malformed one is a ``PreprocessError`` naming the file and the key."""
    path = f"{root}/{MANIFEST_FILE}"
    if not storage.exists(path):
        return None
    try:
        return Manifest.from_json(storage.read_bytes(path), path, root)
    except DataError as e:
        raise PreprocessError(str(e)) from None


def expand_path(path: str) -> str:
    """``{stdlib}`` -> this interpreter's standard library folder."""
    if "{stdlib}" in path:
        import sysconfig

        path = path.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
    return path


def _key(*parts: object) -> str:
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()[:16]


def _canon(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# ---- inputs ------------------------------------------------------------------------------------
def _list_inputs(
    storage: Storage, cfg: PreprocessConfig, problems: list[tuple[str, str]] | None = None
) -> list[tuple[InputFile, InputSpec]]:
    chosen: dict[str, tuple[InputFile, InputSpec]] = {}
    for spec in cfg.inputs:
        root = expand_path(spec.path).rstrip("/")
        for f in storage.list_files(root, spec.glob, problems):
            rel = f.path.removeprefix(root.removeprefix("s3://")).lstrip("/")
            if not any(fnmatch.fnmatchcase(rel, pat) for pat in spec.exclude):
                chosen.setdefault(f.path, (f, spec))
    files = [chosen[p] for p in sorted(chosen)]
    if cfg.max_files is not None:
        files = files[: cfg.max_files]
    if cfg.max_bytes is not None:
        kept, total = [], 0
        for f, s in files:
            if total >= cfg.max_bytes:
                break
            kept.append((f, s))
            total += f.size
        files = kept
    return files


def _file_spec(f: InputFile, s: InputSpec) -> dict[str, Any]:
    return {
        "path": f.path,
        "size": f.size,
        "mtime": f.mtime,
        "format": s.format,
        "text_unit": s.text_unit,
        "text_field": s.text_field,
    }


def _plan_units(files: list[dict[str, Any]], unit_bytes: int) -> list[list[dict[str, Any]]]:
    units: list[list[dict[str, Any]]] = []
    cur: list[dict[str, Any]] = []
    size = 0
    for f in files:
        if cur and size + f["size"] > unit_bytes:
            units.append(cur)
            cur, size = [], 0
        cur.append(f)
        size += f["size"]
    if cur:
        units.append(cur)
    return units


# ---- tokenizer and code table --------------------------------------------------------------------
def _sample(
    storage: Storage, cfg: PreprocessConfig, files: list[dict[str, Any]]
) -> tuple[list[str], dict[str, int]]:
    """(the sample's texts, {path: how many of its documents it took}): documents that pass
    the filters, files in ``sample_order``, until ``sample_bytes`` of text. The documents a
    file gives are its first alive ones in order (a read cut short keeps a prefix), so the scan
    finds the same ones by count. A file is read only as far as the sample needs: up to 4x the
    bytes still missing (at least 1 MiB), more only when that was not enough, so a large file
    costs about the sample, not its size."""
    by_path = {f["path"]: f for f in files}
    out: list[str] = []
    taken: dict[str, int] = {}
    total = 0
    flt = cfg.filters
    limits = asdict(cfg.limits)
    for p in sample_order(list(by_path)):
        need = cfg.tokenizer.sample_bytes - total
        cap = min(limits["max_file_bytes"], max(4 * need, 1 << 20))
        texts: list[str] = []
        while True:
            try:
                batch = read_input(storage, by_path[p], {**limits, "max_file_bytes": cap})
            except InputUnreadable:
                texts = []
                break  # the scan pass reports it
            steps = scan_steps(flt.max_control_fraction, flt.min_chars, flt.max_chars)
            batch = run_steps(steps, batch)
            texts = [batch["text"][i] for i in alive(batch)]
            cut = "file_too_large" in batch["reason"] and cap < limits["max_file_bytes"]
            if not cut or sum(map(len, texts)) >= need:
                break
            cap = min(limits["max_file_bytes"], 4 * cap)
        for t in texts:
            out.append(t)
            taken[p] = taken.get(p, 0) + 1
            total += len(t)
            if total >= cfg.tokenizer.sample_bytes:
                return out, taken
    return out, taken


def _sample_texts(
    storage: Storage, cfg: PreprocessConfig, files: list[dict[str, Any]]
) -> list[str]:
    """The texts of the tokenizer sample (``_sample``)."""
    return _sample(storage, cfg, files)[0]


def _codec_facts(cfg: PreprocessConfig, tok_text: str, table_text: str) -> dict[str, Any]:
    """The manifest's codec fields of a tokenizer and code table."""
    from tokenizers import Tokenizer

    from bitlm.codec import CodeTable

    tok = Tokenizer.from_str(tok_text)
    table = CodeTable.from_json(table_text)
    v = tok.get_vocab_size()
    if table.vocab_size != v:
        raise PreprocessError(f"code table is for V={table.vocab_size}, tokenizer has V={v}")
    eod = eod_id_of(tok, cfg.tokenizer.eod_token)
    code = table.code_of_id
    return {
        "vocab_size": v,
        "num_bits": max(1, int(np.ceil(np.log2(v)))),
        "codeword_dtype": codeword_dtype(v).name,
        "eod_id": eod,
        "eod_code": eod if code is None else int(code[eod]),
        "tokenizer_hash": tokenizer_hash(tok_text),
        "code_table_hash": table.hash,
        "code_table_kind": table.kind,
    }


def _ensure_codec(
    storage: Storage,
    root: str,
    cfg: PreprocessConfig,
    manifest: Manifest | None,
    files: list[dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, int] | None]:
    """(the dataset's codec facts, None) when the code table exists or is built here (kept from
    the dataset; ``binary``; ``semantic``, which needs the sample's token sequences), else
    (``{"tokenizer_hash"}``, the sample ``{path: documents}``): a first run's ``frequency``
    table is counted by the scan tasks, which tokenise the sample's documents anyway
    (``_finish_codec``). Builds and writes tokenizer.json on the first run."""
    from tokenizers import Tokenizer

    def read(name: str) -> str:
        return storage.read_bytes(f"{root}/{name}").decode()

    if manifest is not None:
        f = _codec_facts(cfg, read("tokenizer.json"), read("code_table.json"))
        for k in ("tokenizer_hash", "code_table_hash"):
            if f[k] != getattr(manifest, k):
                raise PreprocessError(f"{root}: {k} does not match the manifest (dataset damaged)")
        return f, None
    marker = f"{root}/_work/codec.json"
    if storage.exists(marker):
        m = json.loads(storage.read_bytes(marker))
        if m.get("content") == cfg.content() and m.get("version") == 2:
            try:
                tok_text = read("tokenizer.json")
                if tokenizer_hash(tok_text) == m["tokenizer_hash"]:
                    _log("reusing the tokenizer (and code table) of the interrupted run")
                    if m.get("sample") is not None:
                        return {"tokenizer_hash": m["tokenizer_hash"]}, m["sample"]
                    return _codec_facts(cfg, tok_text, read("code_table.json")), None
            except (OSError, ValueError, StorageError):
                pass
    t0 = time.perf_counter()
    sample, taken = _sample(storage, cfg, files)
    if cfg.tokenizer.path:
        tok_text = storage.read_bytes(cfg.tokenizer.path).decode()
        try:
            tok = Tokenizer.from_str(tok_text)
        except Exception as e:
            raise PreprocessError(
                f"tokenizer.path {cfg.tokenizer.path}: not a tokenizer: {e}"
            ) from None
        _log(f"using tokenizer {cfg.tokenizer.path} (V={tok.get_vocab_size()})")
    else:
        if not sample:
            raise PreprocessError("no document passed the filters: cannot train a tokenizer")
        tok_text = train_bpe(
            sample, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, cfg.tokenizer.eod_token
        )
        tok = Tokenizer.from_str(tok_text)
        _log(
            f"trained byte-level BPE V={tok.get_vocab_size()} on {len(sample)} documents "
            f"({sum(map(len, sample)) / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s"
        )
    try:
        eod = eod_id_of(tok, cfg.tokenizer.eod_token)
    except ValueError as e:
        raise PreprocessError(str(e)) from None
    storage.write_atomic(f"{root}/tokenizer.json", tok_text.encode())
    th = tokenizer_hash(tok_text)
    deferred = cfg.code_table == "frequency"
    if not deferred:
        table = build_code_table(cfg.code_table, tok, sample, eod)
        storage.write_atomic(f"{root}/code_table.json", table.to_json().encode())
    m = {"content": cfg.content(), "tokenizer_hash": th, "version": 2}
    m["sample"] = dict(sorted(taken.items())) if deferred else None
    storage.write_atomic(marker, _canon(m))
    if deferred:
        return {"tokenizer_hash": th}, m["sample"]
    return _codec_facts(cfg, tok_text, read("code_table.json")), None


def _finish_codec(
    storage: Storage,
    root: str,
    cfg: PreprocessConfig,
    sample: dict[str, int],
    counts: list[dict[str, list[int]]],
) -> dict[str, Any]:
    """The first run's ``frequency`` code table from the scan tasks' token counts of the
    sample's documents (the same table ``build_code_table`` makes from the sample's texts);
    writes code_table.json and returns the codec facts."""
    from tokenizers import Tokenizer

    tok_text = storage.read_bytes(f"{root}/tokenizer.json").decode()
    tok = Tokenizer.from_str(tok_text)
    eod = eod_id_of(tok, cfg.tokenizer.eod_token)
    total = np.zeros(tok.get_vocab_size(), np.int64)
    for c in counts:
        np.add.at(total, np.asarray(c["ids"], np.int64), np.asarray(c["counts"], np.int64))
    total[eod] += sum(sample.values())  # each sample document ends with <|eod|>
    table = frequency_table(total)
    storage.write_atomic(f"{root}/code_table.json", table.to_json().encode())
    return _codec_facts(cfg, tok_text, table.to_json())


# ---- Ray ---------------------------------------------------------------------------------------
def _ensure_ray(cfg: PreprocessConfig) -> bool:
    """Connects to (or starts) Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            address="local",
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=False,
            object_store_memory=256 * 1024 * 1024,
            log_to_driver=False,
        )
    return True


def _ray_map(
    cfg: PreprocessConfig,
    specs: list[dict[str, Any]],
    desc: str,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Runs specs, one Ray task each (``cpus_per_task`` CPUs, retried when a worker dies), as a
    Ray Data map (``ray.executor: data``) or as plain tasks (``tasks``); results as they
    finish."""
    import ray
    from tqdm import tqdm

    if not specs:
        return []
    env = credential_env()  # S3 credentials reach the tasks through runtime_env only
    opts: dict[str, Any] = {"num_cpus": cfg.ray.cpus_per_task, "max_retries": 3}
    if env:
        opts["runtime_env"] = {"env_vars": env}
    specs = [{**s, "cpus": cfg.ray.cpus_per_task} for s in specs]
    if cfg.ray.executor == "data":
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = ctx.enable_operator_progress_bars = cfg.progress
        ctx.print_on_execution_start = False
        ds = ray.data.from_items(
            [{"spec": json.dumps(s)} for s in specs], override_num_blocks=len(specs)
        ).map_batches(  # Ray Data retries a task whose worker dies on its own
            run_batch,  # from pipeline.units: a worker imports only that light module
            batch_size=1,
            num_cpus=opts["num_cpus"],
            runtime_env=opts.get("runtime_env"),
        )
        results = (row["result"] for row in ds.iter_rows())
    else:
        task = ray.remote(run_spec).options(**opts)
        results = _as_completed([task.remote(json.dumps(s)) for s in specs])
    out = []
    with tqdm(total=len(specs), desc=desc, unit="task", disable=not cfg.progress) as bar:
        for res in results:
            r = json.loads(res)
            out.append(r)
            bar.update(1)
            if on_result is not None:
                on_result(r)
    return out


def _staged_sample_counts(storage: Storage, root: str, work: str) -> dict[str, list[int]]:
    """The sample token counts a finished scan staged with its documents (``scan_unit``)."""
    data = storage.read_bytes(f"{root}/_work/docs/{work}.ids.parquet")
    meta = pq.read_schema(pa.BufferReader(data)).metadata[DOCS_META]
    return json.loads(meta)["sample_counts"]


def _as_completed(pending: list[Any]) -> Iterator[str]:
    import ray

    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield ray.get(ready[0])


# ---- dedup -------------------------------------------------------------------------------------
def _read_index(storage: Storage, root: str, index_path: str) -> pa.Table:
    return pq.read_table(pa.BufferReader(storage.read_bytes(f"{root}/{index_path}")))


class IndexReader:
    """Reads each unit index file once; rows of one input file as (positions, hashes, reasons),
    and its band keys as numpy arrays."""

    def __init__(self, storage: Storage, root: str) -> None:
        self.storage, self.root = storage, root
        self._index = ""
        self._table: pa.Table | None = None
        self._rows: dict[str, Any] = {}
        self._bands: dict[str, Any] = {}

    def _load(self, index_path: str) -> pa.Table:
        if index_path != self._index or self._table is None:
            # files of one unit are contiguous in commit order: one index file at a time
            self._table = _read_index(self.storage, self.root, index_path)
            self._index, self._rows, self._bands = index_path, {}, {}
        return self._table

    def rows(self, index_path: str, path: str) -> tuple[list[int], list[Any], list[Any]]:
        table = self._load(index_path)
        if not self._rows:
            self._rows = index_rows(table)
        return self._rows.get(path, ([], [], []))

    def bands(self, index_path: str, path: str) -> tuple[np.ndarray, np.ndarray]:
        """(band keys of the file's documents, concatenated; keys per document)."""
        table = self._load(index_path)
        if not self._bands:
            self._bands = index_bands(table)
        return self._bands.get(path, (np.zeros(0, np.uint64), np.zeros(0, np.int64)))


def _unindexed(storage: Storage, root: str, new: list[dict[str, Any]]) -> list[str]:
    """New files without a row in their unit's index: the scan could not read them (every file
    that was read has at least one row, an empty one an ``empty`` row)."""
    paths: dict[str, set[str]] = {}
    for index in dict.fromkeys(f["index"] for f in new):
        data = storage.read_bytes(f"{root}/{index}")
        table = pq.read_table(pa.BufferReader(data), columns=["path"], read_dictionary=["path"])
        paths[index] = {p for c in table.column("path").chunks for p in c.dictionary.to_pylist()}
    return [f["path"] for f in new if f["path"] not in paths[f["index"]]]


def _committed_state(manifest: Manifest | None) -> tuple[list[dict[str, Any]], list[str]]:
    """(the committed runs' dedup state records, index files to seed the state from): a dataset
    made before the state existed (no run has one) has its earlier runs' keys seeded once."""
    runs = manifest.runs if manifest is not None else ()
    committed = [r.dedup for r in runs if r.dedup is not None]
    if committed or manifest is None or not runs:
        return committed, []
    return [], list(dict.fromkeys(r.index for r in manifest.inputs))


# ---- the run -----------------------------------------------------------------------------------
def _check_compatible(manifest: Manifest, cfg: PreprocessConfig, root: str) -> None:
    old = manifest.recipe or {}
    new = cfg.content()
    defaults = PreprocessConfig().content()  # a key added later: older datasets had its default
    for k in CONTENT_KEYS:
        was = old.get(k, defaults[k])
        if was != new[k]:
            raise PreprocessError(
                f"{root} was built with {k}={was!r}, this recipe has {k}={new[k]!r}: "
                "a dataset keeps its content settings; write to a new output"
            )
    scheme = (manifest.near_dedup or {}).get("scheme")
    if scheme is not None and scheme != signature_scheme():
        raise PreprocessError(
            f"{root} holds near_dedup signatures made with {scheme!r}; this install makes "
            f"{signature_scheme()!r}, which would not match them: install that version"
        )


def run_preprocess(cfg: PreprocessConfig) -> dict[str, Any]:
    """Process the inputs not yet in the dataset at ``cfg.output``; returns a summary dict."""
    cfg.validate_for_run()
    t0 = time.perf_counter()
    root = _root(cfg.output)
    storage = storage_for(root, *(expand_path(i.path) for i in cfg.inputs))
    storage.check_writable_root(root)
    problems: list[tuple[str, str]] = []
    files = _list_inputs(storage, cfg, problems)
    if not files:
        raise PreprocessError(
            "no input files matched: " + ", ".join(expand_path(i.path) for i in cfg.inputs)
        )
    unlisted = {p: why for p, why in problems}
    for f, _ in files:
        if not _utf8(f.path):
            unlisted[f.path] = "bad_name: not valid UTF-8 (rename the file)"
    for p, why in sorted(unlisted.items()):
        _log(f"WARNING: skipping {_show(p)} in this run ({why})")
    files = [(f, s) for f, s in files if f.path not in unlisted]
    manifest = read_manifest(storage, root)
    if manifest is not None:
        _check_compatible(manifest, cfg, root)
    known = {r.path: r for r in manifest.inputs} if manifest is not None else {}
    new = [_file_spec(f, s) for f, s in files if f.path not in known]
    changed = [
        f.path
        for f, _ in files
        if f.path in known and (known[f.path].size, known[f.path].mtime) != (f.size, f.mtime)
    ]
    for p in changed:
        _log(f"WARNING: {p} changed since it was processed; it is NOT reprocessed")
    summary: dict[str, Any] = {
        "dataset": root,
        "files_seen": len(files),
        "files_already_done": len(files) - len(new),
        "files_new": len(new),
        "files_changed_ignored": changed,
        "files_skipped": unlisted,
    }
    if not new:
        _cleanup(storage, root, manifest)
        summary.update(work_done=False, seconds=time.perf_counter() - t0)
        summary["message"] = f"nothing to do: all {len(files)} input files are already in {root}"
        _log(summary["message"])
        return summary

    started = _ensure_ray(cfg)
    try:
        return _run(cfg, storage, root, manifest, new, summary, t0)
    finally:
        if started:
            import ray

            ray.shutdown()


def _run(
    cfg: PreprocessConfig,
    storage: Storage,
    root: str,
    manifest: Manifest | None,
    new: list[dict[str, Any]],
    summary: dict[str, Any],
    t0: float,
) -> dict[str, Any]:
    timings: dict[str, float] = {}
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        timings[name] = round(now - tick, 3)
        tick = now

    skipped: dict[str, str] = summary["files_skipped"]

    def skip(path: str, why: str) -> None:
        if path not in skipped:
            skipped[path] = why
            _log(f"WARNING: skipping {_show(path)} in this run ({why}); the next run retries it")

    codec, sample = _ensure_codec(storage, root, cfg, manifest, new)
    lap("codec")
    _maybe_kill("after_codec")
    run_no = (len(manifest.runs) if manifest is not None else 0) + 1
    limits = asdict(cfg.limits)
    common = {
        "root": root,
        "s3": without_credentials(storage.s3_options),  # tasks read theirs from the env
        "filters": asdict(cfg.filters),
        "limits": limits,
    }
    banding = cfg.near_dedup.banding()
    near = asdict(banding) if banding else None
    units = _plan_units(new, cfg.unit_bytes)
    unit_ids = [_key(*(f["path"] for f in u)) for u in units]
    _log(f"{len(new)} new input files in {len(units)} units")

    for i, f in enumerate(new):
        f["f"] = i  # place in processing order (dedup keys carry it)
    new_bytes = sum(f["size"] for f in new)
    parts = min(1 << PREFIX_BITS, max(1, -(-new_bytes // cfg.ray.dedup_part_bytes)))
    done_index = set(storage.list_names(f"{root}/index"))
    # staged documents hold token ids (``.ids``; the encode pass applies the code table)
    staged = storage.list_names(f"{root}/_work/docs")
    done_work = {n.removesuffix(".ids.parquet") for n in staged if n.endswith(".ids.parquet")}
    done_work &= {n.removesuffix(".parquet") for n in storage.list_names(f"{root}/_work/keys")}
    scan_specs = []
    scan_bytes: dict[str, int] = {}
    resumed_counts: list[dict[str, list[int]]] = []
    unit_work: dict[str, str] = {}
    for uid, u in zip(unit_ids, units, strict=True):
        files_key = (f"{f['path']}\0{f['size']}\0{f['mtime']}" for f in u)
        near_key = [_canon(near).decode()] if near else []
        index = f"index/{_key(run_no, _canon(limits).decode(), *near_key, *files_key)}.parquet"
        for f in u:
            f["index"] = index
        work = _key(index, codec["tokenizer_hash"], cfg.val_fraction, cfg.rejects, parts)
        unit_work[uid] = work
        in_sample = {f["path"]: sample[f["path"]] for f in u if sample and f["path"] in sample}
        if index.split("/")[-1] in done_index and work in done_work:
            if in_sample:  # scanned by an interrupted run: its sample counts are staged
                resumed_counts.append(_staged_sample_counts(storage, root, work))
            continue
        scan_bytes[uid] = sum(f["size"] for f in u)
        scan_specs.append(
            {
                "kind": "scan",
                "unit": uid,
                "index": index,
                "docs": f"_work/docs/{work}.ids.parquet",
                "keys": f"_work/keys/{work}.parquet",
                "parts": parts,
                "files": u,
                "near": near,
                "tokenizer_hash": codec["tokenizer_hash"],
                "val_fraction": cfg.val_fraction,
                "rejects": cfg.rejects,
                "sample": in_sample,
                **common,
            }
        )
    # largest units first, so that the last wave of tasks is the shortest (the results do not
    # depend on the order)
    scan_specs.sort(key=lambda sp: -scan_bytes[sp["unit"]])
    counts = list(resumed_counts)
    for r in _ray_map(cfg, scan_specs, "scan"):
        for p, why in sorted(r.get("skipped", {}).items()):
            skip(p, why)
        if r.get("sample_counts"):
            counts.append(r["sample_counts"])
    # units scanned now named their unreadable files; those of an interrupted run's scans are
    # found in their index files
    scanned = {f["index"] for sp in scan_specs for f in sp["files"]}
    for p in _unindexed(storage, root, [f for f in new if f["index"] not in scanned]):
        skip(p, "unreadable")
    lap("scan")
    if sample is not None:
        codec = _finish_codec(storage, root, cfg, sample, counts)
        lap("code_table")
    _maybe_kill("after_scan")

    # dedup: one resolve task per part (a range of key prefixes), against the dataset's state
    committed, seed = _committed_state(manifest)
    keys = [f"_work/keys/{unit_work[uid]}.parquet" for uid in unit_ids]
    run_id = f"{run_no:06d}-{_key(parts, *keys, _canon(committed).decode(), *seed)}"
    verdicts = [f"_work/verdicts/{run_id}/{r:05d}.parquet" for r in range(parts)]
    done_parts = set(storage.list_names(f"{root}/_work/verdicts/{run_id}"))
    resolve_specs = [
        {
            "kind": "resolve",
            "part": r,
            "parts": parts,
            "run_id": run_id,
            "keys": keys,
            "committed": committed,
            "seed": seed,
            "verdicts": v,
            **common,
        }
        for r, v in enumerate(verdicts)
        if v.split("/")[-1] not in done_parts
    ]
    _ray_map(cfg, resolve_specs, "dedup")
    lap("dedup")

    active = [f for f in new if f["path"] not in skipped]
    plan_units = [
        (uid, [f for f in u if f["path"] not in skipped])
        for uid, u in zip(unit_ids, units, strict=True)
    ]
    plan_units = [(uid, u) for uid, u in plan_units if u]
    markers: dict[str, dict[str, Any]] = {}
    encode_specs: list[dict[str, Any]] = []
    done_units = set(storage.list_names(f"{root}/_work/units"))
    for uid, u in plan_units:
        plan = _key(
            _canon(
                {
                    "files": u,
                    "codec": codec,
                    "content": cfg.content(),
                    "limits": limits,
                    "dedup": {"id": run_id, "parts": parts},
                    "rejects": cfg.rejects,
                }
            )
        )
        if f"{uid}.json" in done_units:
            m = json.loads(storage.read_bytes(f"{root}/_work/units/{uid}.json"))
            if m.get("plan") == plan:
                markers[uid] = m
                continue
        encode_specs.append(
            {
                "kind": "encode",
                "unit": uid,
                "plan": plan,
                "docs": f"_work/docs/{unit_work[uid]}.ids.parquet",
                "verdicts": verdicts,
                "near": near is not None,
                "vocab_size": codec["vocab_size"],
                "code_table_hash": codec["code_table_hash"],
                "eod_code": codec["eod_code"],
                "seq_len": cfg.seq_len,
                "row_group_rows": cfg.row_group_rows,
                **common,
            }
        )
    resumed = len(markers)
    if markers:
        _log(f"{len(markers)} units already encoded by an interrupted run: skipped")

    def got(r: dict[str, Any]) -> None:
        markers[r["unit"]] = r
        _maybe_kill("after_unit")

    _ray_map(cfg, encode_specs, "encode", got)
    for uid in sorted(set(unit_ids) - {uid for uid, _ in plan_units}):
        for split in SPLITS:  # a unit none of whose files could be read
            storage.remove_tree(f"{root}/{shard_path(split, uid)}")
    unit_ids = [uid for uid, _ in plan_units]
    lap("encode")
    _maybe_kill("before_manifest")

    new_manifest = _build_manifest(
        cfg, manifest, codec, active, {"id": run_id, "parts": parts}, unit_ids, markers, skipped
    )
    storage.write_atomic(f"{root}/{MANIFEST_FILE}", new_manifest.to_json())
    _maybe_kill("after_manifest")
    _cleanup(storage, root, new_manifest)
    lap("commit")

    counters: dict[str, dict[str, int]] = {}
    from pipeline.steps import merge_counters

    for uid in unit_ids:
        merge_counters(counters, markers[uid].get("counters", {}))
    run = new_manifest.runs[-1].to_dict()
    secs = time.perf_counter() - t0
    in_bytes = sum(f["size"] for f in new)
    summary.update(
        work_done=True,
        units=len(units),
        units_resumed=resumed,
        seconds=secs,
        timings=timings,
        input_bytes=in_bytes,
        mb_per_s=in_bytes / 1e6 / secs,
        tokens_per_s=run["tokens"] / secs,
        run=run,
        dropped=run["dropped"],
        stages=counters,
        totals=new_manifest.counts,
    )
    if cfg.progress:
        print(format_summary(summary), file=sys.stderr, flush=True)
    return summary


def _build_manifest(
    cfg: PreprocessConfig,
    old: Manifest | None,
    codec: dict[str, Any],
    new: list[dict[str, Any]],
    dedup: dict[str, Any],
    unit_ids: list[str],
    markers: dict[str, dict[str, Any]],
    skipped: dict[str, str],
) -> Manifest:
    """The manifest of the dataset after this run: the old records, and this run's appended."""
    shards = list(old.shards) if old is not None else []
    inputs = list(old.inputs) if old is not None else []
    runs = list(old.runs) if old is not None else []
    run_no = len(runs) + 1
    unit_of = {}
    late: dict[str, dict[str, list[int]]] = {}
    stats: dict[str, dict[str, Any]] = {}
    for uid in unit_ids:
        for p in markers[uid]["inputs"]:
            unit_of[p] = uid
        late.update(markers[uid].get("late_drops", {}))
        stats.update(markers[uid]["files"])
        marker = f"{cfg.output}/_work/units/{uid}.json"
        for i, s in enumerate(markers[uid]["shards"]):
            shards.append(Shard.from_dict({**s, "run": run_no}, marker, f"shards[{i}]"))
    records = []
    for f in new:
        r = stats[f["path"]]
        records.append(
            InputRecord(
                path=f["path"],
                size=f["size"],
                mtime=f["mtime"],
                format=f["format"],
                text_unit=f["text_unit"],
                text_field=f["text_field"],
                index=f["index"],
                unit=unit_of[f["path"]],
                run=run_no,
                docs=r["docs"],
                kept=r["kept"],
                duplicates=r["duplicates"],
                dropped=r["dropped"],
                # positions dropped after the scan, replayed by verify
                late_drops=late.get(f["path"]),
            )
        )
    inputs.extend(records)
    new_shards = [s for s in shards if s.run == run_no]
    runs.append(
        RunRecord(
            run=run_no,
            files=len(new),
            units=len(unit_ids),
            shards=len(new_shards),
            docs=sum(r.docs for r in records),
            kept=sum(r.kept for r in records),
            duplicates=sum(r.duplicates for r in records),
            dropped=_sum_dropped(records),
            skipped=dict(sorted(skipped.items())),
            limits=asdict(cfg.limits),
            dedup=dedup,
            rows=sum(s.rows for s in new_shards),
            tokens=sum(s.tokens or 0 for s in new_shards),
        )
    )

    def total(key: str, split: str) -> int:
        return sum(getattr(s, key) or 0 for s in shards if s.split == split)

    counts = {
        "files": len(inputs),
        "docs": sum(r.docs for r in inputs),
        "kept": sum(r.kept for r in inputs),
        "duplicates": sum(r.duplicates for r in inputs),
        "dropped": _sum_dropped(inputs),
        "rows": {sp: total("rows", sp) for sp in SPLITS},
        "tokens": {sp: total("tokens", sp) for sp in SPLITS},
        "pad_tokens": sum(s.pad_tokens or 0 for s in shards),
    }
    return Manifest(
        format_version=FORMAT_VERSION,
        name=cfg.name,
        seq_len=cfg.seq_len,
        block_size=cfg.block_size,
        **codec,
        recipe=cfg.recorded(),
        shards=tuple(shards),
        inputs=tuple(inputs),
        counts=counts,
        runs=tuple(runs),
        dedup_state={"prefix_bits": PREFIX_BITS, "files": "dedup/<runs[].dedup.id>/<part>"},
        near_dedup=_near_record(cfg) if cfg.near_dedup.enabled else None,
    )


def _sum_dropped(records: list[InputRecord]) -> dict[str, int]:
    """The drop counts of ``records`` added up, by reason (sorted)."""
    dropped: dict[str, int] = {}
    for rec in records:
        for k, v in rec.dropped.items():
            dropped[k] = dropped.get(k, 0) + v
    return dict(sorted(dropped.items()))


def _near_record(cfg: PreprocessConfig) -> dict[str, Any]:
    """How the dataset's near-dup band keys were made (the recipe has the settings)."""
    b = cfg.near_dedup.banding()
    assert b is not None
    return {**asdict(b), "scheme": signature_scheme()}


def _cleanup(storage: Storage, root: str, manifest: Manifest | None) -> None:
    """Drop ``_work/``, state files of uncommitted attempts and, locally, temp files of killed
    writers."""
    storage.remove_tree(f"{root}/_work")
    committed = {r["id"] for r in _committed_state(manifest)[0]}
    for name in storage.list_names(f"{root}/dedup"):
        if name not in committed:
            storage.remove_tree(f"{root}/dedup/{name}")
    if not is_s3(root):
        for dirpath, _, names in os.walk(root):
            for n in names:
                if ".tmp-" in n:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(dirpath, n))


def format_summary(s: dict[str, Any]) -> str:
    """The end-of-run table: stages with documents in/out and drops, then totals."""
    lines = [f"preprocess summary for {s['dataset']}"]
    if not s.get("work_done"):
        return lines[0] + "\n  " + s.get("message", "no work")
    lines.append(f"  {'stage':<12}{'in':>12}{'out':>12}  dropped / notes")
    for name, c in s["stages"].items():
        notes = ", ".join(
            f"{k.removeprefix('dropped.')}={v}"
            for k, v in sorted(c.items())
            if k not in ("in", "out")
        )
        lines.append(f"  {name:<12}{c.get('in', 0):>12}{c.get('out', 0):>12}  {notes}")
    r = s["run"]
    lines.append(
        f"  this run: {s['files_new']} files ({s['input_bytes'] / 1e6:.1f} MB), "
        f"{r['docs']} docs, {r['kept']} kept, {r['duplicates']} duplicates, "
        f"{r['shards']} shards, {r['rows']} rows, {r['tokens']} tokens"
    )
    lines.append(
        f"  {s['seconds']:.1f}s, {s['mb_per_s']:.2f} MB/s, {s['tokens_per_s']:.0f} tokens/s; "
        f"{s['files_already_done']} files were already done, {s['units_resumed']} units resumed"
    )
    lines.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in s["timings"].items()))
    if r.get("dropped"):
        lines.append(
            "  dropped this run: " + ", ".join(f"{k}={v}" for k, v in r["dropped"].items())
        )
    if s.get("files_skipped"):
        lines.append(
            f"  skipped this run ({len(s['files_skipped'])} files, not in the manifest; "
            "the next run tries them again):"
        )
        for p, why in sorted(s["files_skipped"].items()):
            lines.append(f"    {_show(p)}: {why}")
    t = s["totals"]
    lines.append(
        f"  dataset: {t['files']} files, {t['kept']} docs kept, dropped {t['dropped']}, "
        f"{t['duplicates']} duplicates, tokens {t['tokens']}"
    )
    return "\n".join(lines)
