"""Unit tests of the pipeline steps, readers, packing and shards: no Ray."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from bitlm.dataset_format import codeword_dtype
from pipeline.readers import decompress, read_documents
from pipeline.shards import decode_shard, encode_shard
from pipeline.steps import (
    Decode,
    Dedup,
    Encode,
    LengthFilter,
    MarkDuplicates,
    Normalise,
    Packer,
    SplitByHash,
    Tokenise,
    doc_hash,
    normalise_text,
    run_steps,
    scan_steps,
    unpack,
)


def scan(data: bytes, name: str, fmt: str = "auto", unit: str = "line", field: str = "text"):
    b = read_documents(data, name, fmt, unit, field)
    return run_steps(scan_steps(0.05, 1, 1000), b)


def test_normalise_nfc_controls_newlines() -> None:
    assert normalise_text("cafe\u0301\r\nx\x00y\x1b\tz\rw\ufeff") == "café\nxy\tz\nw\ufeff"
    assert normalise_text("\ufeffabc") == "abc"


def test_decode_reasons() -> None:
    b = read_documents(b"good\n\xff\xfebad\nbin\x00ary\n\n", "x.txt", "auto", "line", "text")
    b = run_steps([Decode(0.05), Normalise(), LengthFilter(1, 100)], b)
    assert b["reason"] == [None, "invalid_utf8", "binary", "empty"]
    assert b["text"][0] == "good"


def test_jsonl_reasons() -> None:
    lines = [json.dumps({"text": "ok one"}), "{not json", json.dumps({"other": 1}), "[1, 2]"]
    b = scan(("\n".join(lines) + "\n").encode(), "a.jsonl")
    assert b["reason"] == [None, "malformed_json", "missing_field", "missing_field"]


def test_gzip_truncated_keeps_complete_lines() -> None:
    data = gzip.compress(b"".join(b"line %d\n" % i for i in range(2000)))
    out, status = decompress(data[: len(data) // 2], "x.gz")
    assert status == "truncated" and out
    b = scan(data[: len(data) // 2], "x.txt.gz")
    assert b["reason"][-1] == "truncated"
    kept = [t for t, r in zip(b["text"], b["reason"], strict=True) if r is None]
    assert kept == [f"line {i}" for i in range(len(kept))] and len(kept) > 10
    assert decompress(gzip.compress(b"a") + gzip.compress(b"b"), "x.gz") == (b"ab", None)


def test_zstd_and_truncated_zstd() -> None:
    data = zstandard.ZstdCompressor().compress(b"x\ny\n" * 1000)
    assert decompress(data, "a.zst") == (b"x\ny\n" * 1000, None)
    assert decompress(data[:-5], "a.zst")[1] == "truncated"


def test_parquet_reader(tmp_path: Path) -> None:
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["a doc", None, "b doc"]}), p)
    b = scan(p.read_bytes(), str(p))
    assert b["reason"] == [None, "missing_field", None]
    b = read_documents(p.read_bytes(), str(p), "auto", "file", "body")
    assert b["reason"] == ["missing_field"]
    assert read_documents(b"garbage", "x.parquet", "auto", "file", "text")["reason"] == [
        "read_error"
    ]


def test_empty_file_and_file_mode() -> None:
    assert read_documents(b"", "e.txt", "auto", "line", "text")["reason"] == ["empty"]
    b = scan(b"one\ntwo\n", "f.py", unit="file")
    assert b["text"] == ["one\ntwo\n"] and b["reason"] == [None]


def test_length_filter() -> None:
    f = LengthFilter(3, 5)
    assert [f.reason(t) for t in ["  \n", "ab", "abc", "abcdef"]] == [
        "empty",
        "too_short",
        None,
        "too_long",
    ]


def test_dedup_first_occurrence_and_counters() -> None:
    b = {"index": [0, 1, 2], "text": ["a", "b", "a"], "reason": [None, None, None]}
    b["hash"] = [doc_hash(t) for t in b["text"]]
    d = Dedup()
    run_steps([d], b)
    assert b["reason"] == [None, None, "duplicate"]
    assert d.counters["dropped.duplicate"] == 1 and d.counters["in"] == 3
    b2 = {"index": [0, 1], "reason": [None, None]}
    run_steps([MarkDuplicates([1])], b2)
    assert b2["reason"] == [None, "duplicate"]


def test_split_is_by_hash_and_stable() -> None:
    s = SplitByHash(0.5)
    hs = [doc_hash(str(i)) for i in range(1000)]
    val = sum(s.split_of(h) == "val" for h in hs)
    assert 400 < val < 600
    assert [s.split_of(h) for h in hs] == [SplitByHash(0.5).split_of(h) for h in hs]


@pytest.mark.parametrize("L", [4, 8, 16])
def test_pack_unpack_roundtrip(L: int) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 50, size=int(n)).astype(np.uint8) for n in rng.integers(1, 30, 20)]
    codes, starts, pad = Packer(L, 0, np.uint8).pack(docs)
    assert codes.shape[1] == L and codes.dtype == np.uint8
    assert codes.size == sum(len(d) + 1 for d in docs) + pad and 0 <= pad < L
    back = unpack(codes, starts, 0)
    assert len(back) == len(docs)
    assert all(np.array_equal(a, b) for a, b in zip(back, docs, strict=True))
    data = encode_shard(codes, starts, 3)
    assert data == encode_shard(codes, starts, 3)  # deterministic bytes
    c2, s2 = decode_shard(data)
    assert np.array_equal(c2, codes) and s2 == starts
    assert pq.ParquetFile(pa.BufferReader(data)).metadata.num_row_groups == -(-len(codes) // 3)


def test_codeword_dtype_and_encode_match_bitcodec() -> None:
    import torch

    from bitlm.codec import BitCodec, CodeTable

    for v in (2, 255, 256, 257, 4096, 65536, 65537):
        assert codeword_dtype(v) == BitCodec(v).codeword_dtype
    table = CodeTable.frequency(list(range(300, 0, -1)), 300)
    codec = BitCodec(300, table)
    ids = np.arange(300, dtype=np.int32)
    b = {"reason": [None], "ids": [ids]}
    Encode(np.asarray(table.code_of_id), codeword_dtype(300))(b)
    assert np.array_equal(b["codes"][0], codec.to_codewords(torch.from_numpy(ids)).numpy())


def test_tokenise_keeps_special_token_text() -> None:
    from tokenizers import Tokenizer

    from pipeline.tokenizer import train_bpe

    tok = Tokenizer.from_str(train_bpe(["hello world <|eod|> x"] * 50, 300, 2, "<|eod|>"))
    assert tok.token_to_id("<|eod|>") == 0
    b = {"reason": [None], "text": ["say <|eod|> now é"]}
    Tokenise(tok)(b)
    assert 0 not in b["ids"][0].tolist()
    assert tok.decode(b["ids"][0].tolist()) == "say <|eod|> now é"


def test_python_prose_reader() -> None:
    src = b'''#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""Module docstring: the first paragraph."""
# A comment run that goes on
# over two lines.
import os  # noqa: F401

# ------------------------------


class A:
    """Class docstring."""

    def f(self):
        """Method docstring."""
        return 1  # type: ignore
'''
    b = read_documents(src, "m.py", "python_prose", "file", "text")
    assert b["reason"] == [None]
    paras = b["text"][0].split("\n\n")
    assert paras == [
        "Module docstring: the first paragraph.",
        "A comment run that goes on over two lines.",
        "Class docstring.",
        "Method docstring.",
    ]
    # Source that does not parse, bytes that are not UTF-8, and a file with no prose.
    reasons = [
        read_documents(data, "m.py", "python_prose", "file", "text")["reason"]
        for data in (b"def f(:\n", b"\xff\xfe = 1\n", b"x = 1\n")
    ]
    assert reasons == [["parse_error"], ["invalid_utf8"], ["empty"]]


def test_input_exclude_patterns(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.driver import _list_inputs, storage_for

    for rel in ("a.py", "site-packages/b.py", "pkg/c.py", "pkg/site-packages/d.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: t\noutput: {tmp_path / 'out'}\ninputs:\n  - path: {tmp_path}\n    glob: '**/*.py'\n"
        "    exclude: ['site-packages/*', '*/site-packages/*']\n"
    )
    cfg = load_config(recipe)
    files = [f.path for f, _ in _list_inputs(storage_for(str(tmp_path)), cfg)]
    assert files == [str(tmp_path / "a.py"), str(tmp_path / "pkg/c.py")]
