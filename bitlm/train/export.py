"""Export a training checkpoint (any ZeRO stage) to the consolidated ``save_pretrained`` format.

The checkpoint contract (finding the latest complete checkpoint, gathering the fp32 master
weights on CPU with the shards read weights-only) is ``bitlm.checkpoint``'s; this module adds
run-name resolution and the typed recipe.
"""

from __future__ import annotations

from pathlib import Path

from .. import checkpoint
from ..model import BitLM
from ..recipe import from_dict
from .config import TrainRecipe
from .data import open_fs

__all__ = ["export_checkpoint", "load_checkpoint_model", "resolve_checkpoint"]


def resolve_checkpoint(run: str, storage_path: str = "runs") -> str:
    """A checkpoint folder, a run folder (its latest complete checkpoint), or a run name under
    ``storage_path`` -> the checkpoint folder (local path or s3:// URI)."""
    candidates = [run] if ("://" in run or Path(run).exists()) else []
    candidates.append(f"{storage_path.rstrip('/')}/{run}")
    for c in candidates:
        fs, base = open_fs(c)
        if fs.get_file_info(f"{base}/{checkpoint.STATE_FILE}").type.name == "File":
            if checkpoint.is_complete(c):
                return c
            raise FileNotFoundError(f"{c}: an unfinished checkpoint (no {checkpoint.MARKER})")
        latest = checkpoint.latest_complete(c)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no checkpoint found for {run!r} (looked in {candidates})")


def load_checkpoint_model(ckpt: str) -> tuple[BitLM, TrainRecipe, dict]:
    """Rebuild the model from a checkpoint; returns (model, recipe, trainer state)."""
    model, recipe, state = checkpoint.load_model(ckpt)
    recipe.pop("test", None)  # the test hooks of checkpoints written before tests owned them
    return model, from_dict(TrainRecipe, recipe), state


def export_checkpoint(run: str, out: str | Path, storage_path: str = "runs") -> Path:
    """Write ``out`` = model.safetensors + config.json + code_table.json + tokenizer.json +
    recipe.yaml + trainer_state.json."""
    return checkpoint.export(resolve_checkpoint(run, storage_path), out)
