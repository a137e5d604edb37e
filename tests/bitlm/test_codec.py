"""Bit codec: round trips, exact repair against brute force, mean-field normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitlm.codec import BitCodec, CodeTable, num_bits_for


@pytest.mark.parametrize("V", [2, 3, 255, 256, 257, 50257])
def test_round_trip_every_id(V: int) -> None:
    codec = BitCodec(V)
    ids = torch.arange(V)
    bits = codec.encode(ids)
    assert bits.shape == (V, num_bits_for(V))
    assert set(bits.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(codec.decode(bits), ids)
    words = codec.to_codewords(ids)
    stored = words.numpy().astype(codec.codeword_dtype)
    assert torch.equal(codec.from_codewords(stored), ids)


def test_bits_are_msb_first() -> None:
    codec = BitCodec(16)
    assert codec.encode(torch.tensor([1])).tolist() == [[-1.0, -1.0, -1.0, 1.0]]
    assert codec.encode(torch.tensor([8])).tolist() == [[1.0, -1.0, -1.0, -1.0]]


def test_num_bits_and_codeword_dtype() -> None:
    assert num_bits_for(2) == 1 and num_bits_for(3) == 2 and num_bits_for(257) == 9
    assert num_bits_for(151_936) == 18
    assert BitCodec(256).codeword_dtype == np.uint8
    assert BitCodec(257).codeword_dtype == np.uint16
    assert BitCodec(151_936).codeword_dtype == np.uint32


@pytest.mark.parametrize("V", [3, 5, 11, 37, 100, 129, 255])
def test_repair_equals_brute_force(V: int) -> None:
    codec = BitCodec(V)
    g = torch.Generator().manual_seed(V)
    x = torch.randn(4000, codec.num_bits, generator=g)
    all_codes = codec.words_to_bits(torch.arange(V))  # [V, B]
    brute = (x @ all_codes.T).argmax(-1)
    assert torch.equal(codec.repair(x), brute)
    # Inputs whose sign is an invalid code are the interesting ones: make sure there are many.
    assert (codec.bits_to_words(x) >= V).float().mean() > 0.05 or 2 ** (codec.num_bits - 1) < V


def test_frequency_table_round_trip_and_decode() -> None:
    V = 300
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 1000, (V,), generator=g).tolist()
    table = CodeTable.frequency(counts, V)
    again = CodeTable.from_json(table.to_json())
    assert again == table and again.hash == table.hash
    assert table.hash != CodeTable.binary(V).hash
    # The most frequent id gets code 0.
    assert table.code_of_id[int(np.argmax(counts))] == 0
    codec = BitCodec(V, again)
    ids = torch.arange(V)
    assert torch.equal(codec.decode(codec.encode(ids)), ids)
    assert torch.equal(codec.from_codewords(codec.to_codewords(ids)), ids)
    # Repair under a table: the decoded id's code maximises the score among valid codes.
    x = torch.randn(500, codec.num_bits, generator=g)
    best_code = (x @ codec.words_to_bits(torch.arange(V)).T).argmax(-1)
    assert torch.equal(codec.to_codewords(codec.decode(x)), best_code)


def test_bad_inputs_are_clear_errors() -> None:
    codec = BitCodec(10)
    with pytest.raises(ValueError, match="out of range"):
        codec.encode(torch.tensor([10]))
    with pytest.raises(ValueError, match="out of range"):
        codec.from_codewords(np.array([12], dtype=np.uint8))
    with pytest.raises(ValueError, match="permutation"):
        CodeTable("frequency", 3, (0, 0, 1))
    with pytest.raises(ValueError, match="malformed"):
        CodeTable.from_json("{not json")
    with pytest.raises(ValueError, match="vocab_size"):
        BitCodec(10, CodeTable.binary(11))


@pytest.mark.parametrize("V", [2, 3, 37, 64, 200])
def test_mean_field_sums_to_one_over_valid_tokens(V: int) -> None:
    codec = BitCodec(V, CodeTable.frequency(list(range(V)), V))
    g = torch.Generator().manual_seed(1)
    p = torch.rand(6, codec.num_bits, generator=g)
    logp = torch.stack([codec.mean_field_log_prob(p, torch.full((6,), i)) for i in range(V)])
    assert torch.allclose(logp.exp().sum(0), torch.ones(6, dtype=torch.float64), atol=1e-9)


def test_semantic_table_groups_tokens_used_alike() -> None:
    """Two families of ids that never share a context land in the two halves of the code space
    (they differ in the top bit); the table is a valid, deterministic permutation."""
    g = torch.Generator().manual_seed(0)
    a, b = list(range(0, 16, 2)), list(range(1, 16, 2))  # interleaved ids
    seqs = []
    for _ in range(200):
        fam = a if torch.rand(1, generator=g) < 0.5 else b
        seqs.append([fam[int(i)] for i in torch.randint(0, 8, (20,), generator=g)])
    t1 = CodeTable.semantic(seqs, 16)
    t2 = CodeTable.semantic(seqs, 16)
    assert t1 == t2 and sorted(t1.code_of_id) == list(range(16))
    top = {i: t1.code_of_id[i] >> 3 for i in range(16)}
    assert len({top[i] for i in a}) == 1 and len({top[i] for i in b}) == 1
    assert top[a[0]] != top[b[0]]
    # A vocabulary that is not a power of two still gets exactly the codes [0, V).
    t3 = CodeTable.semantic([[i % 13 for i in range(k, k + 30)] for k in range(20)], 13)
    assert sorted(t3.code_of_id) == list(range(13))
    with pytest.raises(ValueError, match="out of range"):
        CodeTable.semantic([[0, 13]], 13)
