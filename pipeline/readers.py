"""Read one input file into a batch of raw documents, never raising on bad content.

A batch is a dict of equal-length lists (see ``pipeline.steps``). The reader fills ``index``
(position of the document in its file), ``raw`` (bytes still to decode) or ``text`` (already
decoded, for JSON lines and Parquet), and ``reason`` when the document is already lost
(``truncated``, ``malformed_json``, ``missing_field``, ``read_error``, ``empty``,
``invalid_utf8``, ``parse_error``).

Formats: plain text (a document per file or per line), JSON lines, Parquet, and ``python_prose``:
the English prose of a Python source file (its docstrings and comments in line order, one
document per file), which gives every machine an English corpus from the standard library.
"""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize
import zlib
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

__all__ = ["decompress", "detect_format", "new_batch", "python_prose", "read_documents"]

Batch = dict[str, list[Any]]
COLUMNS = ("index", "raw", "text", "reason")


def new_batch() -> Batch:
    return {c: [] for c in COLUMNS}


def _add(b: Batch, raw: bytes | None, text: str | None, reason: str | None) -> None:
    b["index"].append(len(b["index"]))
    b["raw"].append(raw)
    b["text"].append(text)
    b["reason"].append(reason)


def python_prose(source: str) -> str:
    """Docstrings and comments of Python source, in line order, as paragraphs. Comment runs on
    consecutive lines form one paragraph; pragma-like and symbol-only comments are skipped.
    Raises SyntaxError/ValueError/tokenize.TokenError on source that does not parse."""
    tree = ast.parse(source)
    parts: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc and node.body:
                parts.append((node.body[0].lineno, doc.strip()))
    run: list[str] = []
    run_line = last = -2
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        text = tok.string.lstrip("#").strip()
        line = tok.start[0]
        skip = not re.search(r"[A-Za-z]{2}", text) or _PRAGMA.match(text)
        if skip or line != last + 1:
            if run:
                parts.append((run_line, " ".join(run)))
            run, run_line = [], line
        if not skip:
            run.append(text)
        last = line
    if run:
        parts.append((run_line, " ".join(run)))
    return "\n\n".join(text for _, text in sorted(parts, key=lambda p: p[0]))


_PRAGMA = re.compile(r"^(!|-\*-|(type|noqa|pragma|fmt|pylint|isort|mypy)\b|coding[:=])", re.I)


def detect_format(path: str, fmt: str) -> str:
    """'text', 'jsonl' or 'parquet' for a file name (after stripping .gz/.zst)."""
    if fmt != "auto":
        return fmt
    name = path.lower()
    for ext in (".gz", ".zst", ".zstd"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def decompress(data: bytes, path: str) -> tuple[bytes, bool]:
    """(payload, truncated). Multi-member .gz and multi-frame .zst are read to the end; a stream
    cut short keeps what was decoded before the cut."""
    name = path.lower()
    if name.endswith(".gz"):
        return _read_frames(data, lambda: zlib.decompressobj(31), zlib.error)
    if name.endswith((".zst", ".zstd")):
        return _read_frames(
            data, lambda: zstandard.ZstdDecompressor().decompressobj(), zstandard.ZstdError
        )
    return data, False


def _read_frames(data: bytes, new, error: type[Exception]) -> tuple[bytes, bool]:
    """Decompress concatenated members/frames to the end; (payload so far, truncated)."""
    out: list[bytes] = []
    rest = data
    while rest:
        d = new()
        try:
            out.append(d.decompress(rest))
        except error:
            return b"".join(out), True
        if not d.eof:
            return b"".join(out), True
        rest = d.unused_data
    return b"".join(out), False


def _lines(payload: bytes, truncated: bool) -> tuple[list[bytes], bool]:
    """Split into lines; returns (complete lines, whether a cut-off last line was dropped)."""
    parts = payload.split(b"\n")
    last = parts.pop()  # text after the final newline ("" when the file ends with one)
    if truncated:
        return parts, True
    if last:
        parts.append(last)
    return parts, False


def read_documents(data: bytes, path: str, fmt: str, text_unit: str, text_field: str) -> Batch:
    """Raw documents of one file (see the module docstring)."""
    b = new_batch()
    try:
        payload, truncated = decompress(data, path)
    except Exception:
        _add(b, None, None, "read_error")
        return b
    if not payload and not truncated:
        _add(b, None, None, "empty")
        return b
    kind = detect_format(path, fmt)
    if kind == "parquet":
        if truncated:
            _add(b, None, None, "truncated")
            return b
        try:
            table = pq.read_table(pa.BufferReader(payload))
        except Exception:
            _add(b, None, None, "read_error")
            return b
        if text_field not in table.column_names:
            _add(b, None, None, "missing_field")
            return b
        col = table.column(text_field)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            _add(b, None, None, "missing_field")
            return b
        for v in col.to_pylist():
            _add(b, None, v, None if v is not None else "missing_field")
        return b
    if kind == "python_prose":
        if truncated:
            _add(b, None, None, "truncated")
            return b
        try:
            source = payload.decode("utf-8")
        except UnicodeDecodeError:
            _add(b, None, None, "invalid_utf8")
            return b
        try:
            prose = python_prose(source)
        except (SyntaxError, ValueError, tokenize.TokenError, RecursionError, MemoryError):
            _add(b, None, None, "parse_error")
            return b
        _add(b, None, prose or None, None if prose else "empty")
        return b
    if kind == "text" and text_unit == "file":
        _add(b, None if truncated else payload, None, "truncated" if truncated else None)
        return b
    lines, cut = _lines(payload, truncated)
    if kind == "text":
        for line in lines:
            _add(b, line, None, None)
    else:
        for line in lines:
            if not line.strip():
                _add(b, None, None, "empty")
                continue
            try:
                s = line.decode("utf-8")
            except UnicodeDecodeError:
                _add(b, None, None, "invalid_utf8")
                continue
            try:
                obj = json.loads(s)
            except ValueError:
                _add(b, None, None, "malformed_json")
                continue
            v = obj.get(text_field) if isinstance(obj, dict) else None
            ok = isinstance(v, str)
            _add(b, None, v if ok else None, None if ok else "missing_field")
    if cut:
        _add(b, None, None, "truncated")
    return b
