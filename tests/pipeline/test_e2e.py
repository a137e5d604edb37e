"""End-to-end runs on a real local Ray: all formats, bad input, idempotence, incremental runs and
dedup across files and runs (issue 3, points 1, 2, 3 and 5)."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import pytest

from pipeline import decode_dataset, run_preprocess, verify

pytestmark = pytest.mark.ray


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def check_decodes(out: Path, expected: list[str], val_fraction: float, pp) -> None:
    want = pp.split_docs(expected, val_fraction)
    for split in ("train", "val"):
        assert decode_dataset(str(out), split) == want[split], split


def test_end_to_end_all_formats(ray_local, corpus, make_config, pp, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    cfg = make_config(corpus.inputs(), str(out))
    s = run_preprocess(cfg)
    assert s["work_done"] and s["files_new"] == 8 and s["units"] >= 3
    m = manifest(out)
    assert m["format_version"] == 1 and m["seq_len"] == 32 and m["block_size"] == 4
    assert m["vocab_size"] == 300 and m["num_bits"] == 9 and m["codeword_dtype"] == "uint16"
    assert {s["split"] for s in m["shards"]} == {"train", "val"}
    assert all(s["tokens"] == s["rows"] * 32 for s in m["shards"])
    assert [r["path"] for r in m["inputs"]] == sorted(corpus.docs)
    assert all(isinstance(r["mtime"], float) and r["size"] > 0 for r in m["inputs"])
    assert m["counts"]["kept"] == len(corpus.expected()) and m["counts"]["dropped"] == {}
    for name in ("tokenizer.json", "code_table.json"):
        assert (out / name).is_file()
    assert not (out / "_work").exists()
    report = verify(str(out), sample_units=100)
    assert report["ok"], report["errors"]
    assert len(report["sample_units"]) == s["units"]
    check_decodes(out, corpus.expected(), 0.2, pp)
    assert all(r["unit"] for r in m["inputs"])
    # verify catches a damaged shard
    shard = out / m["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = verify(str(out))
    assert not bad["ok"] and "checksum" in bad["errors"][0]


def test_bad_input_is_counted_not_fatal(ray_local, make_config, pp, tmp_path: Path) -> None:
    root = tmp_path / "bad"
    rng = random.Random(1)
    good = [pp.make_doc(rng, 12) for _ in range(12)]
    (root / "lines").mkdir(parents=True)
    (root / "files").mkdir()
    (root / "json").mkdir()
    # invalid UTF-8 in the middle of good lines
    pp.write(
        root / "lines/utf8.txt",
        f"{good[0]}\n".encode() + b"caf\xe9 \xff\n" + f"{good[1]}\n".encode(),
    )
    # truncated gzip: complete lines kept, the cut one counted
    import gzip

    body = "".join(f"{good[2]} {i}\n" for i in range(300)).encode()
    gz = gzip.compress(body, mtime=0)
    (root / "lines/cut.txt.gz").write_bytes(gz[: len(gz) * 2 // 3])
    # a single 20 MB line between good lines
    (root / "lines/huge.txt").write_bytes(
        f"{good[3]}\n".encode() + b"x" * (20 << 20) + f"\n{good[4]}\n".encode()
    )
    pp.write(root / "lines/empty.txt", b"")
    pp.write(root / "files/blob.bin", bytes(range(256)) * 64)
    pp.write(root / "files/ok.txt", good[5].encode())
    lines = [
        json.dumps({"text": good[6]}),
        "{broken json",
        json.dumps({"body": "no text"}),
        json.dumps({"text": good[7]}),
    ]
    pp.write(root / "json/mixed.jsonl", ("\n".join(lines) + "\n").encode())
    inputs = [
        {"path": str(root / "lines"), "text_unit": "line"},
        {"path": str(root / "files"), "text_unit": "file"},
        {"path": str(root / "json"), "format": "jsonl"},
    ]
    out = tmp_path / "ds"
    cfg = make_config(
        inputs,
        str(out),
        filters={"max_chars": 100_000},
        tokenizer={"vocab_size": 280, "sample_bytes": 5000},
    )
    run_preprocess(cfg)
    m = manifest(out)
    by_name = {Path(r["path"]).name: r for r in m["inputs"]}
    assert by_name["utf8.txt"]["dropped"] == {"invalid_utf8": 1}
    assert by_name["utf8.txt"]["kept"] == 2
    assert by_name["cut.txt.gz"]["dropped"] == {"truncated": 1}
    assert by_name["cut.txt.gz"]["kept"] >= 100
    assert by_name["huge.txt"]["dropped"] == {"too_long": 1} and by_name["huge.txt"]["kept"] == 2
    assert by_name["empty.txt"]["dropped"] == {"empty": 1}
    assert by_name["blob.bin"]["dropped"] == {"binary": 1}
    assert by_name["mixed.jsonl"]["dropped"] == {"malformed_json": 1, "missing_field": 1}
    assert by_name["mixed.jsonl"]["kept"] == 2
    assert m["counts"]["dropped"] == {
        "binary": 1,
        "empty": 1,
        "invalid_utf8": 1,
        "malformed_json": 1,
        "missing_field": 1,
        "too_long": 1,
        "truncated": 1,
    }
    decoded = decode_dataset(str(out), "train") + decode_dataset(str(out), "val")
    for g in (good[0], good[1], good[3], good[4], good[5], good[6], good[7], f"{good[2]} 0"):
        assert unicodedata.normalize("NFC", g) in decoded
    rejects = sorted((out / "rejects").glob("*.jsonl.gz"))
    reasons = [
        json.loads(x)["reason"]
        for p in rejects
        for x in gzip.decompress(p.read_bytes()).splitlines()
    ]
    assert sorted(reasons) == sorted(m["counts"]["dropped"])
    assert verify(str(out), sample_units=100)["ok"]


def test_idempotent_incremental_and_dedup_across_runs(
    ray_local, corpus, make_config, pp, tmp_path: Path
) -> None:
    # duplicates across files in one run
    first = corpus.docs[str(corpus.root / "lines/l1.txt")]
    corpus.add_docs("json/j3.jsonl", "jsonl", [first[3], first[7], "unique j3 text"])
    out = tmp_path / "ds"
    cfg = make_config(corpus.inputs(), str(out))
    run_preprocess(cfg)
    m1 = manifest(out)
    body1 = (out / "manifest.json").read_bytes()
    j3 = next(r for r in m1["inputs"] if r["path"].endswith("j3.jsonl"))
    # j3 sorts before lines/l1.txt: its copies are the first occurrences, l1's are dropped
    assert j3["duplicates"] == 0
    l1 = next(r for r in m1["inputs"] if r["path"].endswith("l1.txt"))
    assert l1["duplicates"] == 2 and m1["counts"]["duplicates"] == 2
    stat1 = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    # a second run over the same inputs does no work and touches nothing
    s2 = run_preprocess(cfg)
    assert s2["work_done"] is False and "nothing to do" in s2["message"]
    assert (out / "manifest.json").read_bytes() == body1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stat1

    exp1 = corpus.expected()
    # one new file: only it is processed; it repeats a document of run 1 (dedup across runs)
    corpus.add_docs("files/z_new.txt", "file", [first[10]])
    corpus.add_docs("files/a0_new.txt", "file", ["brand new document, never seen"])
    s3 = run_preprocess(cfg)
    assert s3["files_new"] == 2 and s3["files_already_done"] == 9
    m3 = manifest(out)
    assert m3["tokenizer_hash"] == m1["tokenizer_hash"]
    assert m3["code_table_hash"] == m1["code_table_hash"]
    assert m3["shards"][: len(m1["shards"])] == [dict(s) for s in m1["shards"]]
    new_inputs = m3["inputs"][len(m1["inputs"]) :]
    assert [Path(r["path"]).name for r in new_inputs] == ["a0_new.txt", "z_new.txt"]
    assert new_inputs[1]["duplicates"] == 1 and new_inputs[0]["kept"] == 1
    assert m3["counts"]["duplicates"] == 3 and len(m3["runs"]) == 2
    # old shards untouched
    for p, t in stat1.items():
        if "shards" in str(p):
            assert p.stat().st_mtime_ns == t
    report = verify(str(out), sample_units=100)
    assert report["ok"], report["errors"]
    decoded = decode_dataset(str(out), "train") + decode_dataset(str(out), "val")
    nfc = lambda t: unicodedata.normalize("NFC", t)
    assert decoded.count(nfc(first[10])) == 1 and decoded.count(nfc(first[3])) == 1
    assert "brand new document, never seen" in decoded
    # decoded order: run 1 documents in sorted-path order, then run 2's new ones
    want = pp.split_docs([*exp1, "brand new document, never seen"], 0.2)
    assert decode_dataset(str(out), "train") == want["train"]
    assert decode_dataset(str(out), "val") == want["val"]


def test_incompatible_recipe_is_refused(ray_local, corpus, make_config, tmp_path: Path) -> None:
    from pipeline.driver import PreprocessError

    out = tmp_path / "ds"
    run_preprocess(make_config(corpus.inputs(), str(out)))
    corpus.add_docs("files/new.txt", "file", ["another document here"])
    with pytest.raises(PreprocessError, match="seq_len"):
        run_preprocess(make_config(corpus.inputs(), str(out), seq_len=64))


def test_both_executors_write_the_same_dataset(
    ray_local, corpus, make_config, pp, tmp_path: Path
) -> None:
    """ray.executor tasks (plain Ray tasks, the default) and data (a Ray Data map) run the same
    units: byte-identical datasets."""
    trees = []
    for executor in ("data", "tasks"):
        out = tmp_path / executor
        run_preprocess(make_config(corpus.inputs(), str(out), ray={"executor": executor}))
        trees.append(pp.tree_bytes(out))
    assert trees[0] == trees[1] and len(trees[0]) > 3
