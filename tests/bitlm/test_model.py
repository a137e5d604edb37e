"""Model structure: block-causal mask, alignment/causality, KV cache, checkpoints, config."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from bitlm import BitLM, ModelConfig
from bitlm.backbone import block_causal_mask
from bitlm.codec import CodeTable
from bitlm.pretrained import CheckpointError


def tiny(**kw) -> ModelConfig:
    base = dict(
        vocab_size=50,
        block_size=4,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_width=32,
        head_depth=2,
        head_heads=2,
    )
    base.update(kw)
    return ModelConfig(**base)


def test_mask_m1_is_causal_and_blocks_are_full() -> None:
    pos = torch.arange(12)
    assert torch.equal(block_causal_mask(pos, pos, 1), torch.ones(12, 12).tril().bool())
    m4 = block_causal_mask(pos, pos, 4)
    assert m4[0, 3] and m4[5, 7] and not m4[3, 4] and m4[11, 0]
    assert torch.equal(m4[4:8, 4:8], torch.ones(4, 4, dtype=torch.bool))


def test_m1_attention_equals_standard_causal() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 10, 8) for _ in range(3))
    pos = torch.arange(10)
    ours = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(pos, pos, 1))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("m", [1, 4])
def test_conditions_are_block_causal(m: int) -> None:
    torch.manual_seed(0)
    model = BitLM(tiny(block_size=m, slot_embedding=True, input_block_order="reversed")).eval()
    L = 6 * m
    tokens = torch.randint(0, 50, (2, L))
    h = model.conditions(tokens)  # [b, N, m, d]
    assert h.shape == (2, L // m, m, 32)
    n = 2  # change every token of data block n
    changed = tokens.clone()
    changed[:, n * m : (n + 1) * m] = (changed[:, n * m : (n + 1) * m] + 7) % 50
    h2 = model.conditions(changed)
    assert torch.equal(h[:, : n + 1], h2[:, : n + 1])  # targets <= n: bit-identical
    diff = (h[:, n + 1] - h2[:, n + 1]).abs().amax(-1)  # [b, m]
    assert (diff > 1e-6).all()  # every slot of target block n+1 sees it


@pytest.mark.parametrize("P", [0, 3, 4, 7, 8])
@pytest.mark.parametrize(
    "head",
    ["diffusion", "softmax", "slot_embedding", "reversed", "stagger", "last", "prefix"],
)
def test_kv_cache_equals_recomputation(P: int, head: str) -> None:
    torch.manual_seed(0)
    kw = {
        "slot_embedding": dict(slot_embedding=True),
        "reversed": dict(input_block_order="reversed", input="bit_groups"),
        "stagger": dict(slot_stagger=0.5, known_prefix_prob=0.5, head_cond_input=True),
        "last": dict(condition="last", input="bit_groups"),
        "prefix": dict(slot_prefix=2, slot_mixer=1),
    }.get(head, dict(output_head=head))
    model = BitLM(tiny(**kw)).double().eval()
    if model.prefix_proj is not None:
        for p in [model.prefix_proj.weight, *model.mixer.parameters()]:
            torch.nn.init.normal_(p, std=0.3)
    prompt = torch.randint(0, 50, (3, P))
    outs = []
    for use_cache in ("static", "dynamic", False):
        g = torch.Generator().manual_seed(11)
        outs.append(
            model.generate(prompt, 9, steps=4, cfg_scale=2.0, generator=g, use_cache=use_cache)
        )
    assert outs[0].shape == (3, P + 9)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.equal(outs[0][:, :P], prompt)


def prefixed(head: str, mixer: int = 0) -> BitLM:
    torch.manual_seed(0)
    cfg = tiny(output_head=head, slot_prefix=2, slot_mixer=mixer, head_cond_input=True)
    model = BitLM(cfg).double().eval()
    with torch.no_grad():  # the zero-initialised layers too: an untrained head is constant
        for p in [model.prefix_proj.weight, *model.head.parameters(), *model.mixer.parameters()]:
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("head", ["diffusion", "softmax"])
def test_slot_prefix_conditions_see_exactly_the_p_tokens_before(head: str) -> None:
    model = prefixed(head)
    tokens = torch.randint(0, 50, (2, 16))
    h = model.conditions(tokens).flatten(1, 2)  # [b, L, d]
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 7) % 50  # slot 1 of block 2
    diff = (model.conditions(changed).flatten(1, 2) - h).abs().amax((0, 2))  # [L]
    # positions 10 and 11 read token 9 through the prefix, block 3 through the backbone
    assert (diff[:10] == 0).all() and (diff[10:] > 1e-6).all()


def test_slot_mixer_is_causal_over_the_slots() -> None:
    model = prefixed("softmax", mixer=1)
    tokens = torch.randint(0, 50, (2, 16))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 7) % 50  # slot 1 of block 2: read by slots 2, 3 (prefix)
    diff = (model.conditions(changed) - model.conditions(tokens)).abs().amax((0, 3))  # [N, m]
    assert (diff[:2] == 0).all() and (diff[2, :2] == 0).all() and (diff[2:, 2:] > 1e-6).all()
    assert (diff[3] > 1e-6).all()


@pytest.mark.parametrize("head", ["diffusion", "softmax", "mixer"])
def test_slot_prefix_greedy_decoding_is_its_own_teacher_forced_prediction(head: str) -> None:
    """Decoding goes slot by slot with the sampled tokens in the prefix; training and evaluation
    use the true tokens. For greedy decoding the two must agree: every generated token is the
    teacher-forced greedy prediction at its position, given the generated sequence."""
    model = prefixed("diffusion", mixer=1) if head == "mixer" else prefixed(head)
    prompt = torch.randint(0, 50, (3, 5))  # 5: the first generated block is completed
    seq = model.generate(prompt, 11, steps=4, temperature=0.0)  # [3, 16]
    pred, _ = model.sample_block(
        model.conditions(seq).flatten(0, 1),
        steps=4,
        cfg_scale=1.0,
        temperature=0.0,
        generator=None,
    )
    assert torch.equal(pred.view(3, 16)[:, 5:], seq[:, 5:])
    # and the prefix matters: without it the same model decodes something else
    model.prefix_proj.weight.data.zero_()
    assert not torch.equal(model.generate(prompt, 11, steps=4, temperature=0.0), seq)


def test_ar_baseline_generates_with_cache() -> None:
    torch.manual_seed(0)
    cfg = tiny(block_size=1, input="embedding", output_head="softmax")
    model = BitLM(cfg).double().eval()
    prompt = torch.randint(0, 50, (2, 5))
    a = model.generate(prompt, 6, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 6, generator=torch.Generator().manual_seed(3), use_cache=False)
    c = model.generate(prompt, 6, generator=torch.Generator().manual_seed(3), use_cache="dynamic")
    assert torch.equal(a, b) and torch.equal(a, c)
    assert model.loss(torch.randint(0, 50, (2, 8))).isfinite()


def test_static_cache_is_bounded_and_equals_dynamic() -> None:
    from bitlm.backbone import KVCache, StaticKVCache

    cfg = tiny()
    static = StaticKVCache(cfg, 2, 8, torch.device("cpu"), torch.float32)
    dynamic = KVCache(cfg.n_layers)
    for T in (4, 1, 3):
        k, v = torch.randn(2, cfg.n_kv_heads, T, cfg.head_dim), torch.randn(2, 2, T, 8)
        for got, want in zip(static.update(0, k, v), dynamic.update(0, k, v), strict=True):
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match="holds 8 positions"):
        static.update(0, k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match="use_cache"):
        BitLM(cfg).generate(torch.zeros(1, 4, dtype=torch.long), 4, use_cache="yes")


def test_adaptive_denoising_commits_confident_rows_only() -> None:
    """euler_sample(commit=c): a row whose bits are all beyond c with a stable sign jumps to
    x0_hat and stops; a row that keeps flipping runs all K steps exactly as the fixed-K sampler
    does; the loop ends when every row is done."""
    from bitlm.diffusion import euler_sample

    flips = {"n": 0}

    def x0_fn(x, t, sc, rows, i):
        flips["n"] += 1
        out = torch.full_like(x, 0.9)
        rows = torch.arange(2) if rows is None else rows
        assert len(rows) == len(x)
        out[rows == 1] *= (-1) ** flips["n"]  # row 1 never stable
        return out

    kw = dict(device=torch.device("cpu"), dtype=torch.float64)
    fixed, k_fixed = euler_sample(
        x0_fn, (2, 3, 5), 8, generator=torch.Generator().manual_seed(0), **kw
    )
    flips["n"] = 0
    adapt, k = euler_sample(
        x0_fn, (2, 3, 5), 8, generator=torch.Generator().manual_seed(0), commit=0.5, **kw
    )
    assert k_fixed.tolist() == [8, 8] and k.tolist() == [2, 8]
    assert torch.equal(adapt[0], torch.full((3, 5), 0.9, dtype=torch.float64))  # committed
    assert torch.equal(adapt[1], fixed[1])
    _, k_one = euler_sample(
        lambda x, t, sc, rows, i: torch.full_like(x, 0.9), (2, 3, 5), 8, commit=0.5, **kw
    )
    assert k_one.tolist() == [2, 2]  # the second evaluation confirms the signs
    _, k_strict = euler_sample(
        lambda x, t, sc, rows, i: torch.full_like(x, 0.9), (2, 3, 5), 8, commit=0.95, **kw
    )
    assert k_strict.tolist() == [8, 8]


def test_adaptive_denoising_strictest_is_fixed_k_and_saves_steps() -> None:
    torch.manual_seed(0)
    model = BitLM(tiny()).double().eval()
    with torch.no_grad():  # a confident head (the zero-initialised one predicts 0 everywhere)
        model.head.out.bias.copy_(3.0 * torch.randn(model.head.out.bias.shape).sign())
    prompt = torch.randint(0, 50, (2, 6))
    outs, evals = [], []
    for commit in (None, 1.0, 0.0):
        model.head.sample_evals = 0
        g = torch.Generator().manual_seed(5)
        outs.append(model.generate(prompt, 8, steps=6, generator=g, commit=commit))
        evals.append(model.head.sample_evals)
    assert torch.equal(outs[0], outs[1]) and evals[0] == evals[1] == 6 * 3 * 2  # 2 rows x 3 blocks
    assert evals[2] == 2 * 3 * 2  # every block confirmed by its second evaluation
    assert outs[2].shape == outs[0].shape and int(outs[2].max()) < 50
    with pytest.raises(ValueError, match="sample_commit"):
        tiny(sample_commit=1.5)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(self_conditioning=True, head_cond_input=True),
        dict(head_posterior_skip=True, slot_prefix=2),
    ],
)
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_planned_sampler_head_equals_the_per_step_head(kw, cfg_scale) -> None:
    """The sampler computes the head's modulations for all K steps at once (guided(times=...));
    every step's x0_hat equals the head evaluated from scratch at that step's time, for all
    rows and for a subset (adaptive denoising), with and without guidance."""
    from bitlm.diffusion import sampler_times

    torch.manual_seed(0)
    model = BitLM(tiny(**kw)).double().eval()
    head = model.head
    with torch.no_grad():  # leave the zero-initialised adaLN: every modulation must matter
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    R, m, B = 3, 4, model.config.num_bits
    slot = 1 if kw.get("slot_prefix") else None
    h = torch.randn(R, 1 if slot is not None else m, model.config.d_model, dtype=torch.double)
    times = sampler_times(5)[:-1]
    planned = head.guided(h, cfg_scale, slot, times)
    fresh = head.guided(h, cfg_scale, slot)
    x = torch.randn(R, h.shape[1], B, dtype=torch.double)
    sc = torch.randn_like(x) if kw.get("self_conditioning") else None
    rows = torch.tensor([0, 2])
    with torch.no_grad():
        for i, t in enumerate(times):
            tt = t.expand(R).double()
            want = fresh(x, tt, sc, None, i)
            torch.testing.assert_close(planned(x, tt, sc, None, i), want, rtol=0, atol=1e-12)
            got = planned(x[rows], tt[rows], None if sc is None else sc[rows], rows, i)
            torch.testing.assert_close(got, want[rows], rtol=0, atol=1e-12)
            other = times[(i + 1) % len(times)].expand(R).double()
            assert not torch.allclose(want, fresh(x, other, sc, None, i))  # t matters


def test_shifted_sampler_times_and_decode() -> None:
    """sample_shift moves every step's time by t -> s t / (1 + (s - 1) t), keeping 1 and 0; the
    planned decode (modulations of all K steps computed ahead) follows the shifted times: it
    equals euler_sample over the head evaluated from scratch at each step, and differs from the
    unshifted sampler."""
    from bitlm.diffusion import euler_sample, sampler_times

    assert torch.equal(sampler_times(6, shift=1.0), torch.linspace(1, 0, 7))
    t = sampler_times(6, shift=0.3)
    u = torch.linspace(1, 0, 7)
    torch.testing.assert_close(t, 0.3 * u / (1 - 0.7 * u))
    assert t[0] == 1 and t[-1] == 0 and bool((t[1:-1] < u[1:-1]).all())
    assert bool((t[:-1] > t[1:]).all())
    with pytest.raises(ValueError, match="sample_shift"):
        tiny(sample_shift=0.0)

    torch.manual_seed(0)
    model = BitLM(tiny(head_posterior_skip=True)).double().eval()
    head = model.head
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    h = torch.randn(3, 4, model.config.d_model, dtype=torch.double)
    g = lambda: torch.Generator().manual_seed(4)
    kw = dict(steps=5, cfg_scale=1.0, temperature=1.0)
    _, x = head.sample(h, model.codec, generator=g(), shift=0.3, **kw)
    want, _ = euler_sample(
        head.guided(h, 1.0),
        (3, 4, model.config.num_bits),
        5,
        device=h.device,
        dtype=h.dtype,
        generator=g(),
        shift=0.3,
    )
    torch.testing.assert_close(x, want, rtol=0, atol=1e-12)
    _, x1 = head.sample(h, model.codec, generator=g(), **kw)
    assert not torch.allclose(x, x1)


def test_evaluate_reports_metrics() -> None:
    torch.manual_seed(0)
    model = BitLM(tiny()).eval()
    tokens = torch.randint(0, 50, (2, 16))
    r = model.evaluate(tokens, steps=3)
    assert int(r["tokens"]) == 32 and int(r["blocks"]) == 8
    for d in ("greedy", "sampled"):
        assert r[f"slot_correct_{d}"].shape == (4,)
        assert 0 <= int(r[f"bits_correct_{d}"]) <= 32 * 6
        assert 0 <= int(r[f"invalid_codes_{d}"]) <= 32
        assert r[f"token_correct_{d}"].shape == (2, 16)
    # An untrained head predicts ~0 = p 0.5 per bit: about B bits per token, renormalised.
    assert 4.0 < float(r["nll_bits"]) / 32 < 7.0
    assert 4.0 < float(r["nll_chain_bits"]) / 32 < 7.0
    # Greedy decoding is deterministic: the same result under any generator.
    r2 = model.evaluate(tokens, steps=3, generator=torch.Generator().manual_seed(99))
    assert torch.equal(r["token_correct_greedy"], r2["token_correct_greedy"])


@pytest.mark.parametrize("kw", [dict(self_conditioning=True), dict(output_head="softmax")])
def test_save_and_load_round_trip(tmp_path, kw) -> None:
    torch.manual_seed(0)
    table = CodeTable.frequency(list(range(50)), 50)
    model = BitLM(tiny(**kw), table).eval()
    model.save_pretrained(tmp_path / "m")
    again = BitLM.from_pretrained(tmp_path / "m").eval()
    assert again.codec.table == table
    tokens = torch.randint(0, 50, (2, 8))
    assert torch.equal(model.conditions(tokens), again.conditions(tokens))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(
        model.generate(tokens[:, :3], 5, steps=3, generator=g1),
        again.generate(tokens[:, :3], 5, steps=3, generator=g2),
    )
    # Saving again over an existing folder replaces it atomically.
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_corrupt_or_mismatched_checkpoint_is_clear_error(tmp_path) -> None:
    model = BitLM(tiny())
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="missing"):
        BitLM.from_pretrained(tmp_path / "nothing")
    weights = tmp_path / "m" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        BitLM.from_pretrained(tmp_path / "m")
    weights.write_bytes(good)
    cfg_file = tmp_path / "m" / "config.json"
    meta = json.loads(cfg_file.read_text())
    meta["model"]["d_model"] = 64
    cfg_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match"):
        BitLM.from_pretrained(tmp_path / "m")
    meta["model"]["d_model"] = 32
    meta["code_table_hash"] = "0" * 64
    cfg_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="hash"):
        BitLM.from_pretrained(tmp_path / "m")
    cfg_file.write_text("{broken")
    with pytest.raises(CheckpointError, match="unreadable"):
        BitLM.from_pretrained(tmp_path / "m")


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"model\.loss"):
        tiny(loss="l1")
    with pytest.raises(ValueError, match="n_kv_heads"):
        tiny(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match=r"unknown key model\.widht"):
        ModelConfig.from_dict({"vocab_size": 10, "widht": 3})
    with pytest.raises(ValueError, match=r"model\.block_size"):
        tiny(block_size=0)
    with pytest.raises(ValueError, match=r"model\.slot_mixer needs slot_prefix"):
        tiny(slot_mixer=1)
    with pytest.raises(ValueError, match=r"model\.slot_prefix cannot be combined"):
        tiny(slot_prefix=2, known_prefix_prob=0.5)


def test_bad_sequence_length_is_clear_error() -> None:
    model = BitLM(tiny())
    with pytest.raises(ValueError, match="multiple of block_size"):
        model.loss(torch.randint(0, 50, (2, 10)))


def test_flops_count_includes_head() -> None:
    bit = BitLM(tiny())
    more = BitLM(tiny(diffusion_batch_mul=8))
    assert more.flops_per_token(64) > bit.flops_per_token(64) > 6 * bit.num_params("backbone")


def test_posterior_skip_is_the_exact_denoiser_of_uniform_bits_at_init():
    """head_posterior_skip: with the output layer at its zero init, x0_hat is E[x0 | x_t] for
    uniform +-1 bits under x_t = (1 - t) x0 + t eps, computed here from the two Gaussians."""
    torch.manual_seed(0)
    cfg = tiny(head_posterior_skip=True)
    model = BitLM(cfg)
    head, B = model.head, cfg.num_bits
    R, m = 64, cfg.block_size
    t = torch.rand(R) * 0.9 + 0.1
    x0 = torch.randint(0, 2, (R, m, B)).float() * 2 - 1
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * torch.randn(R, m, B)
    h = torch.randn(R, m, cfg.d_model)
    tt = t[:, None, None]
    log_plus = -((x_t - (1 - tt)) ** 2) / (2 * tt**2)
    log_minus = -((x_t + (1 - tt)) ** 2) / (2 * tt**2)
    exact = (log_plus.exp() - log_minus.exp()) / (log_plus.exp() + log_minus.exp())
    torch.testing.assert_close(head(x_t, t, h), exact, atol=1e-5, rtol=0)
    # a trained output layer moves the prediction away from it, through the same tanh
    torch.nn.init.normal_(head.out.bias, std=1.0)
    assert (head(x_t, t, h) - exact).abs().max() > 0.05
    model.loss(torch.randint(0, cfg.vocab_size, (2, 4 * m))).backward()
    assert head.out.weight.grad is not None and head.out.weight.grad.abs().sum() > 0


def test_posterior_skip_needs_the_tanh():
    with pytest.raises(ValueError, match="head_posterior_skip"):
        tiny(head_posterior_skip=True, head_squash=False)


def test_ddim_step_at_eta_0_is_the_euler_step():
    from bitlm.diffusion import ddim_step

    x, x0 = torch.randn(8, 4, 6), torch.randn(8, 4, 6).tanh()
    t, s = torch.tensor(0.7), torch.tensor(0.45)
    euler = x + (s - t) * (x - x0) / t
    torch.testing.assert_close(ddim_step(x, x0, t, s, 0.0, torch.randn_like(x)), euler)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_keeps_the_marginal_of_the_path(eta):
    """With the true x0 as the denoiser's answer, x_t ~ N((1 - t) x0, t^2) must step to
    x_s ~ N((1 - s) x0, s^2) for every eta (the ancestral step samples q(x_s | x_t, x0))."""
    from bitlm.diffusion import ddim_step

    g = torch.Generator().manual_seed(0)
    n, t, s = 200_000, torch.tensor(0.8), torch.tensor(0.3)
    x0 = torch.ones(n)
    x_t = (1 - t) * x0 + t * torch.randn(n, generator=g)
    x_s = ddim_step(x_t, x0, t, s, eta, torch.randn(n, generator=g))
    assert abs(x_s.mean().item() - (1 - s.item())) < 0.005
    assert abs(x_s.std().item() - s.item()) < 0.005


def test_stochastic_sampler_is_seeded_and_differs_from_the_ode():
    cfg = tiny(sample_steps=4)
    model = BitLM(cfg).eval()
    torch.nn.init.normal_(model.head.out.weight, std=0.5)  # zero-init: x0_hat would be 0
    prompt = torch.randint(0, cfg.vocab_size, (3, 5))
    out = {}
    for eta in (0.0, 1.0, 1.0):
        g = torch.Generator().manual_seed(3)
        out.setdefault(eta, []).append(model.generate(prompt, 12, generator=g, eta=eta))
    assert torch.equal(out[1.0][0], out[1.0][1])  # same seed, same tokens
    assert not torch.equal(out[0.0][0], out[1.0][0])
    g = torch.Generator().manual_seed(3)  # greedy stays deterministic: no noise at T = 0
    a = model.generate(prompt, 12, generator=g, eta=1.0, temperature=0.0)
    b = model.generate(
        prompt, 12, generator=torch.Generator().manual_seed(9), eta=1.0, temperature=0.0
    )
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="sample_eta"):
        tiny(sample_eta=1.5)


def test_bit_stagger_denoises_the_high_bits_first():
    """bit_stagger s = 1/(B-1) spans two step-lengths of K = 2: after the first step the most
    significant bit is clean and the least significant one has not moved from its noise."""
    from bitlm.diffusion import euler_sample

    B = 6
    target = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0]).expand(3, 2, B)
    seen = []

    def oracle(x, t, sc, rows, i):
        seen.append(x.clone())
        return target

    g = torch.Generator().manual_seed(0)
    x, _ = euler_sample(
        oracle, (3, 2, B), 2, device=torch.device("cpu"), generator=g, bit_stagger=1 / (B - 1)
    )
    torch.testing.assert_close(x, target)
    first, second = seen
    torch.testing.assert_close(second[..., 0], target[..., 0])  # MSB done after step 1
    torch.testing.assert_close(second[..., -1], first[..., -1])  # LSB still its noise


def test_bit_stagger_times_and_training():
    cfg = tiny(bit_stagger=0.2, head_posterior_skip=True, slot_prefix=2)
    model = BitLM(cfg)
    tb = model.head.bit_times(torch.tensor([0.0, 0.5, 1.0]))  # [3, 1, B]
    assert tb.shape == (3, 1, cfg.num_bits)
    assert (tb[0] == 0).all() and (tb[2] == 1).all()
    assert (tb[1, 0].diff() >= 0).all() and tb[1, 0, 0] < tb[1, 0, -1]  # MSB least noisy
    model.loss(torch.randint(0, cfg.vocab_size, (2, 16))).backward()
    prompt = torch.randint(0, cfg.vocab_size, (2, 3))
    a = model.generate(prompt, 8, temperature=0.0)
    assert torch.equal(a, model.generate(prompt, 8, temperature=0.0))
    with pytest.raises(ValueError, match="bit_stagger"):
        tiny(bit_stagger=0.2, slot_stagger=0.3)
