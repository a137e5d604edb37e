"""The Kneser-Ney n-gram reference (bitlm.eval.ngram): normalisation, hand-computed values,
learning a synthetic Markov chain, unseen n-grams, sequence boundaries and input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bitlm.eval.ngram import KneserNey

N_CHAIN = 50  # ids 0..49 follow a Markov chain
VOCAB = 60  # ids 50..59 never occur in training


def _chain(seed: int = 0) -> np.ndarray:
    """Transition matrix over N_CHAIN ids, 2 or 3 successors per id."""
    rng = np.random.default_rng(seed)
    trans = np.zeros((N_CHAIN, N_CHAIN))
    for a in range(N_CHAIN):
        k = int(rng.integers(2, 4))
        trans[a, rng.choice(N_CHAIN, size=k, replace=False)] = rng.dirichlet(np.ones(k) * 2)
    return trans


def _sample(trans: np.ndarray, n_seq: int, length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cum = np.cumsum(trans, axis=1)
    out = np.empty((n_seq, length), dtype=np.int64)
    cur = rng.integers(0, N_CHAIN, size=n_seq)
    for i in range(length):
        out[:, i] = cur
        u = rng.random(n_seq)[:, None]
        cur = np.minimum((u > cum[cur]).sum(axis=1), N_CHAIN - 1)
    return out


@pytest.fixture(scope="module")
def corpus() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    trans = _chain()
    return trans, _sample(trans, 300, 100, seed=1), _sample(trans, 30, 100, seed=2)


def _ngrams(data: np.ndarray, n: int) -> set[tuple[int, ...]]:
    return {tuple(int(x) for x in row[i : i + n]) for row in data for i in range(len(row) - n + 1)}


def _contexts(trans: np.ndarray, train: np.ndarray) -> dict[str, list[int]]:
    """Contexts of each kind, checked against the training data."""
    bigrams, trigrams = _ngrams(train, 2), _ngrams(train, 3)
    seen = [int(x) for x in train[0, 10:12]]
    assert tuple(seen) in bigrams
    # (a, b) never seen together, but b is seen as a context: partially seen at order 3
    a, b = next((a, b) for a in range(N_CHAIN) for b in range(N_CHAIN) if trans[a, b] == 0)
    assert (a, b) not in bigrams and any(g[0] == b for g in bigrams)
    assert any(g[:2] == tuple(seen) for g in trigrams)
    return {
        "empty": [],
        "seen": seen,
        "partially seen": [a, b],
        "unknown id": [55, 3],
        "only unknown ids": [57, 58],
        "longer than order": [int(x) for x in train[1, :7]],
    }


@pytest.mark.parametrize("discount", [None, 0.75])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_distributions_sum_to_one(corpus, order: int, discount: float | None) -> None:
    trans, train, _ = corpus
    lm = KneserNey(order, vocab_size=VOCAB, discount=discount).fit(train)
    for name, ctx in _contexts(trans, train).items():
        p = np.array([math.exp(lm.logprob(ctx, t)) for t in range(VOCAB)])
        assert abs(p.sum() - 1.0) < 1e-9, (name, p.sum())
        assert (p > 0).all(), name
        np.testing.assert_allclose(lm.probs(ctx), p, rtol=1e-12, err_msg=name)


def test_hand_computed_values() -> None:
    """Order 2, D = 0.5 on [0 1 0 1 2], V = 4, worked out by hand.

    Unigram continuation counts (left neighbours, the sequence start counting as one):
    0 -> {start, 1} = 2, 1 -> {0} = 1, 2 -> {1} = 1, 3 -> 0; total 4, gamma = 0.5 * 3 types."""
    lm = KneserNey(2, vocab_size=4, discount=0.5).fit([[0, 1, 0, 1, 2]])
    uni = {w: (max(c - 0.5, 0) + 1.5 / 4) / 4 for w, c in enumerate([2, 1, 1, 0])}
    assert uni == {0: 0.46875, 1: 0.21875, 2: 0.21875, 3: 0.09375}
    for w, p in uni.items():
        assert lm.logprob([], w) == pytest.approx(math.log(p), abs=1e-12)
        # 2 and 3 never precede anything: back off to the unigram
        assert lm.logprob([2], w) == pytest.approx(math.log(p), abs=1e-12)
        assert lm.logprob([3], w) == pytest.approx(math.log(p), abs=1e-12)
    # context 0: (0 1) x2, gamma = 0.5; context 1: (1 0), (1 2), gamma = 1.0
    assert lm.logprob([0], 1) == pytest.approx(math.log((1.5 + 0.5 * uni[1]) / 2), abs=1e-12)
    assert lm.logprob([0], 3) == pytest.approx(math.log(0.5 * uni[3] / 2), abs=1e-12)
    assert lm.logprob([1], 0) == pytest.approx(math.log((0.5 + uni[0]) / 2), abs=1e-12)
    assert lm.logprob([1], 2) == pytest.approx(math.log((0.5 + uni[2]) / 2), abs=1e-12)
    expected = [math.log(uni[0]), math.log((1.5 + 0.5 * uni[1]) / 2), math.log((0.5 + uni[2]) / 2)]
    np.testing.assert_allclose(lm.sequence_logprobs([0, 1, 2]), expected, rtol=1e-12)


def test_learns_a_markov_chain(corpus) -> None:
    trans, train, held = corpus
    lm = KneserNey(3, vocab_size=VOCAB).fit(train)
    uni = KneserNey(1, vocab_size=VOCAB).fit(train)
    rng = np.random.default_rng(3)
    shuffled = np.array([rng.permutation(row) for row in held])
    real, shuf, real_uni = lm.perplexity(held), lm.perplexity(shuffled), uni.perplexity(held)
    assert real * 5 < shuf, (real, shuf)
    assert real * 3 < real_uni, (real, real_uni)
    # close to the chain's own perplexity on the same transitions (the first token excluded)
    true_nll = -np.log(trans[held[:, :-1], held[:, 1:]]).mean()
    model_nll = -np.mean([lm.sequence_logprobs(row)[1:] for row in held])
    assert true_nll <= model_nll + 0.02 and model_nll < true_nll + 0.1, (true_nll, model_nll)
    for k, d in enumerate(zip(*lm.discounts, strict=True), start=1):
        assert all(0.1 <= x <= k - 0.05 for x in d)


def test_unseen_ngrams_get_small_nonzero_probability(corpus) -> None:
    trans, train, _ = corpus
    lm = KneserNey(3, vocab_size=VOCAB).fit(train)
    a = 0
    frequent = int(np.argmax(trans[a]))
    never = next(b for b in range(N_CHAIN) if trans[a, b] == 0)
    assert (a, never) not in _ngrams(train, 2)
    p_never, p_frequent = math.exp(lm.logprob([a], never)), math.exp(lm.logprob([a], frequent))
    assert 0 < p_never < p_frequent / 10
    # an unseen trigram of known ids, after a seen bigram context
    ctx = [int(x) for x in train[0, 5:7]]
    tri = _ngrams(train, 3)
    unseen = next(w for w in range(N_CHAIN) if (*ctx, w) not in tri)
    seen = int(train[0, 7])
    assert 0 < math.exp(lm.logprob(ctx, unseen)) < math.exp(lm.logprob(ctx, seen))
    # an id never seen in training: nonzero, below any seen continuation
    assert 0 < math.exp(lm.logprob(ctx, 55)) < math.exp(lm.logprob(ctx, unseen))


def test_sequence_logprobs_match_logprob(corpus) -> None:
    _, train, held = corpus
    lm = KneserNey(3, vocab_size=VOCAB).fit(train)
    seq = np.concatenate([held[0, :20], [55, 2, 57], held[1, :10]])
    lp = lm.sequence_logprobs(seq)
    assert lp.shape == (len(seq),)
    for i in range(len(seq)):
        assert lp[i] == pytest.approx(lm.logprob(seq[:i], int(seq[i])), abs=1e-12), i
    assert lp[0] == pytest.approx(lm.logprob([], int(seq[0])), abs=1e-12)
    seqs = [held[0], held[1, :7], seq]
    nll = -np.concatenate([lm.sequence_logprobs(s) for s in seqs]).mean()
    assert lm.perplexity(seqs) == pytest.approx(math.exp(nll), rel=1e-12)
    assert lm.sequence_logprobs([]).shape == (0,)


def test_input_forms_agree(corpus) -> None:
    _, train, held = corpus
    a = KneserNey(3, vocab_size=VOCAB).fit(train)
    b = KneserNey(3, vocab_size=VOCAB).fit([row.tolist() for row in train])
    assert a.n_tokens == b.n_tokens == train.size
    assert a.perplexity(held) == b.perplexity([row.tolist() for row in held])


def test_modified_discounts() -> None:
    # unigram counts 1, 1, 2, 3, 4: n1..n4 = 2, 1, 1, 1, Y = 1/2
    lm = KneserNey(1, vocab_size=8).fit([[0, 1, 2, 2, 3, 3, 3, 4, 4, 4, 4]])
    assert lm.discounts == [pytest.approx((1 - 2 * 0.5 * 1 / 2, 2 - 3 * 0.5, 3 - 4 * 0.5))]
    # counts 1, 2, then ten ids x 3: D2 = 2 - 3 (1/3) 10 < 0 is clamped, D3+ = 3 to 2.95
    lm = KneserNey(1, vocab_size=16).fit([[0, 1, 1] + [w for w in range(2, 12) for _ in "abc"]])
    assert lm.discounts == [pytest.approx((1 - 2 / 3, 0.1, 2.95))]
    p = lm.probs([])
    assert (p > 0).all() and abs(p.sum() - 1) < 1e-12


def test_ngrams_do_not_cross_sequences() -> None:
    split = KneserNey(2, vocab_size=5, discount=0.5).fit([[1, 2], [3, 4]])
    joined = KneserNey(2, vocab_size=5, discount=0.5).fit([[1, 2, 3, 4]])
    # 2 ends its sequence, so it is never a context: back off to the unigram
    assert split.logprob([2], 3) == pytest.approx(split.logprob([], 3), abs=1e-12)
    assert joined.logprob([2], 3) > joined.logprob([], 3) + 0.1


def test_errors() -> None:
    for order in (0, -1):
        with pytest.raises(ValueError, match="order"):
            KneserNey(order, vocab_size=10)
    with pytest.raises(ValueError, match="vocab_size"):
        KneserNey(2, vocab_size=0)
    with pytest.raises(ValueError, match="int64"):
        KneserNey(6, vocab_size=50_000)
    for d in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="discount"):
            KneserNey(2, vocab_size=10, discount=d)
    lm = KneserNey(3, vocab_size=10)
    with pytest.raises(RuntimeError, match="fit"):
        lm.logprob([1], 2)
    for bad in ([[1, 2, 10]], [[1, -1, 2]], [[0.5, 1.0]], [[[1, 2]]]):
        with pytest.raises(ValueError):
            KneserNey(3, vocab_size=10).fit(bad)
    lm.fit([[1, 2, 3, 4]])
    for call in (
        lambda: lm.logprob([1], 10),
        lambda: lm.logprob([1], -1),
        lambda: lm.logprob([1, 12], 2),
        lambda: lm.logprob([-3], 2),
        lambda: lm.sequence_logprobs([1, 2, 10]),
        lambda: lm.perplexity([[1, 2], [3, 99]]),
        lambda: lm.probs([11]),
    ):
        with pytest.raises(ValueError, match=r"outside \[0, vocab_size=10\)"):
            call()
    with pytest.raises(ValueError, match="no tokens"):
        lm.perplexity([[]])
