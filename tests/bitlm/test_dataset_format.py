"""The dataset format module: the manifest schema round-trips what the preprocessing writer
committed before this module existed, hand-written manifests read with their defaults, a
malformed manifest or code table is an error naming the file and the key, and the module loads
without torch (preprocessing's Ray workers import it)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bitlm.codec import BitCodec, CodeTable
from bitlm.dataset_format import (
    DataError,
    Manifest,
    Shard,
    code_of_id,
    codeword_dtype,
    shard_path,
)

ROOT = Path(__file__).resolve().parents[2]
# Written by pipeline/driver.py before bitlm/dataset_format.py existed (the tests' corpus with
# near_dedup on, two runs; the second run's two lines were both duplicates).
GOLDEN = Path(__file__).parent / "fixtures" / "manifest-near-2runs.json"


def minimal() -> dict:
    """A manifest as another tool (tests/train/helpers.py) writes it: only the keys training
    needs, no run numbers, no preprocessing records."""
    return {
        "format_version": 1,
        "seq_len": 16,
        "block_size": 4,
        "vocab_size": 40,
        "num_bits": 6,
        "codeword_dtype": "uint8",
        "eod_id": 0,
        "tokenizer_hash": "t" * 64,
        "code_table_hash": "c" * 64,
        "shards": [
            {"path": "shards/train/part-00000.parquet", "split": "train", "rows": 5},
            {"path": "shards/val/part-00000.parquet", "split": "val", "rows": 2, "sha256": "ab"},
        ],
    }


def test_a_manifest_the_writer_committed_before_round_trips_byte_for_byte():
    body = GOLDEN.read_bytes()
    m = Manifest.from_json(body, str(GOLDEN))
    assert m.to_json() == body
    assert m.version == 2 and [r.run for r in m.runs] == [1, 2]
    assert m.splits == ("train", "val")
    assert sum(s.rows for s in m.split("train")) == m.counts["rows"]["train"] > 0
    assert all(s.extra == {} for s in m.shards) and m.extra == {}  # every key is typed
    assert m.near_dedup["scheme"] and m.runs[1].dedup["parts"] == 1
    assert all(s.path == shard_path(s.split, s.unit) for s in m.shards)
    rec = m.inputs[0]
    assert (rec.format, rec.text_unit, rec.run) == ("auto", "file", 1)
    assert isinstance(rec.mtime, float) and rec.late_drops is None


def test_a_hand_written_manifest_reads_with_the_defaults_and_keeps_unknown_keys():
    d = minimal()
    d["made_by"] = "another tool"
    d["shards"][0]["checksum_kind"] = "none"
    m = Manifest.from_dict(d, "m.json")
    train, val = m.shards
    assert (train.sha256, train.run, train.tokens, train.inputs) == ("", 1, None, ())
    assert val.sha256 == "ab" and m.version == 1 and m.eod_code is None and m.runs == ()
    assert m.extra == {"made_by": "another tool"}
    assert train.extra == {"checksum_kind": "none"}
    out = m.to_dict()
    # written back: the same keys and the defaults made explicit (sha256 "", run 1), no more
    assert out["made_by"] == "another tool" and out["shards"][0]["checksum_kind"] == "none"
    assert out["shards"][0]["sha256"] == "" and [s["run"] for s in out["shards"]] == [1, 1]
    assert set(out) == set(d) and set(out["shards"][1]) == {*d["shards"][1], "run"}
    assert Manifest.from_dict(out, "m.json") == m


def test_versions_cut_the_shards_and_the_fingerprint_follows():
    d = minimal()
    d["shards"].append({"path": "shards/train/b.parquet", "split": "train", "rows": 3, "run": 2})
    m = Manifest.from_dict(d, "m.json")
    assert m.version == 2
    v1 = m.at_version(1)
    assert v1.version == 1 and [s.rows for s in v1.split("train")] == [5]
    assert v1.fingerprint("train") != m.fingerprint("train")
    assert m.version_of("train", v1.fingerprint("train")) == 1
    assert m.version_of("train", "0" * 64) is None
    with pytest.raises(DataError, match=r"no dataset version 3 \(versions 1\.\.2\)"):
        m.at_version(3)


def _drop(d: dict, *path: str | int) -> None:
    for k in path[:-1]:
        d = d[k]
    del d[path[-1]]


def _set(value: object):
    def change(d: dict, *path: str | int) -> None:
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    return change


MALFORMED = [
    (_drop, ("seq_len",), r"missing key 'seq_len'"),
    (_drop, ("shards", 1, "path"), r"missing key 'shards\[1\]\.path'"),
    (_set("12"), ("shards", 0, "rows"), r"key 'shards\[0\]\.rows': expected an integer, got '12'"),
    (_set(True), ("vocab_size",), r"key 'vocab_size': expected an integer, got True"),
    (_set(None), ("tokenizer_hash",), r"key 'tokenizer_hash': expected a string, got None"),
    (_set({}), ("shards",), r"key 'shards': expected a list, got \{\}"),
    (_set([7]), ("shards",), r"key 'shards\[0\]': expected an object, got 7"),
    (_set([{"run": "2"}]), ("runs",), r"key 'runs\[0\]\.run': expected an integer"),
    (_set("x"), ("shards", 0, "inputs"), r"key 'shards\[0\]\.inputs': expected a list, got 'x'"),
    (_set(["a", 3]), ("shards", 0, "inputs"), r"key 'shards\[0\]\.inputs\[1\]': expected a str"),
    (_set(1.5), ("shards", 0, "run"), r"key 'shards\[0\]\.run': expected an integer, got 1\.5"),
    (_set(None), ("shards", 0, "sha256"), r"key 'shards\[0\]\.sha256': expected a string"),
]


@pytest.mark.parametrize(("change", "path", "message"), MALFORMED)
def test_a_malformed_manifest_names_the_file_and_the_key(tmp_path, change, path, message):
    d = copy.deepcopy(minimal())
    change(d, *path)
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match=f"^{tmp_path}/manifest.json: {message}"):
        Manifest.load(str(tmp_path))


def test_a_record_of_the_golden_manifest_with_a_bad_key_is_named(tmp_path):
    d = json.loads(GOLDEN.read_text())
    d["inputs"][3]["dropped"] = ["too_short"]
    with pytest.raises(DataError, match=r"key 'inputs\[3\]\.dropped': expected an object"):
        Manifest.from_dict(d, "golden")
    d = json.loads(GOLDEN.read_text())
    del d["inputs"][0]["unit"]  # required (the writer always wrote it, null or not)
    with pytest.raises(DataError, match=r"missing key 'inputs\[0\]\.unit'"):
        Manifest.from_dict(d, "golden")
    d["inputs"][0]["unit"] = None  # null is a value it may have
    assert Manifest.from_dict(d, "golden").inputs[0].unit is None


def test_a_missing_unreadable_or_other_version_manifest(tmp_path):
    with pytest.raises(DataError, match=r"no manifest\.json \(missing or unfinished dataset\)"):
        Manifest.load(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json: unreadable"):
        Manifest.load(str(tmp_path))
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"manifest\.json: key '\(top level\)': expected an obj"):
        Manifest.load(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({**minimal(), "format_version": 2}))
    with pytest.raises(DataError, match="format_version 2, expected 1"):
        Manifest.load(str(tmp_path))


def test_code_of_id_without_torch_matches_the_codec():
    table = CodeTable.frequency([3, 9, 1, 4, 4], 5)
    assert code_of_id(table.to_json()).tolist() == list(table.code_of_id)
    assert code_of_id(CodeTable.binary(6).to_json()).tolist() == list(range(6))
    with pytest.raises(DataError, match=r"^ds/code_table\.json: missing key 'code_of_id'"):
        code_of_id('{"kind": "binary", "vocab_size": 4}', "ds/code_table.json")
    with pytest.raises(DataError, match=r"code_table\.json: malformed code table"):
        code_of_id('{"kind": "frequency", "vocab_size": 4, "code_of_id": [0, 1]}')
    with pytest.raises(DataError, match="malformed code table"):
        code_of_id("not json")


@pytest.mark.parametrize("vocab", [2, 256, 257, 65536, 65537, 151_936])
def test_codeword_dtype_is_the_codecs(vocab):
    assert codeword_dtype(vocab) == BitCodec(vocab).codeword_dtype
    assert np.iinfo(codeword_dtype(vocab)).max >= vocab - 1


def test_shard_from_dict_keeps_manifest_order_fields():
    s = Shard.from_dict({"path": "p", "split": "val", "rows": 1, "inputs": ["a", "b"]}, "f")
    assert s.inputs == ("a", "b") and s.to_dict()["inputs"] == ["a", "b"]


def test_the_format_and_a_preprocessing_worker_load_no_torch():
    """``import bitlm`` is lazy, so a Ray worker of preprocessing stays light."""
    code = "import sys, bitlm.dataset_format, pipeline.units; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
    code = "import bitlm; print(bitlm.BitLM.__name__, bitlm.CodeTable.__module__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["BitLM", "bitlm.codec"]
