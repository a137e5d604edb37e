"""BitLM: bitwise block-diffusion language models (arXiv 2605.11577)."""

from .codec import BitCodec, CodeTable
from .config import ModelConfig
from .model import BitLM

__all__ = ["BitCodec", "BitLM", "CodeTable", "ModelConfig"]
