"""BitLM: bitwise block-diffusion language models (arXiv 2605.11577).

The names below load on first use, so that importing a leaf such as ``bitlm.dataset_format``
(preprocessing's Ray workers) or ``bitlm.tracking`` does not load torch and the model."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .codec import BitCodec, CodeTable
    from .config import ModelConfig
    from .model import BitLM

__all__ = ["BitCodec", "BitLM", "CodeTable", "ModelConfig"]

_MODULE_OF = {"BitCodec": "codec", "CodeTable": "codec", "ModelConfig": "config", "BitLM": "model"}


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
