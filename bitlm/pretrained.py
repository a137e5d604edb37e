"""Consolidated model checkpoints: model.safetensors + config.json + code_table.json.

This is the format exports and evaluation use. Nothing is pickled; the folder is written under a
temporary name and renamed into place, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .codec import CodeTable
from .config import ModelConfig

M = TypeVar("M", bound=nn.Module)

__all__ = ["CheckpointError", "load_pretrained", "save_pretrained"]

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A consolidated checkpoint is missing, corrupt or does not match its config."""


def save_pretrained(
    model: nn.Module, config: ModelConfig, table: CodeTable, path: str | os.PathLike
) -> None:
    """Write the weights of ``model`` (built from ``config`` and ``table``) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "bitlm"})
        (tmp / "code_table.json").write_text(table.to_json())
        meta = {
            "format_version": FORMAT_VERSION,
            "model": config.to_dict(),
            "code_table_hash": table.hash,
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_pretrained(
    build: Callable[[ModelConfig, CodeTable], M], path: str | os.PathLike, map_location: str = "cpu"
) -> M:
    """The model ``build(config, table)`` with the weights saved in ``path``."""
    path = Path(path)
    for name in ("config.json", "code_table.json", "model.safetensors"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: not a BitLM checkpoint ({name} is missing)")
    try:
        meta = json.loads((path / "config.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        config = ModelConfig.from_dict(meta["model"])
        table = CodeTable.from_json((path / "code_table.json").read_text())
    except CheckpointError:
        raise
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable config or code table: {e}") from None
    if table.hash != meta.get("code_table_hash"):
        raise CheckpointError(f"{path}: code_table.json does not match the hash in config.json")
    try:
        state = load_file(str(path / "model.safetensors"), device=map_location)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt model.safetensors: {e}") from None
    model = build(config, table)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    bad = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or extra or bad:
        raise CheckpointError(
            f"{path}: weights do not match config.json (missing {missing[:5]}, "
            f"unexpected {extra[:5]}, wrong shape {bad[:5]})"
        )
    model.load_state_dict(state)
    return model.to(map_location)
