"""Fused Triton kernels for the diffusion head (issue 6).

The reference PyTorch head in bitlm/head.py stays the source of truth; these kernels compute the
same functions with fewer launches and fewer round trips to memory:

- bits.py:   code words -> +1/-1 bits -> x_t = (1-t) x0 + t eps in one pass; sign() + exact
             invalid-code repair (the codec's digit DP) per row of B bits.
- mlp.py:    LayerNorm + adaLN modulation (forward/backward), a GEMM with fused epilogues
             (bias + SiLU, bias + gated residual, SiLU-gradient; tiles autotuned for large bf16
             GEMMs), the attention output projection with its gated residual, and the head's
             whole adaLN MLP sub-block (modulate, linear, SiLU, linear, gated residual) as one
             autograd.Function.
- loss.py:   x0-MSE / v-loss on the head's pre-squash output (tanh, bits recomputed from the code
             words, weighting) with its gradient, in one kernel.
Every kernel takes tensors and returns tensors. The head's forward over these pieces (walking a
DiffusionHead's modules), the fused training loss and the CUDA-graph sampler sit beside
DiffusionHead in bitlm/head.py, which also dispatches: the fused path runs on CUDA tensors when
ModelConfig.fused_head is True and Triton imports, and not under autocast or ZeRO-3 (partitioned
parameters); the reference path runs everywhere else. On
CPU the kernels run only in Triton's interpreter (TRITON_INTERPRET=1), which the tests use.
"""

from __future__ import annotations

import os

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without Triton
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "interpreting"]


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
