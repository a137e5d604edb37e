"""Parity of the fused Triton head kernels (bitlm/kernels/) with the reference PyTorch head.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 without CUDA);
the `gpu` variants repeat the checks on CUDA in fp32 and bf16. Sizes are tiny on purpose: the
interpreter costs ~0.7 s per million elements.

Tolerances (fp32 errors measured in the interpreter: <= 2e-7 per kernel, <= 1.1e-6 for the head):
- fp32: relative error ||a - b|| / ||b|| <= 1e-5 (outputs and gradients), 1e-6 for elementwise
  kernels; bits and code words exactly equal.
- bf16: the fused kernels accumulate in fp32 and round once per stored tensor, the reference
  rounds after every op; both are compared with an fp32 reference run on the same bf16-rounded
  parameters and inputs, and the fused error may be at most 3x the reference's own bf16 error
  + 1e-2 (relative norms; a wrong index or a lost term gives errors of order 1). Measured in the
  interpreter, whose fp32 -> bf16 cast truncates instead of rounding to nearest: fused errors up
  to 3.5e-2 (a head gradient) where the reference's own reach 2.4e-2.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from bitlm import BitLM, ModelConfig
from bitlm.codec import BitCodec
from bitlm.diffusion import diffusion_loss
from bitlm.head import _GRAPHS, AdaLNBlock, DiffusionHead, fused_sample_block, modulate
from bitlm.kernels import interpreting
from bitlm.kernels.bits import noise_bits, repair_words
from bitlm.kernels.loss import fused_bit_loss
from bitlm.kernels.mlp import adaln_mlp, ln_modulate

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu-interp"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    if request.param == "cpu" and not interpreting():
        pytest.skip("CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")
    if request.param == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    return torch.device(request.param)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(fused, ref_lp, ref_fp32, dtype, tol32: float = 1e-5, name: str = "") -> None:
    """fused and ref_lp ran in dtype; ref_fp32 is the fp32 reference on the same inputs."""
    if dtype == torch.float32:
        assert rel(fused, ref_fp32) <= tol32, (name, rel(fused, ref_fp32))
    else:
        e_fused, e_ref = rel(fused, ref_fp32), rel(ref_lp, ref_fp32)
        assert e_fused <= 3 * e_ref + 1e-2, (name, e_fused, e_ref)


def rnd(u, dtype: torch.dtype):
    """Round a tensor or a module's parameters to dtype and back to fp32, so that the fp32
    reference sees exactly the inputs the low-precision runs see."""
    return u.to(dtype).float()


def randomise(mod: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Non-zero parameters everywhere (the head zero-initialises its adaLN and output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return mod


# ---- kernel (a): code words -> bits -> x_t ------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("vocab", "R", "m"), [(5000, 7, 3), (151_936, 5, 4), (200_000, 3, 5)])
def test_noise_bits(device, dtype, vocab, R, m):
    codec = BitCodec(vocab)  # B = 13, 18, 18
    g = torch.Generator().manual_seed(vocab)
    words = torch.randint(0, vocab, (R, m), generator=g).to(device)
    t = torch.rand(R, generator=g).to(device, dtype)
    eps = torch.randn(R, m, codec.num_bits, generator=g).to(device, dtype)
    out = noise_bits(words, t, eps)
    x0 = codec.words_to_bits(words.cpu()).to(device)  # fp32
    ref = (1 - t.float())[:, None, None] * x0 + t.float()[:, None, None] * eps.float()
    assert out.dtype == dtype and out.shape == eps.shape
    # one rounding of the fp32 result: exact in fp32 up to fma; in bf16 half an ulp on GPU, one
    # ulp in the interpreter (its fp32 -> bf16 cast truncates)
    tol = 1e-6 if dtype == torch.float32 else 2**-7
    assert torch.allclose(out.float(), ref, rtol=tol, atol=tol)


# ---- sign() + exact repair --------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [151_936, 5000, 8192, 3, 77])
def test_repair_words(device, vocab):
    codec = BitCodec(vocab)
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(301, codec.num_bits, generator=g)
    x[:50] = codec.words_to_bits(torch.randint(0, 1 << codec.num_bits, (50,), generator=g))
    x[50:60] = x[50:60].abs()  # all ones: the largest invalid code
    words = repair_words(x.to(device), vocab).cpu()
    ref = codec.repair(x)
    assert bool((words < vocab).all())
    assert torch.equal(words, ref)


# ---- kernel (b): LN + modulate, and the adaLN MLP sub-block -------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("M", "W"), [(15, 24), (9, 40), (20, 64)])
def test_ln_modulate(device, dtype, M, W):
    g = torch.Generator().manual_seed(M * W)
    x = rnd(torch.randn(M, W, generator=g) * 2 + 0.5, dtype)
    ada = rnd(torch.randn(M, 3 * W, generator=g) * 0.5, dtype)  # shift/scale: strided views
    dy = rnd(torch.randn(M, W, generator=g), dtype)

    def run(fn, dt, dev):
        xx = x.to(dev, dt).detach().clone().requires_grad_()
        aa = ada.to(dev, dt).detach().clone().requires_grad_()
        s, c, _ = aa.chunk(3, -1)
        y = fn(xx, s, c)
        y.backward(dy.to(dev, dt))
        return y.float().cpu(), xx.grad.float().cpu(), aa.grad.float().cpu()

    ref_fn = lambda xx, s, c: modulate(F.layer_norm(xx, (W,), eps=1e-6), s, c)
    fused = run(ln_modulate, dtype, device)
    ref_lp = run(ref_fn, dtype, "cpu")
    ref32 = run(ref_fn, torch.float32, "cpu")
    for name, a, b, c in zip(("y", "dx", "dada"), fused, ref_lp, ref32, strict=True):
        check(a, b, c, dtype, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("R", "m", "W", "ratio"), [(5, 3, 24, 2.5), (4, 5, 40, 2.0), (3, 4, 32, 3.0)]
)
def test_adaln_mlp(device, dtype, R, m, W, ratio):
    blk = rnd(randomise(AdaLNBlock(W, 2, ratio), seed=W), dtype)
    g = torch.Generator().manual_seed(R * m * W)
    x = rnd(torch.randn(R, m, W, generator=g), dtype)
    y = rnd(torch.randn(R, m, W, generator=g), dtype)
    dout = rnd(torch.randn(R, m, W, generator=g), dtype)

    def run(fused: bool, dt, dev):
        b = copy.deepcopy(blk).to(dev, dt)
        xx = x.to(dev, dt).detach().clone().requires_grad_()
        yy = y.to(dev, dt).detach().clone().requires_grad_()
        _, _, _, s2, c2, g2 = b.ada(yy).chunk(6, dim=-1)
        if fused:
            out = adaln_mlp(xx, s2, c2, g2, b.fc1, b.fc2)
        else:
            out = xx + g2 * b.mlp(modulate(b.norm2(xx), s2, c2))
        out.backward(dout.to(dev, dt))
        grads = [xx.grad, yy.grad] + [p.grad for p in (*b.fc1.parameters(), *b.fc2.parameters())]
        grads.append(b.ada.weight.grad)
        return [out, *grads]

    names = ("out", "dx", "dy", "dw1", "db1", "dw2", "db2", "dada")
    fused = run(True, dtype, device)
    ref_lp = run(False, dtype, "cpu")
    ref32 = run(False, torch.float32, "cpu")
    for name, a, b, c in zip(names, fused, ref_lp, ref32, strict=True):
        check(a.float().cpu(), b.float(), c.float(), dtype, name=name)


# ---- kernel (c): the loss and its gradient ------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["x0_mse", "v_loss"])
@pytest.mark.parametrize("squash", [True, False])
@pytest.mark.parametrize(("vocab", "R", "m"), [(5000, 6, 3), (151_936, 5, 4)])
def test_loss(device, dtype, kind, squash, vocab, R, m):
    codec = BitCodec(vocab)
    g = torch.Generator().manual_seed(R * m)
    out = torch.randn(R, m, codec.num_bits, generator=g) * 1.5
    words = torch.randint(0, vocab, (R, m), generator=g)
    t = torch.rand(R, generator=g)
    t[0] = 0.01  # below the v-loss clamp
    out, t = rnd(out, dtype), rnd(t, dtype)

    def run(fused: bool, dt, dev):
        o = out.to(dev, dt).detach().clone().requires_grad_()
        tt = t.to(dev, dt)
        if fused:
            loss = fused_bit_loss(o, words.to(dev), tt, squash=squash, kind=kind)
        else:
            x0 = codec.words_to_bits(words).to(dev, dt)
            loss = diffusion_loss(torch.tanh(o) if squash else o, x0, o, tt, kind)
        loss.backward()
        return loss.detach().float().cpu(), o.grad.float().cpu()

    fused = run(True, dtype, device)
    ref_lp = run(False, dtype, "cpu")
    ref32 = run(False, torch.float32, "cpu")
    for name, a, b, c in zip(("loss", "dout"), fused, ref_lp, ref32, strict=True):
        check(a, b, c, dtype, tol32=1e-6, name=name)


# ---- the whole head: forward, backward, checkpoint interchange ----------------------------------
HEAD_CFGS = [
    dict(vocab_size=5000, block_size=3, head_width=24, head_heads=2, head_mlp_ratio=2.5),
    dict(
        vocab_size=151_936,
        block_size=5,
        head_width=40,
        head_heads=4,
        head_depth=2,
        self_conditioning=True,
        loss="v_loss",
    ),
    dict(vocab_size=200_000, block_size=4, head_width=32, head_squash=False, head_depth=1),
    # the study's options: additive condition path in the fused forward, bit_ce + slot decay
    # through the PyTorch loss on the fused head's output
    dict(
        vocab_size=300,
        block_size=4,
        head_width=32,
        head_heads=2,
        head_depth=1,
        head_cond_input=True,
        loss="bit_ce",
        slot_loss_decay=0.5,
    ),
]


def make_head(seed: int = 0, **kw) -> DiffusionHead:
    cfg = ModelConfig(d_model=24, n_heads=2, n_kv_heads=1, **kw)
    torch.manual_seed(seed)
    return randomise(DiffusionHead(cfg), std=0.15, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kw", HEAD_CFGS, ids=["B13-m3", "B18-m5-sc-v", "B18-m4-nosquash", "B9-m4-ce-condin"]
)
def test_head_loss_parity(device, dtype, kw):
    head = rnd(make_head(**kw), dtype)
    cfg = head.cfg
    R, m, B = 4, cfg.block_size, cfg.num_bits
    g = torch.Generator().manual_seed(1)
    words = torch.randint(0, cfg.vocab_size, (R, m), generator=g)
    t = rnd(torch.rand(R, generator=g), dtype)
    eps = rnd(torch.randn(R, m, B, generator=g), dtype)
    h = rnd(torch.randn(R, m, cfg.d_model, generator=g), dtype)
    x_sc = rnd(torch.randn(R, m, B, generator=g).tanh(), dtype) if cfg.self_conditioning else None
    # the slot weights BitLM.set_step makes from slot_loss_decay
    sw = cfg.slot_loss_decay ** torch.arange(m, dtype=torch.float32)
    sw = None if cfg.slot_loss_decay == 1.0 else sw

    def run(fused: bool, dt, dev):
        hd = copy.deepcopy(head).to(dev, dt)
        hd.force_fused = fused
        hh = h.to(dev, dt).detach().clone().requires_grad_()
        tt = t.to(dev, dt)
        sc = None if x_sc is None else x_sc.to(dev, dt)
        x_t = hd.noise(words.to(dev), tt, eps.to(dev, dt))
        x0_hat = hd(x_t, tt, hh, sc)
        w = None if sw is None else sw.to(dev)
        loss = hd.loss(x_t, tt, hh, words.to(dev), sc, w)
        loss.backward()
        grads = {n: p.grad for n, p in hd.named_parameters() if p.grad is not None}
        return {"x_t": x_t, "x0_hat": x0_hat, "loss": loss, "dh": hh.grad, **grads}

    fused = run(True, dtype, device)
    ref_lp = run(False, dtype, "cpu")
    ref32 = run(False, torch.float32, "cpu")
    assert fused.keys() == ref32.keys()
    for k in ref32:
        # Whole-head gradients sum over three blocks: CUDA and CPU accumulate in different
        # orders, so fp32 gets 5e-5 here (measured 1.0e-5 on an H200, <2e-6 in the interpreter).
        check(fused[k].detach().float().cpu(), ref_lp[k].float(), ref32[k].float(), dtype, 5e-5, k)


def test_state_dict_interchange():
    """One module, two paths: a reference checkpoint loads into a head forced onto the kernels."""
    ref = make_head(**HEAD_CFGS[0])
    fused = DiffusionHead(ref.cfg)
    fused.load_state_dict(ref.state_dict())
    fused.force_fused = True
    assert list(fused.state_dict()) == list(ref.state_dict())
    x, t, h = torch.randn(2, 3, 13), torch.rand(2), torch.randn(2, 3, 24)
    if interpreting():
        assert rel(fused(x, t, h), ref(x, t, h)) < 1e-5


def test_dispatch_defaults():
    head = make_head(**HEAD_CFGS[0])
    assert not head.use_fused(torch.zeros(1))  # CPU: reference path
    head.force_fused = True
    assert head.use_fused(torch.zeros(1))
    if HAS_CUDA:
        head.force_fused = None
        assert head.use_fused(torch.zeros(1, device="cuda"))
        head.cfg.fused_head = False
        assert not head.use_fused(torch.zeros(1, device="cuda"))


# ---- decoding: the whole sampler with guidance and repair ---------------------------------------
@pytest.mark.parametrize(
    "cfg_scale, inpaint, shift",
    [(1.0, False, 1.0), (3.0, False, 1.0), (1.0, True, 1.0), (3.0, True, 1.0), (3.0, False, 0.3)],
)
def test_sampler_parity(device, cfg_scale, inpaint, shift):
    head = make_head(**HEAD_CFGS[1])  # self-conditioning on, m = 5, B = 18
    cfg = head.cfg
    codec = BitCodec(cfg.vocab_size)
    R, m = 3, cfg.block_size
    g = torch.Generator().manual_seed(3)
    h = torch.randn(R, m, cfg.d_model, generator=g)
    known = known_mask = None
    if inpaint:
        known = codec.encode(torch.randint(0, cfg.vocab_size, (R, m), generator=g))
        known_mask = torch.zeros(R, m, dtype=torch.bool)
        known_mask[:, :2] = True
    kw = dict(steps=4, cfg_scale=cfg_scale, temperature=0.9, shift=shift)
    ref_words, ref_x = head.sample(
        h,
        codec,
        generator=torch.Generator().manual_seed(7),
        known=known,
        known_mask=known_mask,
        **kw,
    )
    hd = copy.deepcopy(head).to(device)
    to = lambda u: None if u is None else u.to(device)
    gen = torch.Generator(device=device).manual_seed(7)
    if device.type == "cuda":  # CUDA draws differ from CPU: reference rerun on the same draws
        hd.force_fused = False
        ref_words, ref_x = hd.sample(
            to(h), codec, generator=gen, known=to(known), known_mask=to(known_mask), **kw
        )
        ref_words, ref_x = ref_words.cpu(), ref_x.cpu()
        gen.manual_seed(7)
    for _ in range(2 if device.type == "cuda" else 1):  # CUDA: capture, then replay
        words, x = fused_sample_block(
            hd,
            to(h),
            cfg.vocab_size,
            generator=gen,
            known=to(known),
            known_mask=to(known_mask),
            **kw,
        )
        gen.manual_seed(7)
        assert rel(x.cpu(), ref_x) < 1e-4
        assert torch.equal(words.cpu(), ref_words)
        assert bool((words < cfg.vocab_size).all())


# ---- a short training run: the fused loss curve follows the reference ---------------------------
@pytest.mark.parametrize("loss", ["x0_mse", "v_loss"])
def test_training_curve(device, loss):
    cfg = ModelConfig(
        vocab_size=5000,
        block_size=4,
        d_model=32,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        head_width=24,
        head_heads=2,
        head_depth=2,
        diffusion_batch_mul=2,
        loss=loss,
    )
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (6, 3, 8), generator=g)

    def train(fused: bool, dev) -> list[float]:
        torch.manual_seed(0)
        model = BitLM(cfg).to(dev)
        model.head.force_fused = fused
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator(device=dev).manual_seed(1)
        losses = []
        for batch in tokens:
            loss = model.loss(batch.to(dev), gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    ref = train(False, device)
    fused = train(True, device)
    if loss == "x0_mse":  # (the v-loss is too noisy to decrease reliably in 6 steps)
        assert ref[-1] < ref[0]
    assert fused == pytest.approx(ref, rel=1e-4, abs=1e-6)


# ---- GPU only: generation through the captured sampler ------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_generate_cuda(dtype):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    cfg = ModelConfig(vocab_size=151_936, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
    torch.manual_seed(0)
    model = randomise(BitLM(cfg), std=0.05).to("cuda", dtype).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 6), device="cuda")
    _GRAPHS.clear()
    out = model.generate(prompt, 10, steps=5, cfg_scale=2.0, generator=torch.Generator("cuda"))
    assert out.shape == (2, 16) and torch.equal(out[:, :6], prompt)
    assert bool((out >= 0).all() and (out < cfg.vocab_size).all())
    assert _GRAPHS, "the fused decode path did not capture a graph"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaln_mlp_large_cuda(dtype):
    """Training-sized rows take the autotuned GEMM path (bf16, M >= TUNE_MIN_M)."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    from bitlm.kernels.mlp import TUNE_MIN_M

    W, M = 256, TUNE_MIN_M + 96
    blk = rnd(randomise(AdaLNBlock(W, 2, 2.0), std=1 / 16, seed=5), dtype).cuda()
    g = torch.Generator(device="cuda").manual_seed(6)
    x = rnd(torch.randn(M, W, device="cuda", generator=g), dtype)
    ada = rnd(torch.randn(M, 3 * W, device="cuda", generator=g) * 0.3, dtype)
    dout = rnd(torch.randn(M, W, device="cuda", generator=g), dtype)

    def run(fused: bool, dt):
        b = copy.deepcopy(blk).to(dtype=dt)
        xx, aa = (
            x.to(dt).detach().clone().requires_grad_(),
            ada.to(dt).detach().clone().requires_grad_(),
        )
        s, c, gt = aa.chunk(3, -1)
        if fused:
            out = adaln_mlp(xx, s, c, gt, b.fc1, b.fc2)
        else:
            out = xx + gt * b.mlp(modulate(b.norm2(xx), s, c))
        out.backward(dout.to(dt))
        return [out, xx.grad, aa.grad, b.fc1.weight.grad, b.fc2.weight.grad]

    fused, ref_lp, ref32 = run(True, dtype), run(False, dtype), run(False, torch.float32)
    for name, a, b, c in zip(
        ("out", "dx", "dada", "dw1", "dw2"), fused, ref_lp, ref32, strict=True
    ):
        check(a.float(), b.float(), c.float(), dtype, name=name)
