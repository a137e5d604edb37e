"""The dataset contract between preprocessing and training (docs/dataset-format.md): the file
names, shard naming, the manifest schema and the code table's id -> code word map.

    <dataset>/manifest.json                  written last: a folder without it is unfinished
              tokenizer.json  code_table.json
              shards/<split>/<unit>-00000.parquet    split: train or val

pipeline/ writes the manifest from these records (``Manifest.to_json``) and reads it back for
the next run and for verify; training and evaluation read it with ``Manifest.load``. Parsing
checks the type of every key it knows and names the file and the key that is missing or bad;
keys it does not know are kept (``extra``) and written back unchanged. Records of manifests
written by other tools may lack keys: a shard without ``sha256`` has "", one without ``run``
belongs to version 1.

A leaf that pipeline's Ray workers import: json, numpy and pyarrow only (the torch
``CodeTable`` is loaded lazily, by ``Manifest.code_table``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .storage import open_fs

if TYPE_CHECKING:
    from .codec import CodeTable

__all__ = [
    "CODE_TABLE_FILE",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "SPLITS",
    "TOKENIZER_FILE",
    "DataError",
    "InputRecord",
    "Manifest",
    "RunRecord",
    "Shard",
    "code_of_id",
    "codeword_dtype",
    "shard_dir",
    "shard_path",
    "tokenizer_hash",
]

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
CODE_TABLE_FILE = "code_table.json"
SPLITS = ("train", "val")


class DataError(ValueError):
    """The dataset is missing, unfinished, inconsistent, or does not match the model."""


def shard_dir(split: str) -> str:
    """The folder (relative to the dataset) of a split's shards."""
    return f"shards/{split}"


def shard_path(split: str, unit: str) -> str:
    """The shard of ``unit`` in ``split``, relative to the dataset folder."""
    return f"{shard_dir(split)}/{unit}-00000.parquet"


def codeword_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding B = ceil(log2 V) bits (``BitCodec.codeword_dtype``)."""
    bits = max(1, math.ceil(math.log2(vocab_size)))
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if bits <= np.iinfo(dt).bits:
            return np.dtype(dt)
    raise ValueError(f"vocab_size {vocab_size} too large")


def tokenizer_hash(text: str) -> str:
    """The manifest's ``tokenizer_hash``: sha256 of tokenizer.json's text."""
    return hashlib.sha256(text.encode()).hexdigest()


def code_of_id(text: str, where: str = CODE_TABLE_FILE) -> np.ndarray:
    """code_table.json's text -> the int64 id -> code word map (the identity for the binary
    table), without torch; ``where`` names the file in errors."""
    try:
        table = json.loads(text)
        v, code = table["vocab_size"], table["code_of_id"]
        if not isinstance(v, int) or (code is not None and len(code) != v):
            raise ValueError(f"vocab_size {v!r} with {len(code or ())} codes")
        return np.arange(v, dtype=np.int64) if code is None else np.asarray(code, np.int64)
    except KeyError as e:
        raise DataError(f"{where}: missing key {e}") from None
    except (TypeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise DataError(f"{where}: malformed code table: {e}") from None


# ---- the records: a key's type is its field's annotation; errors name the file and the key ----
# A field without a default is a key every record has; one with a default (None or ()) a key a
# record may lack, not written back while it holds that default. ``X | None``: null is a value.
_NOT_STORED = frozenset({"extra", "root", "pinned"})


def _bad(file: str, key: str, what: str, value: Any) -> DataError:
    return DataError(f"{file}: key {key!r}: expected {what}, got {value!r}")


def _convert(tp: Any, v: Any, file: str, key: str) -> Any:
    """``v`` checked against the annotation ``tp`` (lists become tuples, objects records)."""
    args = typing.get_args(tp)
    if type(None) in args:  # X | None
        if v is None:
            return None
        tp = next(a for a in args if a is not type(None))
        args = typing.get_args(tp)
    origin = typing.get_origin(tp) or tp
    if origin is tuple:
        if not isinstance(v, list):
            raise _bad(file, key, "a list", v)
        return tuple(_convert(args[0], x, file, f"{key}[{i}]") for i, x in enumerate(v))
    if isinstance(origin, type) and issubclass(origin, _Record):
        return origin.from_dict(v, file, key)
    what, ok = {
        int: ("an integer", int),
        float: ("a number", int | float),
        str: ("a string", str),
        dict: ("an object", dict),
    }[origin]
    if isinstance(v, bool) or not isinstance(v, ok):
        raise _bad(file, key, what, v)
    return v


@functools.cache
def _stored(cls: type) -> tuple[tuple[dataclasses.Field[Any], Any], ...]:
    """(field, its annotation) of each key a record class reads and writes."""
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls) if f.name not in _NOT_STORED)


class _Record:
    """from_dict / to_dict over the dataclass fields; unknown keys are kept in ``extra``."""

    extra: dict[str, Any]

    @classmethod
    def from_dict(cls, d: Any, file: str, key: str = "") -> Any:
        if not isinstance(d, dict):
            raise _bad(file, key or "(top level)", "an object", d)
        kw: dict[str, Any] = {}
        for f, tp in _stored(cls):
            name = f"{key}.{f.name}" if key else f.name
            if f.name in d:
                kw[f.name] = _convert(tp, d[f.name], file, name)
            elif f.default is dataclasses.MISSING:
                raise DataError(f"{file}: missing key {name!r}")
        return cls(**kw, extra={k: v for k, v in d.items() if k not in kw})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f, _ in _stored(type(self)):
            v = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and v == f.default and v in (None, ()):
                continue
            if isinstance(v, tuple):
                v = [x.to_dict() if isinstance(x, _Record) else x for x in v]
            out[f.name] = v
        return {**out, **self.extra}


@dataclass(frozen=True, kw_only=True)
class Shard(_Record):
    """One shard file: ``path`` relative to the dataset, ``run`` the run (version) that added it;
    ``tokens`` = rows * seq_len, ``pad_tokens`` of them padding."""

    path: str
    split: str
    rows: int
    sha256: str = ""
    run: int = 1
    tokens: int | None = None
    pad_tokens: int | None = None
    docs: int | None = None
    bytes: int | None = None
    unit: str | None = None
    inputs: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class InputRecord(_Record):
    """One input file a run processed: how it was read, its index file, and its counts
    (``late_drops``: positions lost after the scan, per reason, replayed by verify)."""

    path: str
    size: int
    mtime: float
    format: str
    text_unit: str
    text_field: str
    index: str
    unit: str | None
    docs: int
    kept: int
    duplicates: int
    dropped: dict[str, int]
    run: int | None = None
    late_drops: dict[str, list[int]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RunRecord(_Record):
    """One committed preprocessing run (a dataset version): what it added, the reading limits
    it ran under and its dedup state (``dedup``: id and part count)."""

    run: int
    files: int | None = None
    units: int | None = None
    shards: int | None = None
    docs: int | None = None
    kept: int | None = None
    duplicates: int | None = None
    rows: int | None = None
    tokens: int | None = None
    dropped: dict[str, int] | None = None
    skipped: dict[str, str] | None = None
    limits: dict[str, Any] | None = None
    dedup: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Manifest(_Record):
    """manifest.json: the codec facts, the shards (in manifest order) and preprocessing's
    records. ``root`` (the dataset folder) and ``pinned`` (see ``at_version``) are not stored."""

    format_version: int
    seq_len: int
    block_size: int
    vocab_size: int
    num_bits: int
    codeword_dtype: str
    eod_id: int
    tokenizer_hash: str
    code_table_hash: str
    shards: tuple[Shard, ...]
    eod_code: int | None = None
    code_table_kind: str | None = None
    name: str | None = None
    recipe: dict[str, Any] | None = None  # the PreprocessConfig as recorded
    inputs: tuple[InputRecord, ...] = ()
    counts: dict[str, Any] | None = None
    runs: tuple[RunRecord, ...] = ()
    dedup_state: dict[str, Any] | None = None
    near_dedup: dict[str, Any] | None = None  # how the LSH band keys were made
    extra: dict[str, Any] = field(default_factory=dict)
    root: str = field(default="", compare=False)
    pinned: int | None = None

    # ---- reading and writing ------------------------------------------------------------------
    @classmethod
    def from_json(cls, text: str | bytes, file: str, root: str = "") -> Manifest:
        """Parses manifest.json (``file`` names it in errors)."""
        try:
            d = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{file}: unreadable: {e}") from None
        if isinstance(d, dict) and d.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{file}: format_version {d.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        return replace(cls.from_dict(d, file), root=root.rstrip("/"))

    @classmethod
    def load(cls, root: str) -> Manifest:
        """The manifest of the dataset at ``root`` (a local folder or s3://)."""
        fs, base = open_fs(root)
        file = f"{root.rstrip('/')}/{MANIFEST_FILE}"
        try:
            with fs.open_input_stream(f"{base}/{MANIFEST_FILE}") as f:
                text = f.read()
        except FileNotFoundError:
            raise DataError(f"{root}: no {MANIFEST_FILE} (missing or unfinished dataset)") from None
        except OSError as e:
            raise DataError(f"{file}: unreadable: {e}") from None
        return cls.from_json(text, file, root)

    def to_json(self) -> bytes:
        """The manifest's bytes as the writer commits them (sorted keys, one-space indent)."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True).encode() + b"\n"

    # ---- versions and identity ----------------------------------------------------------------
    @property
    def version(self) -> int:
        """The newest run number (or the pinned version, see ``at_version``)."""
        if self.pinned is not None:
            return self.pinned
        return max([r.run for r in self.runs] + [s.run for s in self.shards], default=1)

    def split(self, name: str) -> tuple[Shard, ...]:
        """The shards of split ``name``, in manifest order."""
        return tuple(s for s in self.shards if s.split == name)

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits that have shards, in order of first appearance."""
        return tuple(dict.fromkeys(s.split for s in self.shards))

    def at_version(self, version: int) -> Manifest:
        """The dataset as its run ``version`` committed it: the shards of runs 1..version (the
        other records are kept as they are)."""
        if not 1 <= version <= self.version:
            raise DataError(
                f"{self.root}: no dataset version {version} (versions 1..{self.version})"
            )
        return replace(
            self, shards=tuple(s for s in self.shards if s.run <= version), pinned=version
        )

    def version_of(self, split: str, fingerprint: str, version: int | None = None) -> int | None:
        """The version whose ``split`` has ``fingerprint``: ``version`` if it matches, else (no
        version recorded) the newest one that does; None when none does (the data changed)."""
        candidates = range(self.version, 0, -1) if version is None else [version]
        for v in candidates:
            if 1 <= v <= self.version and self.at_version(v).fingerprint(split) == fingerprint:
                return v
        return None

    def fingerprint(self, split: str) -> str:
        """sha256 over (tokenizer_hash, code_table_hash, sorted (path, sha256) of the split)."""
        h = hashlib.sha256()
        h.update(self.tokenizer_hash.encode() + b"\0" + self.code_table_hash.encode() + b"\0")
        for s in sorted(self.split(split), key=lambda s: s.path):
            h.update(s.path.encode() + b"\0" + s.sha256.encode() + b"\0")
        return h.hexdigest()

    def check_model(self, vocab_size: int, block_size: int) -> None:
        """The model must fit the data: same vocabulary, seq_len a multiple of block_size."""
        if vocab_size != self.vocab_size:
            raise DataError(
                f"model.vocab_size={vocab_size} but the dataset has vocab_size={self.vocab_size}"
            )
        if self.seq_len % block_size:
            raise DataError(
                f"dataset seq_len={self.seq_len} is not a multiple of model.block_size={block_size}"
            )

    # ---- the files beside it ------------------------------------------------------------------
    def read_file(self, name: str) -> str:
        """A file of the dataset (relative to ``root``) as text."""
        fs, base = open_fs(self.root)
        with fs.open_input_stream(f"{base}/{name}") as f:
            return f.read().decode()

    def tokenizer_json(self) -> str:
        """tokenizer.json, checked against ``tokenizer_hash``."""
        text = self.read_file(TOKENIZER_FILE)
        if tokenizer_hash(text) != self.tokenizer_hash:
            raise DataError(f"{self.root}: {TOKENIZER_FILE} does not match tokenizer_hash")
        return text

    def code_table(self) -> CodeTable:
        """code_table.json as a ``bitlm.codec.CodeTable`` (torch), checked against its hash."""
        from .codec import CodeTable

        text = self.read_file(CODE_TABLE_FILE)
        try:
            table = CodeTable.from_json(text)
        except ValueError as e:
            raise DataError(f"{self.root}/{CODE_TABLE_FILE}: {e}") from None
        if table.hash != self.code_table_hash:
            raise DataError(f"{self.root}: {CODE_TABLE_FILE} does not match code_table_hash")
        return table
