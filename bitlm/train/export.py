"""Export a training checkpoint (any ZeRO stage) to the consolidated ``save_pretrained`` format.

The fp32 master weights are gathered from the ZeRO optimizer shards on CPU
(``deepspeed.utils.zero_to_fp32``), so this needs no GPU and no process group. The shards are
read with ``weights_only=True`` (``safeload``): a file holding anything but tensors and plain
data is refused, never executed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..codec import CodeTable
from ..model import BitLM
from ..recipe import from_dict
from .config import TrainRecipe
from .data import open_fs
from .launch import latest_checkpoint
from .safeload import weights_only_loads
from .worker import DS_TAG, STATE_FILE

__all__ = ["export_checkpoint", "load_checkpoint_model", "resolve_checkpoint"]


def resolve_checkpoint(run: str, storage_path: str = "runs") -> str:
    """A checkpoint folder, a run folder (its latest checkpoint), or a run name under
    ``storage_path`` -> the checkpoint folder (local path or s3:// URI)."""
    candidates = [run] if ("://" in run or Path(run).exists()) else []
    candidates.append(f"{storage_path.rstrip('/')}/{run}")
    for c in candidates:
        fs, base = open_fs(c)
        if fs.get_file_info(f"{base}/{STATE_FILE}").type.name == "File":
            return c
        latest = latest_checkpoint(c)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no checkpoint found for {run!r} (looked in {candidates})")


def _local_copy(ckpt: str) -> tuple[Path, Path | None]:
    if "://" not in ckpt:
        return Path(ckpt), None
    import pyarrow.fs as pafs

    tmp = Path(tempfile.mkdtemp(prefix="bitlm-export-"))
    fs, base = open_fs(ckpt)
    pafs.copy_files(
        base, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
    )
    return tmp, tmp


def load_checkpoint_model(ckpt: str) -> tuple[BitLM, TrainRecipe, dict]:
    """Rebuild the model from a checkpoint; returns (model, recipe, trainer state)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    local, tmp = _local_copy(ckpt)
    try:
        import yaml

        recipe = from_dict(TrainRecipe, yaml.safe_load((local / "recipe.yaml").read_text()))
        table = CodeTable.from_json((local / "code_table.json").read_text())
        state = json.loads((local / STATE_FILE).read_text())
        with weights_only_loads(ckpt):  # DeepSpeed's shards are pickles: no code runs
            sd = get_fp32_state_dict_from_zero_checkpoint(str(local), tag=DS_TAG)
        model = BitLM(recipe.model, table)
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        return model.eval(), recipe, state
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def export_checkpoint(run: str, out: str | Path, storage_path: str = "runs") -> Path:
    """Write ``out`` = model.safetensors + config.json + code_table.json + tokenizer.json +
    recipe.yaml + trainer_state.json."""
    ckpt = resolve_checkpoint(run, storage_path)
    model, _, _ = load_checkpoint_model(ckpt)
    out = Path(out)
    model.save_pretrained(out)
    fs, base = open_fs(ckpt)
    for name in ("tokenizer.json", "recipe.yaml", STATE_FILE):
        with fs.open_input_stream(f"{base}/{name}") as f:
            (out / name).write_bytes(f.read())
    return out
