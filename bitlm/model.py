"""BitLM: a block-causal decoder over bit-coded tokens with a diffusion head (method.md).

    bits     = codec(tokens)                                         [b, L, B]
    e        = RMSNorm(Linear-SiLU-Linear(bits))  (or Embedding)     [b, L, d]
    input    = [S_0..S_{m-1}, e_0 .. e_{L-m-1}]  (learned start block, shifted one block)
    h        = Backbone(input)  (block-causal)                       [b, L, d]
    h[n*m+j] conditions slot j of target block n; it has seen every token before block n.
    slot_prefix P > 0: h[i] += Linear([e(x_{i-1}); ...; e(x_{i-P})])   (in-block teacher forcing)
                       then slot_mixer causal decoder layers over the m slots of each block
    head     = diffusion over the m*B bits of each block, or a per-slot softmax (baselines).

The AR baseline is block_size=1, input="embedding", output_head="softmax".
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Backbone, DecoderLayer, KVCache, RMSNorm, StaticKVCache, block_causal_mask
from .codec import BitCodec, CodeTable
from .config import ModelConfig
from .diffusion import sample_time, slot_times
from .head import DiffusionHead, SoftmaxHead
from .pretrained import load_pretrained, save_pretrained

__all__ = ["BitLM"]


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved to like's."""
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, device=dev, generator=generator).to(like)


class BitInput(nn.Module):
    """B bits -> d: Linear-SiLU-Linear (hidden input_mlp_ratio x d), then RMSNorm (no embedding
    table)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = round(cfg.input_mlp_ratio * cfg.d_model)
        self.fc1 = nn.Linear(cfg.num_bits, hidden)
        self.fc2 = nn.Linear(hidden, cfg.d_model)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, bits: Tensor) -> Tensor:
        return self.norm(self.fc2(F.silu(self.fc1(bits))))


class BitGroupInput(nn.Module):
    """Code word -> d: the sum of one learned vector per g-bit group of the code, then RMSNorm.
    A factored embedding of ceil(B/g) x 2^g rows: distinct tokens get nearly orthogonal vectors
    (as with an embedding table) while the parameters grow with B, not with V."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.g = min(cfg.input_group_bits, cfg.num_bits)
        self.groups = -(-cfg.num_bits // self.g)
        self.table = nn.Embedding(self.groups << self.g, cfg.d_model)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, words: Tensor) -> Tensor:
        k = torch.arange(self.groups, device=words.device)
        idx = ((words[..., None] >> (k * self.g)) & ((1 << self.g) - 1)) + (k << self.g)
        return self.norm(self.table(idx).sum(-2))  # [..., groups, d] -> [..., d]


class BitLM(nn.Module):
    def __init__(self, config: ModelConfig, code_table: CodeTable | None = None) -> None:
        super().__init__()
        self.config = cfg = config
        self.codec = BitCodec(cfg.vocab_size, code_table)
        if cfg.input == "bits":
            self.input = BitInput(cfg)
        elif cfg.input == "bit_groups":
            self.input = BitGroupInput(cfg)
        else:
            self.input = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.start = nn.Parameter(torch.randn(cfg.block_size, cfg.d_model) * 0.02)
        # Without it a position cannot tell which slot it conditions: RoPE is relative, and all
        # m positions of a block see the same tokens.
        self.slot_emb = (
            nn.Parameter(torch.randn(cfg.block_size, cfg.d_model) * 0.02)
            if cfg.slot_embedding
            else None
        )
        self.cond_slot = (
            nn.Parameter(torch.randn(cfg.block_size, cfg.d_model) * 0.02)
            if cfg.condition == "last"
            else None
        )
        self.backbone = Backbone(cfg)
        self.prefix_proj = None
        if cfg.slot_prefix:  # zero-initialised: training starts from the paper's model
            self.prefix_proj = nn.Linear(cfg.slot_prefix * cfg.d_model, cfg.d_model, bias=False)
            nn.init.zeros_(self.prefix_proj.weight)
        self.mixer = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.slot_mixer))
        self.head = DiffusionHead(cfg) if cfg.output_head == "diffusion" else SoftmaxHead(cfg)
        self._init_backbone()
        # loss weight of each slot (slot_loss_decay, slot curriculum); set_step updates it
        self.register_buffer("slot_weight", torch.ones(cfg.block_size), persistent=False)
        self._uniform_slots = True
        self.set_step(0)

    def _init_backbone(self) -> None:
        first = self.input.fc1 if isinstance(self.input, BitInput) else None
        for mod in [self.input, self.backbone]:
            for sub in mod.modules():
                if isinstance(sub, nn.Linear):
                    std = self.config.input_init_std if sub is first else 0.02
                    nn.init.normal_(sub.weight, std=std)
                    if sub.bias is not None:
                        nn.init.zeros_(sub.bias)
                elif isinstance(sub, nn.Embedding):
                    nn.init.normal_(sub.weight, std=0.02)
        if isinstance(self.head, SoftmaxHead):
            nn.init.normal_(self.head.proj.weight, std=0.02)
        for layer in self.mixer:  # starts as the identity
            for sub in layer.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.normal_(sub.weight, std=0.02)
            nn.init.zeros_(layer.attn.wo.weight)
            nn.init.zeros_(layer.mlp.w2.weight)

    @property
    def is_diffusion(self) -> bool:
        return self.config.output_head == "diffusion"

    # ---- backbone side -----------------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """tokens [b, T] -> input vectors [b, T, d]."""
        if self.config.input == "bits":
            return self.input(self.codec.encode(tokens, self.start.dtype))
        if self.config.input == "bit_groups":
            return self.input(self.codec.to_codewords(tokens))
        return self.input(tokens)

    def embed_blocks(self, tokens: Tensor) -> Tensor:
        """Whole blocks of tokens [b, n m] -> backbone input vectors [b, n m, d]; with
        input_block_order=reversed each block enters last token first, so that slot 0 (which
        conditions next-token prediction) holds the most recent token, as in an AR model."""
        if self.config.input_block_order == "reversed":
            b, T = tokens.shape
            m = self.config.block_size
            tokens = tokens.view(b, T // m, m).flip(-1).reshape(b, T)
        return self.embed(tokens)

    def _check(self, tokens: Tensor) -> None:
        if tokens.dim() != 2 or tokens.shape[1] % self.config.block_size:
            raise ValueError(
                f"tokens must be [batch, L] with L a multiple of block_size="
                f"{self.config.block_size}, got {tuple(tokens.shape)}"
            )

    def run_backbone(self, x: Tensor, cache: KVCache | StaticKVCache | None = None) -> Tensor:
        """Block-aligned input vectors [b, T, d] (T a multiple of m) -> hidden states
        [b, T, d]; adds the slot embedding when configured."""
        if self.slot_emb is not None:
            b, T, d = x.shape
            m = self.config.block_size
            x = (x.view(b, T // m, m, d) + self.slot_emb).view(b, T, d)
        return self.backbone(x, cache)

    def hidden(self, tokens: Tensor) -> Tensor:
        """tokens [b, L] -> per-position conditions h [b, L, d] (start-block alignment)."""
        self._check(tokens)
        b, L = tokens.shape
        m = self.config.block_size
        x = torch.cat([self.start.expand(b, m, -1), self.embed_blocks(tokens[:, : L - m])], dim=1)
        return self.run_backbone(x)

    def slot_conditions(self, h: Tensor) -> Tensor:
        """Hidden states of input blocks [..., m, d] -> the head conditions of the target
        blocks [..., m, d]: per slot (the paper's alignment), or with condition=last the block's
        last hidden state for every slot (with forward input blocks that position holds the
        most recent token as its own input), plus a learned slot vector."""
        if self.cond_slot is None:
            return h
        return h[..., -1:, :] + self.cond_slot

    def prefix(self, tokens: Tensor) -> Tensor:
        """slot_prefix: tokens [b, T] -> the prefix vectors of positions 0..T [b, T + 1, d]:
        position i gets Linear([e(x_{i-1}); ...; e(x_{i-P})]), zero vectors before the start."""
        P, T = self.config.slot_prefix, tokens.shape[1]
        e = F.pad(self.embed(tokens), (0, 0, P, 0))  # [b, P + T, d]; e(x_i) at P + i
        return self.prefix_proj(
            torch.cat([e[:, P - k : P - k + T + 1] for k in range(1, P + 1)], -1)
        )

    def mix_slots(self, c: Tensor) -> Tensor:
        """slot_mixer: causal decoder layers over the first j slots of blocks [R, j, d]."""
        pos = torch.arange(c.shape[1], device=c.device)
        mask = block_causal_mask(pos, pos, 1)
        for layer in self.mixer:
            c = layer(c, pos, mask, None)
        return c

    def conditions(self, tokens: Tensor) -> Tensor:
        """The per-slot head conditions of every target block: [b, L/m, m, d] (with
        slot_prefix, teacher-forced: every slot gets the true tokens before it)."""
        h = self.hidden(tokens)
        b, L, d = h.shape
        m = self.config.block_size
        c = self.slot_conditions(h.view(b, L // m, m, d))
        if self.prefix_proj is not None:
            c = c + self.prefix(tokens)[:, :L].view(b, L // m, m, d)
        if self.mixer:
            c = self.mix_slots(c.flatten(0, 1)).view(b, L // m, m, d)
        return c

    # ---- training ----------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        """Tell the model the training step it is at (the slot curriculum depends on it);
        trainers call it before every optimizer step, resumed runs with the resumed step."""
        cfg = self.config
        ramp = 1.0
        if cfg.slot_ramp_end > 0:
            span = cfg.slot_ramp_end - cfg.slot_ramp_start
            ramp = (
                min(1.0, max(0.0, (step - cfg.slot_ramp_start) / span))
                if span
                else float(step >= cfg.slot_ramp_end)
            )
        w = [cfg.slot_loss_decay**j * (ramp if j else 1.0) for j in range(cfg.block_size)]
        self._uniform_slots = all(x == 1.0 for x in w)  # plain floats: works on the meta device
        with torch.no_grad():
            self.slot_weight.copy_(torch.tensor(w, device=self.slot_weight.device))

    def _slot_weight(self) -> Tensor | None:
        return None if self._uniform_slots else self.slot_weight

    def forward(self, tokens: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.loss(tokens, generator)

    def loss(self, tokens: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scalar training loss on tokens [b, L]."""
        h = self.conditions(tokens)  # [b, N, m, d]
        if not self.is_diffusion:
            logits = self.head(h).float()  # [b, N, m, V]
            w = self._slot_weight()
            if w is None:
                return F.cross_entropy(logits.flatten(0, 2), tokens.flatten())
            ce = F.cross_entropy(logits.flatten(0, 2), tokens.flatten(), reduction="none")
            w = w.float()
            return (ce.view(-1, len(w)) * w).sum() / (w.sum() * ce.numel() / len(w))
        return self.head_loss(h, tokens, generator)

    def head_loss(self, h: Tensor, tokens: Tensor, generator: torch.Generator | None) -> Tensor:
        """Diffusion loss of all blocks; each block replicated diffusion_batch_mul times."""
        cfg = self.config
        b, N, m, d = h.shape
        r = cfg.diffusion_batch_mul
        h = h.reshape(b * N, m, d).repeat(r, 1, 1)  # [R, m, d], R = r b N
        words = self.codec.to_codewords(tokens).reshape(b * N, m).repeat(r, 1)  # [R, m]
        R, dev = h.shape[0], h.device
        t = sample_time(cfg, R, dev, generator).to(h.dtype)  # [R]
        if cfg.slot_stagger > 0 and m > 1:  # tau over [0, 1 + s (m-1)] -> per-slot t [R, m]
            t = slot_times(t * (1 + cfg.slot_stagger * (m - 1)), m, cfg.slot_stagger).to(h.dtype)
        if cfg.known_prefix_prob > 0 and m > 1:
            # Some blocks get a clean prefix of k in [1, m) slots (t = 0 there): t -> [R, m].
            k = torch.randint(1, m, (R,), device=dev, generator=generator)
            k = torch.where(
                torch.rand(R, device=dev, generator=generator) < cfg.known_prefix_prob, k, 0
            )
            tm = t if t.dim() == 2 else t[:, None]
            t = torch.where(torch.arange(m, device=dev) < k[:, None], 0.0, tm).to(h.dtype)
        eps = torch.randn((R, m, cfg.num_bits), device=dev, generator=generator, dtype=h.dtype)
        x_t = self.head.noise(words, t, eps)  # (1 - t) x0 + t eps; fused on CUDA
        if self.training and cfg.cond_dropout > 0:
            drop = torch.rand(R, device=dev, generator=generator) < cfg.cond_dropout
            h = torch.where(drop[:, None, None], self.head.null_cond.to(h.dtype), h)
        x_sc = None
        if cfg.self_conditioning:
            use = torch.rand(R, device=dev, generator=generator) < 0.5
            with torch.no_grad():
                first = self.head(x_t, t, h)
            x_sc = torch.where(use[:, None, None], first, torch.zeros_like(first))
        # head + diffusion_loss; fused on CUDA
        return self.head.loss(x_t, t, h, words, x_sc, self._slot_weight())

    # ---- sampling ----------------------------------------------------------------------------
    def sample_block(
        self,
        h: Tensor,
        *,
        steps: int,
        cfg_scale: float,
        temperature: float,
        generator: torch.Generator | None,
        known: Tensor | None = None,
        known_mask: Tensor | None = None,
        commit: float | None = None,
        slot: int | None = None,
        eta: float | None = None,
        shift: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Sample one block per row. h [R, m, d]; known [R, m] ids, known_mask [R, m] bool;
        commit: adaptive denoising threshold (default cfg.sample_commit); slot: h [R, 1, d] is
        that one slot of each block (slot_prefix decoding); eta: sampler stochasticity (default
        cfg.sample_eta); shift: the time shift of the steps (default cfg.sample_shift). Returns
        (ids [R, m], continuous x0 [R, m, B] or logits)."""
        if not self.is_diffusion:
            logits = self.head(h).float()  # [R, m, V]
            if temperature == 0:
                ids = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, -1)
                ids = torch.multinomial(probs.flatten(0, 1), 1, generator=generator)
                ids = ids.view(logits.shape[:-1])
        else:
            kb = None if known is None else self.codec.encode(known, h.dtype)
            words, x = self.head.sample(  # Euler + guidance + repair; one CUDA graph if fused
                h,
                self.codec,
                steps=steps,
                cfg_scale=cfg_scale,
                temperature=temperature,
                generator=generator,
                known=kb,
                known_mask=known_mask,
                commit=self.config.sample_commit if commit is None else commit,
                slot=slot,
                eta=self.config.sample_eta if eta is None else eta,
                shift=self.config.sample_shift if shift is None else shift,
            )
            ids, logits = self.codec.from_codewords(words), x
        if known is not None:
            ids = torch.where(known_mask, known, ids)
        return ids, logits

    def sample_slots(
        self, h: Tensor, seq: Tensor, rem: int, generator: torch.Generator | None, **kw
    ) -> Tensor:
        """slot_prefix decoding of one block, one slot at a time, each slot's condition given the
        tokens sampled before it. h [b, m, d]; seq [b, T] the tokens so far, whose last rem are
        the block's first (known) slots -> the block [b, m]. The head's slots are independent
        (no slot attention): each is sampled alone."""
        P, m = self.config.slot_prefix, self.config.block_size
        block = torch.zeros(h.shape[:2], dtype=torch.long, device=h.device)
        block[:, :rem] = seq[:, seq.shape[1] - rem :]
        T0 = seq.shape[1] - rem  # where the block starts
        hp = h.clone()  # conditions with the prefix, slots 0..j
        for j in range(m):
            hp[:, j] = h[:, j] + self.prefix(seq[:, max(T0 + j - P, 0) : T0 + j])[:, -1]
            if j < rem:
                continue
            hj = self.mix_slots(hp[:, : j + 1])[:, j:] if self.mixer else hp[:, j : j + 1]
            ids, _ = self.sample_block(hj, generator=generator, slot=j, **kw)  # [b, 1]
            block[:, j] = ids[:, 0]
            seq = torch.cat([seq, ids], 1)
        return block

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        steps: int | None = None,
        cfg_scale: float | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool | str = True,
        commit: float | None = None,
        eta: float | None = None,
        shift: float | None = None,
    ) -> Tensor:
        """prompt [b, P] (any P >= 0) -> [b, P + max_new_tokens]. Block by block: sample the next
        block from the conditions, then one backbone call over its m tokens (KV cache).
        use_cache: True or "static" (a preallocated StaticKVCache, the default for decoding),
        "dynamic" (grown by concatenation), False (recompute the whole prefix every block).
        commit: adaptive denoising threshold (default cfg.sample_commit; 1: fixed K).
        eta: sampler stochasticity (default cfg.sample_eta; 0: the ODE).
        shift: the time shift of the steps (default cfg.sample_shift; 1: uniform in t)."""
        cfg = self.config
        steps = cfg.sample_steps if steps is None else steps
        cfg_scale = cfg.cfg_scale if cfg_scale is None else cfg_scale
        m = cfg.block_size
        b, P = prompt.shape
        total = P + max_new_tokens
        n_full, rem = divmod(P, m)
        seq = prompt
        if use_cache not in (True, False, "static", "dynamic"):
            raise ValueError(f"use_cache={use_cache!r}: must be True, False, static or dynamic")
        cache: KVCache | StaticKVCache | None = None
        if use_cache == "dynamic":
            cache = KVCache(cfg.n_layers)
        elif use_cache:
            dtype = self.start.dtype
            cache = StaticKVCache(cfg, b, -(-(total + m) // m) * m, prompt.device, dtype)
        # Conditions for target block n_full: input blocks [S, data blocks 0..n_full-1].
        x = torch.cat([self.start.expand(b, m, -1), self.embed_blocks(prompt[:, : n_full * m])], 1)
        h = self.slot_conditions(self.run_backbone(x, cache)[:, -m:])  # [b, m, d]
        kw = dict(steps=steps, cfg_scale=cfg_scale, temperature=temperature)
        kw |= dict(commit=commit, eta=eta, shift=shift)  # the sampler's settings, every block
        while seq.shape[1] < total:
            known = known_mask = None
            if rem:
                known = torch.zeros(b, m, dtype=torch.long, device=prompt.device)
                known[:, :rem] = seq[:, -rem:]
                known_mask = torch.zeros(b, m, dtype=torch.bool, device=prompt.device)
                known_mask[:, :rem] = True
            if self.prefix_proj is None:
                block, _ = self.sample_block(
                    h, generator=generator, known=known, known_mask=known_mask, **kw
                )
            else:
                block = self.sample_slots(h, seq, rem, generator=generator, **kw)
            seq = torch.cat([seq[:, : seq.shape[1] - rem], block], 1)
            rem = 0
            if seq.shape[1] >= total:
                break
            if use_cache:
                h = self.slot_conditions(self.run_backbone(self.embed_blocks(block), cache))
            else:
                n = seq.shape[1] // m
                x = torch.cat([self.start.expand(b, m, -1), self.embed_blocks(seq[:, : n * m])], 1)
                h = self.slot_conditions(self.run_backbone(x)[:, -m:])
        return seq[:, :total]

    # ---- teacher-forced evaluation -----------------------------------------------------------
    def block_log_probs(
        self, h: Tensor, target: Tensor, chain: bool, generator: torch.Generator | None = None
    ) -> Tensor:
        """log p(target slot | context ...) in nats, [R, m], for conditions h [R, m, d] and
        target ids [R, m]. Softmax head: exact. Diffusion head: the t = 1 prediction read as
        independent bits P(bit = 1) = (1 + x0_hat)/2, renormalised over the valid codes
        (method.md section 5); chain=False gives the mean-field factor of every slot at once,
        chain=True the chain rule p(slot j | context, slots < j), the earlier slots held known
        (clean, t = 0) as known_prefix_prob trains. Either way a proper distribution."""
        if not self.is_diffusion:
            logits = self.head(h).double()  # [R, m, V]
            return torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]
        R, m, _ = h.shape
        x1 = _randn((R, m, self.config.num_bits), h, generator)
        clean = self.codec.encode(target, h.dtype)  # [R, m, B]
        slots = torch.arange(m, device=h.device)
        out = []
        for j in range(m if chain else 1):
            known = slots < j  # [m]
            x = torch.where(known[None, :, None], clean, x1)
            t = (~known).to(h.dtype).expand(R, m)  # 0 on known slots, 1 elsewhere
            x0 = self.head(x, t if j else t[:, 0], h)
            lp = self.codec.mean_field_log_prob((1 + x0.double().clamp(-1, 1)) / 2, target)
            out.append(lp[:, j] if chain else lp)
        return torch.stack(out, 1) if chain else out[0]

    @torch.no_grad()
    def evaluate(
        self,
        tokens: Tensor,
        steps: int | None = None,
        cfg_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Teacher-forced metrics on tokens [b, L] given the true context (method.md section 5).

        Every model is decoded twice, the same way: greedy (softmax: argmax; diffusion: the
        deterministic ODE from x_1 = 0, i.e. temperature 0) and sampled (temperature 1).
        Returns sums to aggregate over batches: "tokens", "blocks", and per decoding
        d in (greedy, sampled): "bits_correct_d", "slot_correct_d" [m], "blocks_exact_d",
        "invalid_codes_d", "token_correct_d" [b, L] (bool); "nll_bits" (exact cross-entropy for
        softmax heads, the mean-field bound for diffusion), "nll_slot_bits" [m] (its per-slot
        parts) and "nll_chain_bits" (the chain rule
        over the slots; equal to nll_bits for softmax heads)."""
        cfg = self.config
        steps = cfg.sample_steps if steps is None else steps
        cfg_scale = cfg.cfg_scale if cfg_scale is None else cfg_scale
        h = self.conditions(tokens)  # [b, N, m, d]
        b, N, m, d = h.shape
        flat = h.reshape(b * N, m, d)
        target = tokens.reshape(b * N, m)
        out: dict[str, Tensor] = {
            "tokens": torch.tensor(target.numel()),
            "blocks": torch.tensor(b * N),
        }
        target_bits = self.codec.encode(target)
        for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
            pred, x = self.sample_block(
                flat, steps=steps, cfg_scale=cfg_scale, temperature=temperature, generator=generator
            )
            invalid = torch.zeros((), dtype=torch.long)
            if self.is_diffusion:
                invalid = (self.codec.bits_to_words(x) >= cfg.vocab_size).sum()
            correct = pred == target  # [R, m]
            out[f"bits_correct_{name}"] = (self.codec.encode(pred) == target_bits).sum()
            out[f"slot_correct_{name}"] = correct.sum(0)
            out[f"blocks_exact_{name}"] = correct.all(-1).sum()
            out[f"invalid_codes_{name}"] = invalid
            out[f"token_correct_{name}"] = correct.view(b, N * m)
        slot_bits = -self.block_log_probs(flat, target, False, generator).sum(0) / math.log(2)
        mean_field = slot_bits.sum()
        out["nll_bits"] = mean_field
        out["nll_slot_bits"] = slot_bits  # [m]
        if self.is_diffusion and m > 1:
            chain = -self.block_log_probs(flat, target, True, generator).sum() / math.log(2)
        else:
            chain = mean_field
        out["nll_chain_bits"] = chain
        return out

    @torch.no_grad()
    def condition_gain(
        self, tokens: Tensor, ts: tuple[float, ...], generator: torch.Generator | None = None
    ) -> dict[float, tuple[float, float]]:
        """How much the diffusion head uses the context: per t, its x0-MSE on the blocks of
        tokens [b, L] with the true conditions and with the null condition (the one condition
        dropout trains), at the same noise. -> {t: (loss_true, loss_null)}."""
        h = self.conditions(tokens)
        b, N, m, d = h.shape
        flat = h.reshape(b * N, m, d)
        x0 = self.codec.encode(tokens.reshape(b * N, m), h.dtype)
        eps = _randn(x0.shape, h, generator)
        null = self.head.null_cond.to(h.dtype).expand_as(flat)
        res = {}
        for t in ts:
            tt = torch.full((b * N,), t, dtype=h.dtype, device=h.device)
            x_t = (1 - t) * x0 + t * eps
            true_loss = float(((self.head(x_t, tt, flat) - x0) ** 2).mean())
            null_loss = float(((self.head(x_t, tt, null) - x0) ** 2).mean())
            res[t] = (true_loss, null_loss)
        return res

    # ---- accounting --------------------------------------------------------------------------
    def num_params(self, part: str = "all") -> int:
        mod = {"all": self, "backbone": self.backbone, "head": self.head}[part]
        return sum(p.numel() for p in mod.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: forward + backward = 3x forward, 2 FLOPs per MAC, matmuls.
        Backbone and input MLP: 6 N + 12 n_layers d L (attention scores and values, full
        attention counted, as in PaLM/nanochat). Diffusion head: 6 x its weights per slot, plus
        its slot attention, times diffusion_batch_mul (x1.5 with self-conditioning's extra
        forward). Softmax head: 6 d V."""
        cfg = self.config
        weights = lambda mod: sum(p.numel() for p in mod.parameters() if p.dim() == 2)
        n_lin = weights(self.backbone) + (weights(self.input) if cfg.input == "bits" else 0)
        if self.prefix_proj is not None:
            n_lin += weights(self.prefix_proj) + weights(self.mixer)
        flops = 6 * n_lin + 12 * cfg.n_layers * cfg.d_model * seq_len
        if self.is_diffusion:
            head_w = weights(self.head) - self.head.slot_pos.numel()
            attn = 0 if cfg.slot_prefix else 4 * cfg.head_depth * cfg.head_width * cfg.block_size
            passes = cfg.diffusion_batch_mul * (1.5 if cfg.self_conditioning else 1.0)
            flops += 3 * (2 * head_w + attn) * passes
        else:
            flops += 6 * cfg.d_model * cfg.vocab_size
        return float(flops)

    # ---- consolidated checkpoints ------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write model.safetensors + config.json + code_table.json (atomically, no pickle)."""
        save_pretrained(self, self.config, self.codec.table, path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str = "cpu") -> BitLM:
        return load_pretrained(cls, path, map_location)
