"""The quality metrics of the model on tiny models: chain-rule and mean-field likelihoods are
proper distributions over blocks (checked by enumerating every block), the bit cross-entropy is
minimised by the posterior mean, per-slot time and the condition gain."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from bitlm import BitLM, ModelConfig
from bitlm.diffusion import diffusion_loss, slot_times


def tiny(**kw) -> ModelConfig:
    base = dict(
        vocab_size=5,  # 3 bits: 3 invalid codes, so the renormalisation is exercised
        block_size=2,
        d_model=16,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        head_width=16,
        head_depth=1,
        head_heads=2,
    )
    base.update(kw)
    return ModelConfig(**base)


def _randomise(model: BitLM) -> BitLM:
    """Zero-initialised head outputs would make every distribution uniform: perturb them."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model.double().eval()


@torch.no_grad()
@pytest.mark.parametrize("chain", [False, True])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_block_likelihood_is_a_distribution(chain: bool, m: int) -> None:
    """Sum over all V^m blocks of p(block | context) == 1, for each estimator (the same noise
    draw for every block, as the estimator's factors must not depend on the slots they score)."""
    torch.manual_seed(0)
    model = _randomise(BitLM(tiny(block_size=m)))
    h = model.conditions(torch.randint(0, 5, (1, 2 * m)))[:, 1]  # [1, m, d]
    blocks = torch.tensor(list(itertools.product(range(5), repeat=m)))  # [V^m, m]
    total = 0.0
    lps = []
    for blk in blocks:
        g = torch.Generator().manual_seed(7)
        lp = model.block_log_probs(h, blk[None], chain, g).sum()
        lps.append(float(lp))
        total += math.exp(float(lp))
    assert total == pytest.approx(1.0, abs=1e-9)
    assert max(lps) - min(lps) > 0.1  # not the uniform distribution: the test can fail
    if m == 1:  # one slot: the chain rule is the mean-field factor
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        a = model.block_log_probs(h.expand(3, -1, -1), blocks[:3], True, g1)
        b = model.block_log_probs(h.expand(3, -1, -1), blocks[:3], False, g2)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@torch.no_grad()
def test_chain_rule_factor_uses_the_earlier_slots() -> None:
    """Factor j>0 reads slots < j as known: changing slot 0 changes slot 1's factor."""
    torch.manual_seed(0)
    model = _randomise(BitLM(tiny()))
    h = model.conditions(torch.randint(0, 5, (1, 4)))[:, 1]
    lp = []
    for first in (0, 3):
        g = torch.Generator().manual_seed(7)
        lp.append(model.block_log_probs(h, torch.tensor([[first, 2]]), True, g))
    assert abs(float(lp[0][0, 1] - lp[1][0, 1])) > 1e-6


def test_bit_ce_minimiser_is_the_posterior_mean() -> None:
    """For a bit that is +1 with probability p, the loss-minimising x0_hat = tanh(out) is 2p-1
    (as for x0_mse): the sampler reads the same quantity whichever loss trained it."""
    for p in (0.1, 0.5, 0.8):
        x0 = torch.tensor([1.0] * round(p * 100) + [-1.0] * round((1 - p) * 100))
        x0 = x0.view(-1, 1, 1)
        out = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([out], max_iter=100)

        def closure(opt=opt, out=out, x0=x0):
            opt.zero_grad()
            loss = diffusion_loss(out.expand_as(x0), x0, x0, torch.ones(len(x0)), "bit_ce")
            loss.backward()
            return loss

        opt.step(closure)
        assert math.tanh(float(out)) == pytest.approx(2 * p - 1, abs=1e-4)
    # The value: the binary cross-entropy of P(+1) = sigmoid(2 out), in nats.
    out, x0 = torch.tensor([[[0.3, -2.0]]]), torch.tensor([[[1.0, 1.0]]])
    want = -torch.log(torch.sigmoid(2 * out)).mean()
    got = diffusion_loss(out, x0, x0, torch.ones(1), "bit_ce")
    torch.testing.assert_close(got, want)


def test_known_prefix_and_bit_ce_train() -> None:
    torch.manual_seed(0)
    model = BitLM(tiny(block_size=4, known_prefix_prob=1.0, loss="bit_ce", vocab_size=50))
    tokens = torch.randint(0, 50, (2, 16))
    loss = model.loss(tokens, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.isfinite() and model.head.out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="bit_ce"):
        tiny(loss="bit_ce", head_squash=False)


def test_condition_gain_is_zero_when_the_head_cannot_see_the_condition() -> None:
    torch.manual_seed(0)
    model = _randomise(BitLM(tiny(vocab_size=50, block_size=4)))
    tokens = torch.randint(0, 50, (2, 16))
    gain = model.condition_gain(tokens, (0.5, 1.0), torch.Generator().manual_seed(0))
    assert set(gain) == {0.5, 1.0}
    assert any(abs(t - n) > 1e-6 for t, n in gain.values())  # it does use h
    with torch.no_grad():
        model.head.cond_proj.weight.zero_()
    gain = model.condition_gain(tokens, (0.5, 1.0), torch.Generator().manual_seed(0))
    for true, null in gain.values():
        assert true == pytest.approx(null, abs=1e-12)


def test_staggered_slot_times() -> None:
    """tau at its top: every slot is noise; at 0 every slot is clean; in between slot 0 leads."""
    s, m = 0.5, 4
    assert torch.equal(slot_times(torch.tensor(1 + s * (m - 1)), m, s), torch.ones(m))
    assert torch.equal(slot_times(torch.tensor(0.0), m, s), torch.zeros(m))
    mid = slot_times(torch.tensor(1.2), m, s)
    assert torch.allclose(mid, torch.tensor([0.0, 0.2, 0.7, 1.0]))
    assert torch.equal(slot_times(torch.tensor([0.3]), m, 0.0), torch.full((1, m), 0.3))
    model = BitLM(tiny(block_size=4, vocab_size=50, slot_stagger=s))
    loss = model.loss(torch.randint(0, 50, (2, 16)), torch.Generator().manual_seed(0))
    assert loss.isfinite()


def test_known_slots_are_left_out_of_the_loss() -> None:
    """Slots at t = 0 (known: x_t = x0) carry no loss, whatever the head outputs there; the
    others are averaged (v_loss would otherwise weight a copy task 400x)."""
    x0 = torch.ones(2, 3, 4)
    out = torch.zeros(2, 3, 4)
    out[:, 0] = -50.0  # wildly wrong on the known slot
    t = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.5, 0.5]])
    for kind in ("x0_mse", "v_loss", "bit_ce"):
        got = diffusion_loss(out, x0, x0, t, kind)
        want = diffusion_loss(out[:, 1:], x0[:, 1:], x0[:, 1:], torch.full((2,), 0.5), kind)
        torch.testing.assert_close(got, want)


def test_slot_curriculum_weights_and_loss() -> None:
    """slot_ramp_start/end: slots 1..m-1 carry no loss before the ramp, half at its middle, all
    after it (times slot_loss_decay^j); with weight 0 the softmax loss is slot 0's alone and the
    diffusion loss ignores what the head outputs on the far slots."""
    model = BitLM(
        tiny(
            block_size=4,
            vocab_size=50,
            output_head="softmax",
            slot_ramp_start=10,
            slot_ramp_end=30,
            slot_loss_decay=0.5,
        )
    )
    for step, ramp in ((0, 0.0), (10, 0.0), (20, 0.5), (30, 1.0), (99, 1.0)):
        model.set_step(step)
        want = torch.tensor([1.0, 0.5 * ramp, 0.25 * ramp, 0.125 * ramp])
        torch.testing.assert_close(model.slot_weight, want)
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    model.set_step(0)
    h = model.conditions(tokens)
    ce = torch.nn.functional.cross_entropy(
        model.head(h)[:, :, 0].flatten(0, 1), tokens[:, ::4].flatten()
    )
    torch.testing.assert_close(model.loss(tokens), ce)
    model.set_step(30)
    assert not torch.allclose(model.loss(tokens), ce)

    x0 = torch.ones(2, 3, 4)
    out = torch.zeros(2, 3, 4)
    out[:, 1:] = -50.0  # wildly wrong on the slots that are not trained yet
    w = torch.tensor([1.0, 0.0, 0.0])
    for kind in ("x0_mse", "v_loss", "bit_ce"):
        t = torch.full((2,), 0.5)
        got = diffusion_loss(out, x0, x0, t, kind, w)
        torch.testing.assert_close(got, diffusion_loss(out[:, :1], x0[:, :1], x0[:, :1], t, kind))
    with pytest.raises(ValueError, match="slot_ramp"):
        tiny(slot_ramp_start=5, slot_ramp_end=2)
