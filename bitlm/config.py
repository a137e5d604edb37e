"""Typed model configuration. Every choice method.md calls "configurable" is a field here."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from . import recipe
from .codec import num_bits_for

__all__ = ["ModelConfig"]


@dataclass
class ModelConfig:
    """BitLM, the AR baseline (block_size=1, input="embedding", output_head="softmax") and
    BitLM-softmax (output_head="softmax") are all this one config. The defaults are the paper's
    BitLM, the path the fused kernels implement; the best measured quality (docs/quality.md,
    `bitlm-best`) adds slot_prefix=4, slot_mixer=1, input="bit_groups", head_posterior_skip,
    head_width=2 d_model and sample_eta=1 on a dataset with a semantic code table, at a
    decode-speed cost (docs/speed.md)."""

    vocab_size: int = 256
    block_size: int = 4  # m; 1 gives the ordinary causal mask
    # backbone (Llama/Qwen3 style)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 0  # 0: round(8/3 d) up to a multiple of 32
    rope_theta: float = 10_000.0
    qk_norm: bool = True
    norm_eps: float = 1e-6
    # bits: Linear-SiLU-Linear over the B bits; bit_groups: a factored embedding, the sum of one
    # learned vector per g-bit group of the code (ceil(B/g) x 2^g rows, not V); embedding: a
    # V-row table (the AR baseline)
    input: Literal["bits", "bit_groups", "embedding"] = "bits"
    input_mlp_ratio: float = 1.0  # bits: MLP hidden width = ratio x d_model
    input_init_std: float = 0.02  # bits: std of the MLP's first layer (larger: more nonlinear)
    input_group_bits: int = 6  # bit_groups: g
    # order of the tokens of each (shifted) input block: forward (the paper's, BitDance's) or
    # reversed (slot 0 then holds the most recent token, which next-token prediction needs)
    input_block_order: Literal["forward", "reversed"] = "forward"
    slot_embedding: bool = False  # add a learned vector per slot (position mod m) to the input
    # which hidden state conditions slot j of a target block: its own (per_slot, the paper's) or
    # the input block's last one, plus a learned slot vector (last; with input_block_order
    # forward that position holds the most recent token as its own input)
    condition: Literal["per_slot", "last"] = (
        "per_slot"  # add a learned vector per slot (position mod m) to the input
    )
    output_head: Literal["diffusion", "softmax"] = "diffusion"
    # diffusion head
    head_width: int = 128
    head_depth: int = 3
    head_heads: int = 4
    head_mlp_ratio: float = 2.0
    head_cond_input: bool = False  # also add Linear(d -> W)(h) to the head's token stream
    head_squash: bool = True  # x0_hat = tanh(out): predictions stay in (-1, 1)
    # x0_hat = tanh(out + (1 - t) x_t / t^2): the network's output is added to the per-bit
    # posterior log-odds (halved) that x_t alone gives a uniform bit (beyond the paper). At
    # initialisation (out = 0) the head is then the exact denoiser of uniform random bits, and
    # it only has to learn the context's prior logits and the dependence between bits
    head_posterior_skip: bool = False
    fused_head: bool = True  # use the Triton kernels on CUDA when available; False forces eager
    # objective
    # x0_mse (the paper's), v_loss (JiT/BitDance), bit_ce: cross-entropy of each bit under
    # p = (1 + x0_hat)/2 (same minimiser, the posterior mean; needs head_squash)
    loss: Literal["x0_mse", "v_loss", "bit_ce"] = "x0_mse"
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    time_min: float = 0.0  # training t is mapped into [time_min, time_max] (BD3-LM clipping)
    time_max: float = 1.0
    # probability that a training block gets a clean prefix of 1..m-1 known slots (t = 0 there):
    # teaches the head p(slot j | context, slots < j), used by the chain-rule likelihood
    known_prefix_prob: float = 0.0
    # staggered per-slot noise (0: one t per block, the paper's): t_j = clamp(tau - s (m-1-j)),
    # in training and sampling, so each slot is learned given partly revealed predecessors
    slot_stagger: float = 0.0
    # staggered per-bit noise inside each code (0: one t for all bits, the paper's): the head's
    # t is a schedule position tau and bit k (most significant first) is at
    # t_k = clamp(tau (1 + s (B-1)) - s (B-1-k), 0, 1), so the high bits are denoised before the
    # low ones; with a semantic code table this decodes coarse-to-fine, like a hierarchical
    # softmax over the code tree, in the same K steps (each bit moves in 1/(1 + s (B-1)) of them)
    bit_stagger: float = 0.0
    slot_loss_decay: float = 1.0  # weight slot j of the loss by decay^j (1: equal)
    # slot curriculum (0, 0: off, the paper's): slots 1..m-1 enter the loss with weight 0 until
    # training step slot_ramp_start, rising linearly to 1 at slot_ramp_end; slot 0 (next-token
    # prediction) is trained alone first, so the far slots' marginals do not stall it
    slot_ramp_start: int = 0
    slot_ramp_end: int = 0
    # in-block teacher forcing (0: off, the paper's): slot j's condition also gets
    # Linear([e(x_{j-1}); ...; e(x_{j-P})]), the input vectors of the P tokens before it (the
    # true ones in training, the sampled ones in decoding, which then goes slot by slot). The
    # far slots then learn conditionals instead of marginals; the head's slot attention becomes
    # per slot (a slot could otherwise read its own answer in a later slot's condition)
    slot_prefix: int = 0
    # slot_prefix > 0: causal decoder layers over the slots of each block after the prefix is
    # added (slot j reads slots <= j: the prefix vectors of the whole in-block history, not only
    # a linear sum); output projections zero-initialised
    slot_mixer: int = 0
    diffusion_batch_mul: int = 4
    cond_dropout: float = 0.1
    self_conditioning: bool = False
    # sampling defaults
    # K head evaluations per block (the paper: 15). 8 samples as well as 15 and 30; 4 scores
    # better under the quality benchmark's reference trigram, but on a Markov chain with in-block
    # structure it loses 5-9 points of valid transitions, where 8 equals 15 (docs/speed.md)
    sample_steps: int = 8
    cfg_scale: float = 1.0  # 1.0 = conditional only; the paper uses 9.0 at 8B
    # adaptive denoising: a block stops early once every bit's |x0_hat| > sample_commit with a
    # stable sign (1.0: never, the fixed-K sampler)
    sample_commit: float = 1.0
    # stochasticity of the sampler (beyond the paper): 0 is the probability-flow ODE (Euler,
    # which on this path equals DDIM); 1 the ancestral sampler, which draws x_s from the
    # Gaussian posterior q(x_s | x_t, x0 = x0_hat) at every step; in between, DDIM's eta
    sample_eta: float = 0.0
    # time shift of the K steps (SD3, beyond the paper): t -> shift t / (1 + (shift - 1) t); < 1
    # spends more steps at low noise. Measured: fewer or shifted steps sharpen the samples about
    # as a lower temperature would (docs/speed.md), so 1, uniform in t, stays the default
    sample_shift: float = 1.0

    def __post_init__(self) -> None:
        recipe.check_types(self, "model.")  # the recipe's strict types, for ModelConfig(...) too
        if self.ffn_hidden == 0:
            self.ffn_hidden = -(-(8 * self.d_model // 3) // 32) * 32
        self.validate()

    @property
    def num_bits(self) -> int:
        return num_bits_for(self.vocab_size)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        """Raise ValueError naming the first bad value (the types are checked on construction)."""
        positive = (
            "vocab_size",
            "block_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "ffn_hidden",
            "head_width",
            "head_depth",
            "head_heads",
            "diffusion_batch_mul",
            "sample_steps",
            "input_group_bits",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)}: must be >= 1")
        if self.vocab_size < 2:
            raise ValueError("model.vocab_size must be >= 2")
        if self.d_model % self.n_heads or self.head_dim % 2:
            raise ValueError("model.d_model must be divisible by n_heads with an even head_dim")
        if self.n_heads % self.n_kv_heads:
            raise ValueError("model.n_heads must be a multiple of n_kv_heads")
        if self.head_width % self.head_heads:
            raise ValueError("model.head_width must be divisible by head_heads")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError("model.cond_dropout must be in [0, 1)")
        if self.input_group_bits > 16:
            raise ValueError("model.input_group_bits must be <= 16 (2^g rows per group)")
        if min(self.head_mlp_ratio, self.input_mlp_ratio, self.logit_normal_std) <= 0:
            raise ValueError("model.head_mlp_ratio, input_mlp_ratio, logit_normal_std must be > 0")
        if self.input_init_std <= 0:
            raise ValueError("model.input_init_std must be > 0")
        if self.rope_theta <= 0:
            raise ValueError("model.rope_theta must be > 0")
        if not 0.0 <= self.time_min < self.time_max <= 1.0:
            raise ValueError("model.time_min/time_max: need 0 <= time_min < time_max <= 1")
        if not 0.0 < self.slot_loss_decay <= 1.0:
            raise ValueError("model.slot_loss_decay must be in (0, 1]")
        if not 0 <= self.slot_ramp_start <= self.slot_ramp_end:
            raise ValueError(
                "model.slot_ramp_start/end: need 0 <= slot_ramp_start <= slot_ramp_end"
            )
        if self.slot_prefix < 0 or self.slot_mixer < 0:
            raise ValueError("model.slot_prefix and model.slot_mixer must be >= 0")
        if self.slot_mixer and not self.slot_prefix:
            raise ValueError("model.slot_mixer needs slot_prefix >= 1")
        if self.slot_prefix and (self.slot_stagger or self.known_prefix_prob):
            raise ValueError(
                "model.slot_prefix cannot be combined with slot_stagger or known_prefix_prob "
                "(its slots are denoised one at a time, each from its own noise)"
            )
        if not 0.0 <= self.bit_stagger <= 1.0:
            raise ValueError("model.bit_stagger must be in [0, 1]")
        if self.bit_stagger and (self.slot_stagger or self.loss == "v_loss"):
            raise ValueError("model.bit_stagger cannot be combined with slot_stagger or v_loss")
        if not 0.0 <= self.slot_stagger <= 1.0:
            raise ValueError("model.slot_stagger must be in [0, 1]")
        if self.slot_stagger > 0 and (self.time_min, self.time_max) != (0.0, 1.0):
            raise ValueError("model.time_min/time_max cannot be combined with slot_stagger")
        if not 0.0 <= self.sample_eta <= 1.0:
            raise ValueError("model.sample_eta must be in [0, 1]")
        if not 0.0 <= self.sample_commit <= 1.0:
            raise ValueError("model.sample_commit must be in [0, 1]")
        if self.sample_shift <= 0:
            raise ValueError("model.sample_shift must be > 0")
        if self.sample_shift != 1 and self.slot_stagger:
            raise ValueError("model.sample_shift needs slot_stagger=0")
        if not 0.0 <= self.known_prefix_prob <= 1.0:
            raise ValueError("model.known_prefix_prob must be in [0, 1]")
        if self.head_posterior_skip and not self.head_squash:
            raise ValueError("model.head_posterior_skip needs head_squash=true")
        if self.loss == "bit_ce" and not self.head_squash:
            raise ValueError("model.loss=bit_ce needs head_squash=true (x0_hat = tanh(logit/2))")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dict; an unknown key or a bad value is an error naming it."""
        return recipe.from_dict(cls, d, "model.")
