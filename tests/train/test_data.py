"""The dataset reader: manifest, fingerprint, seeded global order, per-rank slices, resume by
index arithmetic. No Ray, no DeepSpeed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import SEQ_LEN, VOCAB, pattern_rows, write_dataset

from bitlm.train.data import DataError, Dataset, FeistelPermutation, Manifest, rank_positions


@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 1000, 4097])
def test_feistel_is_a_permutation(n):
    p = FeistelPermutation(n, key=7)
    out = p(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    if n > 16:
        assert not np.array_equal(out, np.arange(n))  # actually shuffles
        assert not np.array_equal(out, FeistelPermutation(n, key=8)(np.arange(n)))


def test_order_independent_of_world_size():
    G = 24
    for step in range(3):
        whole = rank_positions(step, 0, 1, G)
        for world in (2, 3, 4, 8):
            parts = np.concatenate([rank_positions(step, r, world, G) for r in range(world)])
            assert np.array_equal(parts, whole)


def test_rows_match_what_was_written(tiny_data):
    ds = Dataset(tiny_data, "train", seed=3)
    assert ds.num_rows == 64
    rows = np.array([0, 5, 23, 24, 63])
    tokens = ds.codec.from_codewords(__import__("torch").from_numpy(ds.read_rows(rows)))
    assert np.array_equal(tokens.numpy(), pattern_rows(64)[rows])
    assert tokens.shape == (5, SEQ_LEN) and int(tokens.max()) < VOCAB


def test_epochs_cover_every_row_once_and_reshuffle(tiny_data):
    ds = Dataset(tiny_data, "train", seed=3)
    e0 = ds.rows_at(np.arange(64))
    e1 = ds.rows_at(np.arange(64, 128))
    assert sorted(e0.tolist()) == list(range(64)) == sorted(e1.tolist())
    assert not np.array_equal(e0, e1)
    assert not np.array_equal(e0, Dataset(tiny_data, "train", seed=4).rows_at(np.arange(64)))


def test_resume_is_index_arithmetic(tiny_data):
    """A fresh reader at position p yields exactly what an uninterrupted one yields there."""
    a = Dataset(tiny_data, "train", seed=3)
    stream = [a.tokens_at(rank_positions(s, r, 2, 8)) for s in range(20) for r in range(2)]
    b = Dataset(tiny_data, "train", seed=3)  # "restarted" at step 11, across the epoch boundary
    resumed = [b.tokens_at(rank_positions(s, r, 2, 8)) for s in range(11, 20) for r in range(2)]
    for x, y in zip(stream[22:], resumed, strict=True):
        assert (x == y).all()


def test_fingerprint(tmp_path, tiny_data):
    m = Manifest.load(tiny_data)
    fp = m.fingerprint("train")
    assert fp == Manifest.load(tiny_data).fingerprint("train") and len(fp) == 64
    assert fp != m.fingerprint("val")
    other = write_dataset(tmp_path / "other", train_rows=65)
    assert Manifest.load(other).fingerprint("train") != fp
    alt = write_dataset(tmp_path / "alt", table_kind="binary")
    assert Manifest.load(alt).fingerprint("train") != fp  # code table hash is part of it


def test_errors_are_clear(tmp_path, tiny_data):
    with pytest.raises(DataError, match=r"no manifest\.json"):
        Manifest.load(str(tmp_path))
    m = Manifest.load(tiny_data)
    with pytest.raises(DataError, match="vocab_size"):
        m.check_model(vocab_size=128, block_size=4)
    with pytest.raises(DataError, match=r"multiple of model\.block_size"):
        m.check_model(vocab_size=VOCAB, block_size=5)
    with pytest.raises(DataError, match="no shards in split"):
        Dataset(tiny_data, "test")
    bad = write_dataset(tmp_path / "bad")
    man = json.loads((tmp_path / "bad/manifest.json").read_text())
    man["shards"][0]["rows"] += 1
    (tmp_path / "bad/manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match="rows but the manifest says"):
        Dataset(bad, "train").read_rows(np.array([0]))
