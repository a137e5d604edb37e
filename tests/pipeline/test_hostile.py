"""Hostile input (issue 12, point 1): every kind of bad document or file is a counted drop with a
named reason and never aborts a run; good documents beside bad ones are kept. Checked at the
reader and step level, through the driver in process (Ray Data replaced by a local loop, so that
files can be removed between the passes), and end to end through `jobs/preprocess.py` on a local
Ray (`test_hostile_corpus_end_to_end`)."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import subprocess
import sys
import time
import tracemalloc
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard

from pipeline import decode_dataset, verify
from pipeline.readers import InputUnreadable, read_documents
from pipeline.steps import Encode, Normalise, Tokenise, alive, run_steps, scan_steps

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def scan(data: bytes, name: str, fmt: str = "auto", unit: str = "line", **caps) -> dict:
    b = read_documents(data, name, fmt, unit, "text", **caps)
    return run_steps(scan_steps(0.05, 1, 1_000_000), b)


def nfc(t: str) -> str:
    return unicodedata.normalize("NFC", t)


# ---- builders shared with the end-to-end test ----------------------------------------------
def gzip_bomb(head: bytes, zeros: int) -> bytes:
    """``head`` then ``zeros`` NUL bytes, gzip-compressed without ever holding them whole."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [c.compress(head)]
    chunk = bytes(MiB)
    for _ in range(zeros // MiB):
        out.append(c.compress(chunk))
    out.append(c.flush())
    return b"".join(out)


def zstd_bomb(head: bytes, zeros: int) -> bytes:
    c = zstandard.ZstdCompressor(level=3).compressobj()
    out = [c.compress(head)]
    chunk = bytes(MiB)
    for _ in range(zeros // MiB):
        out.append(c.compress(chunk))
    out.append(c.flush())
    return b"".join(out)


def parquet_bytes(texts: list, row_group_size: int, corrupt_group: int | None = None) -> bytes:
    """Parquet (uncompressed) of a text column; optionally with the page header of one row
    group's text column overwritten, so that exactly that row group cannot be decoded."""
    buf = io.BytesIO()
    pq.write_table(
        pa.table({"text": texts}), buf, row_group_size=row_group_size, compression="none"
    )
    data = bytearray(buf.getvalue())
    if corrupt_group is not None:
        meta = pq.ParquetFile(io.BytesIO(bytes(data))).metadata
        off = meta.row_group(corrupt_group).column(0).data_page_offset
        data[off : off + 12] = b"\xff" * 12
    return bytes(data)


JSON_CASES = [  # (line, reason after the scan steps)
    (json.dumps({"text": "bad \ud800 lone surrogate"}), "invalid_unicode"),
    ('{"text": "deep", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}", "json_too_deep"),
    (json.dumps({"text": 5}), "wrong_type"),
    (json.dumps({"text": ["a", "list"]}), "wrong_type"),
    (json.dumps({"text": {"an": "object"}}), "wrong_type"),
    (json.dumps({"text": True}), "wrong_type"),
    (json.dumps({"text": None}), "missing_field"),
    (json.dumps({"body": "no text key"}), "missing_field"),
    ("[1, 2]", "missing_field"),
    ('"just a string"', "missing_field"),
    ('{"text": "unterminated', "malformed_json"),
    ('{"text": "x", "n": ' + "1" * 5000 + "}", "malformed_json"),  # past int digits limit
    (b'{"text": "caf\xe9"}', "invalid_utf8"),
]


def _b(x: str | bytes) -> bytes:
    return x if isinstance(x, bytes) else x.encode()


# ---- readers and steps ---------------------------------------------------------------------------
def test_hostile_json_lines_each_get_their_reason_and_good_ones_stay() -> None:
    lines = [b'{"text": "first good one"}']
    for line, _ in JSON_CASES:
        lines += [_b(line)]
    lines += [json.dumps({"text": "emoji \ud83d\ude00 pair is fine"}).encode(), b'{"text": "last"}']
    b = scan(b"\n".join(lines) + b"\n", "h.jsonl")
    assert b["reason"] == [None, *(r for _, r in JSON_CASES), None, None]
    assert [b["text"][i] for i in alive(b)] == ["first good one", "emoji 😀 pair is fine", "last"]


class Counting(io.BytesIO):
    """An input that counts the bytes read from it."""

    consumed = 0

    def read(self, n: int = -1) -> bytes:
        out = super().read(n)
        self.consumed += len(out)
        return out


def test_compression_bombs_stop_at_the_cap() -> None:
    head = b"good line one\ngood line two\n"
    for name, bomb in (
        ("b.txt.gz", gzip_bomb(head, 256 * MiB)),
        ("b.txt.zst", zstd_bomb(head, 256 * MiB)),
    ):
        tracemalloc.start()
        b = read_documents(bomb, name, "auto", "line", "text", max_file_bytes=MiB)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert b["reason"] == [None, None, "file_too_large"], name
        assert b["raw"][:2] == [b"good line one", b"good line two"]
        # the 256 MiB were never made: memory stays near the 1 MiB cap (+ one zstd block run)
        assert peak < 48 * MiB, (name, peak)
        # one document per file: the whole file is the document over the cap
        b = read_documents(bomb, name, "auto", "file", "text", max_file_bytes=MiB)
        assert b["reason"] == ["file_too_large"]
    # a large ordinary file: reading stops near the cap instead of going through the input
    rng = random.Random(0)
    body = b"".join(b"%d %d\n" % (i, rng.getrandbits(40)) for i in range(300_000))
    for name, data in (
        ("big.txt.gz", gzip.compress(body, 1, mtime=0)),
        ("big.txt.zst", zstandard.ZstdCompressor(level=1).compress(body)),
        ("big.txt", body),
    ):
        src = Counting(data)
        b = read_documents(src, name, "auto", "line", "text", max_file_bytes=MiB)
        assert b["reason"][-1] == "file_too_large" and sum(map(len, b["raw"][:-1])) < MiB
        assert src.consumed <= 2 * MiB < len(data), (name, src.consumed, len(data))


def test_document_count_cap_stops_line_and_row_bombs() -> None:
    # 64 MiB of newlines: 64 KB compressed, 64 million documents (~2 GB of lists) without a cap
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = c.compress(b"first\nsecond\n") + b"".join(c.compress(b"\n" * MiB) for _ in range(64))
    bomb += c.flush()
    tracemalloc.start()
    b = read_documents(bomb, "n.txt.gz", "auto", "line", "text", max_docs=1000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(b["reason"]) == 1001 and b["reason"][-1] == "file_too_large"
    assert b["raw"][:2] == [b"first", b"second"] and peak < 300 * MiB
    # exactly at the cap is not over it; one more line is
    assert read_documents(b"a\nb\n", "x.txt", "auto", "line", "text", max_docs=2)["reason"] == [
        None,
        None,
    ]
    assert read_documents(b"a\nb\nc", "x.txt", "auto", "line", "text", max_docs=2)["reason"] == [
        None,
        None,
        "file_too_large",
    ]
    j = b'{"text": "a"}\n' * 5
    assert scan(j, "j.jsonl", max_docs=3)["reason"] == [None, None, None, "file_too_large"]
    # Parquet: two million rows of one dictionary value are a few KB on disk
    col = pa.DictionaryArray.from_arrays(pa.array(np.zeros(2_000_000, np.int32)), pa.array(["z"]))
    head = pa.table({"text": pa.array(["ok one", "ok two"]).dictionary_encode()})
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, head.schema) as w:
        w.write_table(head)
        w.write_table(pa.table({"text": col}), row_group_size=2_000_000)
    assert len(buf.getvalue()) < 100_000
    b = read_documents(buf.getvalue(), "r.parquet", "auto", "file", "text", max_docs=1000)
    assert b["reason"] == [None, None, "file_too_large"] and b["text"][:2] == ["ok one", "ok two"]


def test_document_cap_drops_one_document_before_decoding() -> None:
    data = b"short one\n" + b"y" * 5000 + b"\nshort two\n"
    b = scan(data, "l.txt", max_doc_bytes=1000)
    assert b["reason"] == [None, "doc_too_large", None]
    assert scan(data, "f.txt", unit="file", max_doc_bytes=1000)["reason"] == ["doc_too_large"]
    j = b'{"text": "ok"}\n{"text": "' + b"z" * 5000 + b'"}\n'
    assert scan(j, "j.jsonl", max_doc_bytes=1000)["reason"] == [None, "doc_too_large"]
    p = parquet_bytes(["ok", "w" * 5000, "fine"], 2)
    assert scan(p, "p.parquet", max_doc_bytes=1000)["reason"] == [None, "doc_too_large", None]


def test_truncated_and_garbage_streams() -> None:
    body = b"".join(b"line %d here\n" % i for i in range(30_000))  # several zstd blocks
    z = zstandard.ZstdCompressor().compress(body)
    cut = z[: len(z) * 2 // 3]
    decoded = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(cut)).read()
    b = scan(cut, "c.txt.zst")
    kept = [b["text"][i] for i in alive(b)]
    assert b["reason"][-1] == "truncated" and kept == [f"line {i} here" for i in range(len(kept))]
    assert len(kept) == decoded.count(b"\n") > 100
    assert scan(b"not gzip at all", "g.txt.gz")["reason"] == ["read_error"]
    assert scan(b"not zstd at all", "g.txt.zst")["reason"] == ["read_error"]
    assert scan(gzip.compress(b"a\n") + b"\x00" * 20, "t.txt.gz")["reason"] == [None, "truncated"]


def test_corrupt_parquet_loses_only_its_broken_row_group() -> None:
    texts = [f"row {i} text" for i in range(9)]
    b = scan(parquet_bytes(texts, 3, corrupt_group=1), "p.parquet")
    assert b["reason"] == [None] * 3 + ["read_error"] + [None] * 3
    assert [b["text"][i] for i in alive(b)] == texts[:3] + texts[6:]
    assert scan(b"PAR1" + b"\x07" * 100 + b"PAR1", "g.parquet")["reason"] == ["read_error"]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [1, 2]}), buf)
    assert scan(buf.getvalue(), "i.parquet")["reason"] == ["wrong_type"]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": pa.array(["a b", "c d", "a b"]).dictionary_encode()}), buf)
    assert scan(buf.getvalue(), "d.parquet")["reason"] == [None, None, None]
    gz = gzip.compress(parquet_bytes(texts, 3), mtime=0)
    assert scan(gz, "p.parquet.gz")["reason"] == [None] * 9
    assert scan(gz[:-30], "p.parquet.gz")["reason"] == ["truncated"]


def test_python_prose_hostile_sources() -> None:
    def reasons(src: bytes) -> list:
        return scan(src, "m.py", "python_prose", "file")["reason"]

    assert reasons(b'"""bad \\udc80 docstring"""\n') == ["invalid_unicode"]
    assert reasons(b"x = " + b"-" * 200_000 + b"1\n") == ["parse_error"]
    assert reasons(b"x = " + b"(" * 300 + b")" * 300 + b"\n") == ["parse_error"]
    assert reasons(b'"""doc"""\nx = "\x00"\n') == ["parse_error"]
    assert reasons(b'"""A fine docstring."""\n') == [None]


def test_storage_failure_is_input_unreadable_not_a_drop() -> None:
    class Failing(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            if self.tell() > 100:
                raise ConnectionResetError("peer went away")
            return super().read(min(n, 64) if n and n > 0 else 64)

    text = b"".join(b"line %d\n" % i for i in range(500))
    for name, data in (
        ("x.txt", text),
        ("x.txt.gz", gzip.compress(text * 50, mtime=0)),
        ("x.parquet", parquet_bytes([f"d{i}" for i in range(500)], 50)),
    ):
        with pytest.raises(InputUnreadable, match="ConnectionResetError"):
            read_documents(Failing(data), name, "auto", "line", "text")


class _Panic(BaseException):
    """Like pyo3's PanicException: not an Exception subclass."""


class _FussyTokenizer:
    def __init__(self, tok) -> None:
        self.tok = tok

    def encode_batch_fast(self, texts, add_special_tokens=False):
        if any("boom" in t for t in texts):
            raise _Panic("tokenizer panicked")
        return self.tok.encode_batch_fast(texts, add_special_tokens=add_special_tokens)


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer

    from pipeline.tokenizer import train_bpe

    return Tokenizer.from_str(train_bpe(["hello world boom x"] * 30, 280, 2, "<|eod|>"))


def test_tokenise_failure_drops_only_its_document(tok) -> None:
    texts = ["hello", "a boom here", "world", "x"]
    b = {"index": list(range(4)), "reason": [None] * 4, "text": list(texts)}
    t = Tokenise(_FussyTokenizer(tok), batch_docs=3)
    t(b)
    assert b["reason"] == [None, "tokenise_error", None, None]
    for i in (0, 2, 3):
        assert tok.decode(b["ids"][i].tolist()) == texts[i]
    assert t.counters["dropped.tokenise_error"] == 1 and t.counters["out"] == 3
    e = Encode(np.arange(10), np.uint8)
    b2 = {"index": [0, 1], "reason": [None, None], "ids": [np.array([1, 2]), np.array([3, 99])]}
    e(b2)
    assert b2["reason"] == [None, "encode_error"] and b2["codes"][0].tolist() == [1, 2]


def test_surrogates_never_pass_normalise_and_rejects_keep_them() -> None:
    from pipeline.units import _reject_line

    b = {"index": [0, 1], "reason": [None, None], "text": ["ok é", "x\udfff"]}
    Normalise()(b)
    assert b["reason"] == [None, "invalid_unicode"]
    line = _reject_line({"reason": "invalid_unicode", "text": "x\udfff"})
    assert json.loads(line.decode("utf-8"))["text"] == "x\udfff"


# ---- the driver, in process ------------------------------------------------------------------
@pytest.fixture
def local_driver(monkeypatch: pytest.MonkeyPatch):
    """Runs the driver without Ray: unit specs go through ``run_spec`` in this process (so that a
    test can change the inputs between the passes: ``hooks["scan"|"encode"]``)."""
    from pipeline import driver, units

    hooks: dict = {}

    def local_map(cfg, specs, desc, on_result=None):
        if desc in hooks:
            hooks.pop(desc)()
        out = []
        for s in specs:
            r = json.loads(units.run_spec(json.dumps(s)))
            out.append(r)
            if on_result is not None:
                on_result(r)
        return out

    monkeypatch.setattr(driver, "_ray_map", local_map)
    monkeypatch.setattr(driver, "_ensure_ray", lambda cfg: False)
    return hooks


def _run(make_config, inputs, out: Path, **over):
    from pipeline.driver import run_preprocess

    over.setdefault("tokenizer", {"vocab_size": 280, "sample_bytes": 5000})
    over.setdefault("unit_bytes", 1)  # a unit per file
    return run_preprocess(make_config(inputs, str(out), **over))


def _decoded(out: Path) -> list[str]:
    return sorted(decode_dataset(str(out), "train") + decode_dataset(str(out), "val"))


def test_unreadable_file_is_skipped_and_retried_by_the_next_run(
    local_driver, make_config, pp, tmp_path: Path
) -> None:
    root = tmp_path / "c"
    docs = {f"{k}.txt": f"document {k} with a few words in it" for k in "abc"}
    for name, text in docs.items():
        pp.write(root / name, text.encode())
    gone = (root / "b.txt").read_bytes()
    local_driver["scan"] = lambda: (root / "b.txt").unlink()  # listed, then it vanished
    out = tmp_path / "ds"
    s = _run(make_config, [{"path": str(root)}], out)
    assert list(s["files_skipped"]) == [str(root / "b.txt")]
    assert s["files_skipped"][str(root / "b.txt")].startswith("unreadable")
    m = json.loads((out / "manifest.json").read_text())
    assert [Path(r["path"]).name for r in m["inputs"]] == ["a.txt", "c.txt"]
    assert m["runs"][-1]["skipped"] == s["files_skipped"]
    assert _decoded(out) == [docs["a.txt"], docs["c.txt"]]
    assert verify(str(out), sample_units=10)["ok"]
    pp.write(root / "b.txt", gone)  # it is back: the next run takes it
    s2 = _run(make_config, [{"path": str(root)}], out)
    assert s2["files_new"] == 1 and s2["files_skipped"] == {}
    assert _decoded(out) == sorted(docs.values())
    assert verify(str(out), sample_units=10)["ok"]


def test_file_lost_after_its_only_read_is_kept_whole(
    local_driver, make_config, pp, tmp_path: Path
) -> None:
    """Each input is read once (the scan): a.txt, which holds the first copy of a document b.txt
    repeats, vanishes after the scan and before the encode pass. The encode pass works from the
    staged tokens, so a.txt is kept whole, b.txt's copy stays a duplicate, and the dataset is the
    one an undisturbed run writes."""
    root = tmp_path / "c"
    shared, only_a, only_b = "the shared document text", "only in file a", "only in file b"
    pp.write(root / "a.txt", f"{shared}\n{only_a}\n".encode())
    pp.write(root / "b.txt", f"{only_b}\n{shared}\n".encode())
    inputs = [{"path": str(root), "text_unit": "line"}]
    ref = tmp_path / "ref"
    _run(make_config, inputs, ref, val_fraction=0.0)
    local_driver["encode"] = lambda: (root / "a.txt").unlink()
    out = tmp_path / "ds"
    s = _run(make_config, inputs, out, val_fraction=0.0)
    assert s["files_skipped"] == {} and not (root / "a.txt").exists()
    m = json.loads((out / "manifest.json").read_text())
    a, b = m["inputs"]
    assert a["path"].endswith("a.txt") and a["kept"] == 2
    assert b["path"].endswith("b.txt") and b["kept"] == 1 and b["duplicates"] == 1
    assert _decoded(out) == sorted([shared, only_a, only_b])
    shards = lambda d: {p.name: p.read_bytes() for p in (d / "shards").rglob("*.parquet")}
    assert shards(out) == shards(ref)


def test_tokenizer_sample_reads_a_large_file_only_as_far_as_it_needs(
    make_config, pp, tmp_path: Path
) -> None:
    """An 80 MB (decompressed) line file and a 5 kB sample: the sample read stops near 1 MiB
    (peak memory; the whole file would take > 80 MB), and takes the file's first documents."""
    from pipeline.driver import _sample_texts
    from pipeline.storage import Storage

    line = "line {} of a large file with some words"
    lines = "".join(line.format(i) + "\n" for i in range(2_000_000)).encode()
    pp.write(tmp_path / "big.txt.gz", lines)
    del lines
    cfg = make_config([{"path": str(tmp_path)}], str(tmp_path / "ds"))
    cfg.tokenizer.sample_bytes = 5000
    f = {"path": str(tmp_path / "big.txt.gz"), "format": "text", "text_unit": "line"}
    f["text_field"] = "text"
    tracemalloc.start()
    sample = _sample_texts(Storage(), cfg, [f])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 32 << 20, peak
    assert sum(map(len, sample)) >= 5000 > sum(map(len, sample[:-1]))
    assert sample == [line.format(i) for i in range(len(sample))]


def test_late_drop_in_the_encode_pass_is_counted_and_verified(
    local_driver, make_config, pp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "c"
    pp.write(root / "l.txt", b"a good line\nthis one goes boom\nanother good line\n")
    real = Tokenise._encode

    def fussy(self, texts):
        if any("boom" in t for t in texts):
            raise _Panic("tokenizer panicked")
        return real(self, texts)

    monkeypatch.setattr(Tokenise, "_encode", fussy)
    out = tmp_path / "ds"
    s = _run(make_config, [{"path": str(root), "text_unit": "line"}], out)
    m = json.loads((out / "manifest.json").read_text())
    (rec,) = m["inputs"]
    assert rec["kept"] == 2 and rec["dropped"] == {"tokenise_error": 1}
    assert rec["late_drops"] == {"tokenise_error": [1]}
    assert s["dropped"] == {"tokenise_error": 1} == m["counts"]["dropped"]
    assert _decoded(out) == ["a good line", "another good line"]
    assert verify(str(out), sample_units=10)["ok"]


def test_bad_names_broken_links_and_fifos_do_not_stop_a_run(
    local_driver, make_config, pp, tmp_path: Path
) -> None:
    root = tmp_path / "c"
    pp.write(root / "ok.txt", b"a perfectly good document")
    bad = os.fsdecode(os.fsencode(str(root)) + b"/bad\xffname.txt")
    with open(os.fsencode(bad), "wb") as f:
        f.write(b"good text behind a bad name")
    os.symlink(tmp_path / "nowhere", root / "dangling.txt")
    os.mkfifo(root / "pipe.txt")  # would block a reader forever
    out = tmp_path / "ds"
    s = _run(make_config, [{"path": str(root)}], out)
    assert set(s["files_skipped"]) == {bad, str(root / "dangling.txt")}
    assert s["files_skipped"][bad].startswith("bad_name")
    m = json.loads((out / "manifest.json").read_text())
    assert [Path(r["path"]).name for r in m["inputs"]] == ["ok.txt"]
    assert _decoded(out) == ["a perfectly good document"]
    json.dumps(s)  # the summary stays printable


# ---- end to end through jobs/preprocess.py on a local Ray ------------------------------------
def build_hostile_corpus(root: Path, pp) -> tuple[list[str], dict[str, dict], dict[str, str]]:
    """(good documents, {file name: expected {kept, dropped}}, {skipped name: reason prefix})."""
    rng = random.Random(12)
    g = [pp.make_doc(rng, 12) + f" #{i}" for i in range(16)]
    good: list[str] = []
    exp: dict[str, dict] = {}

    def expect(name: str, kept: list[str], **dropped: int) -> None:
        good.extend(kept)
        exp[name] = {"kept": len(kept), "dropped": dropped}

    emoji = "an emoji \U0001f600 from a surrogate pair"
    lines = [json.dumps({"text": g[0]}).encode()]
    lines += [_b(line) for line, _ in JSON_CASES]
    lines += [json.dumps({"text": g[1]}).encode(), json.dumps({"text": emoji}).encode()]
    pp.write(root / "json/a.jsonl", b"\n".join(lines) + b"\n")
    counts: dict[str, int] = {}
    for _, r in JSON_CASES:
        counts[r] = counts.get(r, 0) + 1
    expect("a.jsonl", [g[0], g[1], emoji], **counts)

    (root / "lines").mkdir(parents=True)
    (root / "lines/bomb.txt.gz").write_bytes(gzip_bomb(f"{g[2]}\n{g[3]}\n".encode(), 256 * MiB))
    expect("bomb.txt.gz", [g[2], g[3]], file_too_large=1)
    body = "".join(f"{g[4]} line {i}\n" for i in range(5000)).encode()  # several zstd blocks
    z = zstandard.ZstdCompressor().compress(body)
    cut = z[: len(z) * 2 // 3]
    (root / "lines/cut.txt.zst").write_bytes(cut)
    n_cut = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(cut)).read().count(b"\n")
    assert n_cut > 100
    expect("cut.txt.zst", [f"{g[4]} line {i}" for i in range(n_cut)], truncated=1)
    pp.write(
        root / "lines/latin1.txt",
        f"{g[5]}\n".encode() + b"caf\xe9 cr\xe8me\n" + f"{g[6]}\n".encode(),
    )
    expect("latin1.txt", [g[5], g[6]], invalid_utf8=1)
    pp.write(
        root / "lines/long.txt", f"{g[7]}\n".encode() + b"y" * 300_000 + f"\n{g[8]}\n".encode()
    )
    expect("long.txt", [g[7], g[8]], doc_too_large=1)

    files = root / "files"
    pp.write(files / "junk.bin", random.Random(0).randbytes(4096))
    expect("junk.bin", [], binary=1)
    (files / "junk.txt.gz").write_bytes(random.Random(1).randbytes(4096))  # not gzip inside
    expect("junk.txt.gz", [], read_error=1)
    pp.write(files / "latin1.txt", "Grüße aus Köln, ça va très bien".encode("latin-1"))
    expect("latin1.txt_file", [], invalid_utf8=1)
    (files / "bomb.txt.zst").write_bytes(zstd_bomb(b"looks like text ", 1024 * MiB))
    expect("bomb.txt.zst", [], file_too_large=1)
    pp.write(files / "ok.txt", g[9].encode())
    expect("ok.txt", [g[9]])
    with open(os.fsencode(str(files)) + b"/bad\xffname.txt", "wb") as f:
        f.write(g[15].encode())  # good text, but a name that is not UTF-8: skipped, not dropped
    os.symlink(root / "nowhere", files / "dangling.txt")
    skipped = {"bad\udcffname.txt": "bad_name", "dangling.txt": "unreadable"}

    pq_dir = root / "pq"
    pq_dir.mkdir()
    texts = [g[10], g[11], "lost one", "lost two", g[12], g[13]]
    (pq_dir / "corrupt.parquet").write_bytes(parquet_bytes(texts, 2, corrupt_group=1))
    expect("corrupt.parquet", [g[10], g[11], g[12], g[13]], read_error=1)
    (pq_dir / "garbage.parquet").write_bytes(b"PAR1" + random.Random(2).randbytes(500) + b"PAR1")
    expect("garbage.parquet", [], read_error=1)
    pq.write_table(pa.table({"text": [1, 2, 3]}), pq_dir / "wrongtype.parquet")
    expect("wrongtype.parquet", [], wrong_type=1)

    prose = root / "prose"
    pp.write(prose / "good.py", f'"""{g[14]}"""\nx = 1\n'.encode())
    expect("good.py", [g[14]])
    pp.write(prose / "surrogate.py", b'"""a docstring with \\ud800 in it"""\n')
    expect("surrogate.py", [], invalid_unicode=1)
    pp.write(prose / "deep.py", b"x = " + b"-" * 200_000 + b"1\n")
    expect("deep.py", [], parse_error=1)
    return [nfc(t) for t in good], exp, skipped


@pytest.mark.ray
@pytest.mark.slow
def test_hostile_corpus_end_to_end(ray_local, pp, tmp_path: Path) -> None:
    root = tmp_path / "hostile"
    good, exp, skipped = build_hostile_corpus(root, pp)
    assert len(set(good)) == len(good)
    out = tmp_path / "ds"
    recipe = pp.recipe(
        [
            {"path": str(root / "json")},
            {"path": str(root / "lines"), "text_unit": "line"},
            {"path": str(root / "files"), "text_unit": "file"},
            {"path": str(root / "pq")},
            {"path": str(root / "prose"), "format": "python_prose"},
        ],
        str(out),
        limits={"max_file_bytes": MiB, "max_doc_bytes": 250_000},
        tokenizer={"vocab_size": 300, "sample_bytes": 20_000},
        unit_bytes=50_000,
        progress=True,
    )
    y = tmp_path / "hostile.yaml"
    y.write_text(yaml.safe_dump(recipe))
    address = ray_local.get_runtime_context().gcs_address
    cmd = [
        sys.executable,
        "jobs/preprocess.py",
        "--config",
        str(y),
        "--set",
        f"ray.address={address}",
    ]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    print(f"hostile run: {time.perf_counter() - t0:.1f}s")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Traceback" not in r.stderr, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])

    m = json.loads((out / "manifest.json").read_text())
    by_name = {}
    for rec in m["inputs"]:
        name = Path(rec["path"]).name
        by_name[name + ("_file" if name == "latin1.txt" and "/files/" in rec["path"] else "")] = rec
    assert set(by_name) == set(exp)
    for name, want in exp.items():
        got = by_name[name]
        assert (got["kept"], got["dropped"]) == (want["kept"], want["dropped"]), name
        assert got["docs"] == got["kept"] + got["duplicates"] + sum(got["dropped"].values())
    total: dict[str, int] = {}
    for want in exp.values():
        for k, v in want["dropped"].items():
            total[k] = total.get(k, 0) + v
    assert m["counts"]["dropped"] == dict(sorted(total.items())) == summary["dropped"]
    assert m["runs"][-1]["dropped"] == summary["dropped"]
    assert {Path(p).name: w.split(":")[0] for p, w in summary["files_skipped"].items()} == skipped
    assert {Path(p).name for p in m["runs"][-1]["skipped"]} == set(skipped)
    for reason in total:  # the end-of-run table names every reason
        assert reason in r.stderr.split("dropped this run:")[1].splitlines()[0]

    # every good document is in the dataset, and nothing else
    assert sorted(decode_dataset(str(out), "train") + decode_dataset(str(out), "val")) == sorted(
        good
    )
    assert m["counts"]["kept"] == len(good) and m["runs"][-1]["limits"]["max_file_bytes"] == MiB
    rejects = [
        json.loads(x)
        for p in sorted((out / "rejects").glob("*.jsonl.gz"))
        for x in gzip.decompress(p.read_bytes()).splitlines()
    ]
    assert sorted(x["reason"] for x in rejects) == sorted(
        k for k, v in total.items() for _ in range(v)
    )
    assert any(x["reason"] == "invalid_unicode" and "\ud800" in x["text"] for x in rejects)
    report = verify(str(out), sample_units=100)
    assert report["ok"], report["errors"]

    # a rerun has nothing new to do (the skipped files are reported again) and exits 0
    r2 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and "Traceback" not in r2.stderr, r2.stderr[-3000:]
    assert json.loads(r2.stdout.strip().splitlines()[-1])["work_done"] is False


def test_frequency_table_counted_by_the_scan_is_the_drivers_own(
    local_driver, corpus, make_config, tmp_path: Path
) -> None:
    """A first run's frequency code table is counted by the scan tasks from the documents the
    driver picked for the sample (the first documents of line, JSON and Parquet files, cut at
    sample_bytes): it equals the table the driver makes by tokenising those texts itself."""
    from tokenizers import Tokenizer

    from pipeline.driver import _file_spec, _list_inputs, _sample_texts
    from pipeline.storage import Storage
    from pipeline.tokenizer import build_code_table, eod_id_of

    for sample_bytes in (700, 5000, 10**9):  # a few files; more; every document
        out = tmp_path / f"ds{sample_bytes}"
        over = {"tokenizer": {"vocab_size": 300, "sample_bytes": sample_bytes}}
        _run(make_config, corpus.inputs(), out, **over)
        cfg = make_config(corpus.inputs(), str(out), unit_bytes=1, **over)
        files = [_file_spec(f, s) for f, s in _list_inputs(Storage(), cfg)]
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        sample = _sample_texts(Storage(), cfg, files)
        table = build_code_table("frequency", tok, sample, eod_id_of(tok, "<|eod|>"))
        assert (out / "code_table.json").read_text() == table.to_json()
