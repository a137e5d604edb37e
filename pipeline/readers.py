"""Read one input file into a batch of raw documents, never raising on bad content.

A batch is a dict of equal-length lists (see ``pipeline.steps``). The reader fills ``index``
(position of the document in its file), ``raw`` (bytes still to decode) or ``text`` (already
decoded, for JSON lines, Parquet and Python prose), and ``reason`` when the document is already
lost. Reader reasons (docs/preprocessing.md has the table):

- file level, one entry for the file (or for the rest of it): ``read_error`` (not a gzip/zstd/
  Parquet stream at all, or a Parquet row group that does not decode: one entry per row group),
  ``truncated`` (a compressed stream cut short: the complete lines before the cut are kept),
  ``file_too_large`` (more than ``max_file_bytes`` decompressed bytes: decompression stops at the
  cap, the complete lines before it are kept; or more than ``max_docs`` documents: the documents
  past the cap are one entry), ``empty`` (an empty file);
- document level: ``doc_too_large`` (more than ``max_doc_bytes``, dropped before decoding),
  ``malformed_json``, ``json_too_deep`` (nesting past Python's recursion limit),
  ``missing_field`` (no such key or column, null, or a JSON line that is not an object),
  ``wrong_type`` (the field is a number, list, object or boolean; a Parquet column that is not
  a string column), ``invalid_utf8``, ``parse_error`` (python_prose source that does not parse),
  ``empty`` (a blank JSON line, a Python file without prose).

Any other exception while reading a file (a library error nobody anticipated) ends the file with
one ``read_error`` entry after the documents already read; only a failure of the storage itself
(``InputUnreadable``: the bytes could not be fetched) leaves ``read_documents``, because that is
not a property of the file's content and the caller retries the file on a later run.

Memory: compressed input is read in blocks and decompressed in pieces sized so that one piece can
never expand past the remaining cap (zlib at most ~1032:1, zstd at most 32768:1 per block), so a
compression bomb costs at most ``max_file_bytes`` (+32 MiB), not its decompressed size; plain
Parquet is read row group by row group from the open file. The decompressed payload of one file
(at most ``max_file_bytes``) is held in memory while its documents are split.

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
from collections.abc import Callable
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zstandard

__all__ = [
    "DEFAULT_MAX_DOCS",
    "DEFAULT_MAX_DOC_BYTES",
    "DEFAULT_MAX_FILE_BYTES",
    "READER_REASONS",
    "InputUnreadable",
    "decompress",
    "detect_format",
    "new_batch",
    "python_prose",
    "read_documents",
]

Batch = dict[str, list[Any]]
COLUMNS = ("index", "raw", "text", "reason")

DEFAULT_MAX_FILE_BYTES = 1 << 30  # decompressed bytes per input file
DEFAULT_MAX_DOC_BYTES = 64 << 20  # bytes per document, before decoding
DEFAULT_MAX_DOCS = 10_000_000  # documents per file (lines, JSON lines, Parquet rows)

READER_REASONS = (
    "read_error",
    "truncated",
    "file_too_large",
    "doc_too_large",
    "malformed_json",
    "json_too_deep",
    "missing_field",
    "wrong_type",
    "invalid_utf8",
    "parse_error",
    "empty",
)

_FATAL = (KeyboardInterrupt, SystemExit)
_BLOCK = 1 << 20  # compressed bytes read from the input at a time
_MIN_FEED = 1 << 10


class InputUnreadable(OSError):
    """The storage failed while the input's bytes were being fetched (not a content problem)."""


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
    Raises (SyntaxError, ValueError, tokenize.TokenError, RecursionError, MemoryError...) on
    source that does not parse; ``read_documents`` turns any of them into ``parse_error``."""
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
    """'text', 'jsonl', 'parquet' (or the given format) for a file name (after .gz/.zst)."""
    if fmt != "auto":
        return fmt
    name = _strip_compression(path.lower())
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _strip_compression(name: str) -> str:
    for ext in (".gz", ".zst", ".zstd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _codec_of(path: str) -> str | None:
    name = path.lower()
    if name.endswith(".gz"):
        return "gz"
    if name.endswith((".zst", ".zstd")):
        return "zst"
    return None


# ---- input ---------------------------------------------------------------------------------------
class _Source:
    """A binary file object whose read/seek failures become ``InputUnreadable`` (and are
    remembered, so that an error pyarrow wrapped can still be told apart from bad content)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.failed: BaseException | None = None

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except BaseException as e:
            if isinstance(e, _FATAL):
                raise
            self.failed = e
            raise InputUnreadable(f"{type(e).__name__}: {e}") from None

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes, fewer only at the end of the input: file objects of network
        storage may return short reads, which pyarrow would take for a broken file."""
        first = self._guard(self.f.read, n)
        if n is None or n < 0 or len(first) == n or not first:
            return first
        parts, got = [first], len(first)
        while got < n:
            more = self._guard(self.f.read, n - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._guard(self.f.seek, offset, whence)

    def tell(self) -> int:
        return self._guard(self.f.tell)

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return False

    def close(self) -> None:
        return None

    def unreadable(self) -> InputUnreadable | None:
        if self.failed is None:
            return None
        return InputUnreadable(f"{type(self.failed).__name__}: {self.failed}")


def _source(data: bytes | BinaryIO) -> _Source:
    if isinstance(data, _Source):
        return data
    return _Source(io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data)


def decompress(
    data: bytes | BinaryIO, path: str, max_bytes: int | None = None
) -> tuple[bytes, str | None]:
    """(payload, status) of a file; ``.gz`` (multi-member) and ``.zst`` (multi-frame) are
    decompressed to the end. status: None (complete), ``truncated`` (the stream stops or breaks
    after some output: the payload is what was decoded before), ``read_error`` (not such a
    stream: nothing decoded), ``file_too_large`` (the payload reached ``max_bytes``: it is cut
    there and the rest of the input is never decompressed). Raises only ``InputUnreadable``."""
    cap = max_bytes if max_bytes is not None and max_bytes >= 0 else None
    src = _source(data)
    codec = _codec_of(path)
    if codec == "gz":
        return _inflate(src, lambda: zlib.decompressobj(31), 1032, cap)
    if codec == "zst":
        return _inflate(src, lambda: zstandard.ZstdDecompressor().decompressobj(), 1 << 15, cap)
    if cap is None:
        return src.read(), None
    payload = src.read(cap)
    if len(payload) == cap and src.read(1):
        return payload, "file_too_large"
    return payload, None


def _inflate(
    src: _Source, new: Callable[[], Any], max_ratio: int, cap: int | None
) -> tuple[bytes, str | None]:
    """Members/frames to the end. Each call gets at most ``remaining cap / max_ratio`` input
    bytes (>= 1 KiB), so one call can never expand far past the cap."""
    out = io.BytesIO()
    total = 0
    d = None
    block, pos = b"", 0
    while True:
        if pos >= len(block):
            block, pos = src.read(_BLOCK), 0
            if not block:
                return out.getvalue(), (None if d is None else "truncated")
        if d is None:
            d = new()
        room = _BLOCK if cap is None else max(_MIN_FEED, min(_BLOCK, (cap - total) // max_ratio))
        piece = block[pos : pos + room]
        pos += len(piece)
        try:
            o = d.decompress(piece)
        except BaseException as e:
            if isinstance(e, _FATAL):
                raise
            return out.getvalue(), ("truncated" if total else "read_error")
        if cap is not None and total + len(o) > cap:
            out.write(o[: cap - total])
            return out.getvalue(), "file_too_large"
        out.write(o)
        total += len(o)
        if d.eof:
            rest = d.unused_data
            d = None
            if rest:
                block, pos = rest + block[pos:], 0


def _lines(payload: bytes, cut: bool, max_docs: int | None) -> tuple[list[bytes], bool]:
    """(lines of the payload, whether there are more than ``max_docs``); when ``cut`` the text
    after the last newline (a line cut short) is not a document. Splits at most ``max_docs``
    times, so that a file of a billion newlines cannot make a billion-entry list."""
    parts = payload.split(b"\n", -1 if max_docs is None else max_docs)
    last = parts.pop()  # after the final newline ("" when the file ends with one), or the rest
    if max_docs is not None and len(parts) == max_docs and last:
        if b"\n" in last or not cut:  # a further line (complete, or the last of the file)
            return parts, True
    if last and not cut:
        parts.append(last)
    return parts, False


# ---- documents -----------------------------------------------------------------------------------
def _json_text(line: bytes, text_field: str) -> tuple[str | None, str | None]:
    """(text, reason) of one JSON line."""
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    try:
        obj = json.loads(s)
    except RecursionError:
        return None, "json_too_deep"
    except MemoryError:
        return None, "doc_too_large"
    except Exception:  # JSONDecodeError, int digits limit (ValueError), anything else
        return None, "malformed_json"
    if not isinstance(obj, dict) or obj.get(text_field) is None:
        return None, "missing_field"
    v = obj[text_field]
    if not isinstance(v, str):
        return None, "wrong_type"
    return v, None


_STRING = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)


def _is_text_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return any(f(t) for f in _STRING)


def _read_parquet(
    b: Batch,
    source: Any,
    text_field: str,
    max_file_bytes: int | None,
    max_doc_bytes: int | None,
    max_docs: int | None,
) -> None:
    """Row group by row group: a row group that fails to decode is one ``read_error``; the
    text column's declared uncompressed sizes count towards ``max_file_bytes`` and the rows
    towards ``max_docs`` (dictionary and RLE encodings make a billion rows cost a few bytes)."""

    def unreadable() -> None:  # pyarrow may wrap the storage's error in its own
        failed = source.unreadable() if isinstance(source, _Source) else None
        if failed is not None:
            raise failed

    try:
        pf = pq.ParquetFile(source)
        schema = pf.schema_arrow
        meta = pf.metadata
    except InputUnreadable:
        raise
    except Exception:
        unreadable()
        _add(b, None, None, "read_error")
        return
    if text_field not in schema.names:
        _add(b, None, None, "missing_field")
        return
    if not _is_text_type(schema.field(text_field).type):
        _add(b, None, None, "wrong_type")
        return
    total = rows = 0
    for g in range(meta.num_row_groups):
        try:
            rg = meta.row_group(g)
            size = sum(
                rg.column(j).total_uncompressed_size
                for j in range(rg.num_columns)
                if rg.column(j).path_in_schema == text_field
            )
            over_bytes = max_file_bytes is not None and total + size > max_file_bytes
            if over_bytes or (max_docs is not None and rows + rg.num_rows > max_docs):
                _add(b, None, None, "file_too_large")
                return
            total += size
            rows += rg.num_rows
            col = pf.read_row_group(g, columns=[text_field]).column(0)
            if pa.types.is_dictionary(col.type):
                col = col.cast(col.type.value_type)
            lengths = pc.binary_length(col).to_pylist()
            values = col.to_pylist()
        except InputUnreadable:
            raise
        except Exception:
            unreadable()
            _add(b, None, None, "read_error")
            continue
        for v, n in zip(values, lengths, strict=True):
            if v is None:
                _add(b, None, None, "missing_field")
            elif max_doc_bytes is not None and n > max_doc_bytes:
                _add(b, None, None, "doc_too_large")
            else:
                _add(b, None, v, None)


def read_documents(
    data: bytes | BinaryIO,
    path: str,
    fmt: str,
    text_unit: str,
    text_field: str,
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
    max_doc_bytes: int | None = DEFAULT_MAX_DOC_BYTES,
    max_docs: int | None = DEFAULT_MAX_DOCS,
) -> Batch:
    """Raw documents of one file (bytes, or an open binary file), see the module docstring.
    Never raises on content; raises ``InputUnreadable`` when the storage fails under it."""
    b = new_batch()
    src = _source(data)
    try:
        caps = (max_file_bytes, max_doc_bytes, max_docs)
        _read_into(b, src, path, fmt, text_unit, text_field, *caps)
    except InputUnreadable:
        raise
    except BaseException as e:
        if isinstance(e, _FATAL):
            raise
        failed = src.unreadable()
        if failed is not None:
            raise failed from None
        _add(b, None, None, "read_error")
    return b


def _read_into(
    b: Batch,
    src: _Source,
    path: str,
    fmt: str,
    text_unit: str,
    text_field: str,
    max_file_bytes: int | None,
    max_doc_bytes: int | None,
    max_docs: int | None,
) -> None:
    kind = detect_format(path, fmt)
    if kind == "parquet" and _codec_of(path) is None:
        f = src.f
        source = pa.BufferReader(f.getbuffer()) if type(f) is io.BytesIO else src
        _read_parquet(b, source, text_field, max_file_bytes, max_doc_bytes, max_docs)
        return
    payload, status = decompress(src, path, max_file_bytes)
    if status == "read_error":
        _add(b, None, None, "read_error")
        return
    if not payload and status is None:
        _add(b, None, None, "empty")
        return
    too_big = max_doc_bytes is not None and len(payload) > max_doc_bytes
    if kind == "parquet":
        if status is not None:
            _add(b, None, None, status)
            return
        buf = pa.BufferReader(payload)
        _read_parquet(b, buf, text_field, max_file_bytes, max_doc_bytes, max_docs)
        return
    if kind == "python_prose":
        if status is not None or too_big:
            _add(b, None, None, status or "doc_too_large")
            return
        try:
            source = payload.decode("utf-8")
        except UnicodeDecodeError:
            _add(b, None, None, "invalid_utf8")
            return
        try:
            prose = python_prose(source)
        except BaseException as e:
            if isinstance(e, _FATAL):
                raise
            _add(b, None, None, "parse_error")
            return
        _add(b, None, prose or None, None if prose else "empty")
        return
    if kind == "text" and text_unit == "file":
        if status is not None or too_big:
            _add(b, None, None, status or "doc_too_large")
        else:
            _add(b, payload, None, None)
        return
    json_lines = kind != "text"
    lines, over = _lines(payload, status is not None, max_docs)
    for line in lines:
        if max_doc_bytes is not None and len(line) > max_doc_bytes:
            _add(b, None, None, "doc_too_large")
        elif not json_lines:
            _add(b, line, None, None)
        elif not line.strip():
            _add(b, None, None, "empty")
        else:
            text, reason = _json_text(line, text_field)
            _add(b, None, text, reason)
    if over or status is not None:
        _add(b, None, None, "file_too_large" if over else status)
