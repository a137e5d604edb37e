"""The training checkpoint contract: layout, step naming, discovery, the commit marker, and
consolidation (docs/training.md, Checkpoints).

    <run_dir>/checkpoint_<step:08d>/     run_dir: <storage_path>/<name>, a local folder or s3://
        trainer_state.json  recipe.yaml  tokenizer.json  code_table.json
        rng/rank_<r>.pt  latest  ds/...  (DeepSpeed's files, tag ``ds``)  zero_to_fp32.py
        _COMMITTED.json     written last, by rank 0, after every rank's files are in storage

A folder is complete when its marker names its step. A folder without one is an interrupted
save: it is never resumed from, evaluated or exported, and discovery falls back to the previous
complete step. Folders written before the marker existed (no ``checkpoint_format`` in their
trainer state) are accepted when the old rule holds: the trainer state, every rank's RNG state
and every rank's ZeRO shards are there (a one-line warning per folder).

A leaf: pyarrow, torch and bitlm's model code; DeepSpeed only inside consolidation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from .storage import open_fs

log = logging.getLogger("bitlm.checkpoint")

__all__ = [
    "DS_TAG",
    "FORMAT",
    "MARKER",
    "STATE_FILE",
    "commit",
    "consolidate",
    "dir_name",
    "export",
    "is_complete",
    "latest_complete",
    "list_complete",
    "list_steps",
    "load_model",
    "local_copy",
    "path_of",
    "prune",
    "read_state",
    "step_of",
    "write_state",
]

DS_TAG = "ds"  # DeepSpeed's tag: its files go to <checkpoint>/ds/
STATE_FILE = "trainer_state.json"
MARKER = "_COMMITTED.json"
FORMAT = 2  # trainer_state.json's checkpoint_format: 2 = complete only with MARKER
_PREFIX = "checkpoint_"
_warned: set[str] = set()


def dir_name(step: int) -> str:
    """The folder name of step ``step``'s checkpoint."""
    return f"{_PREFIX}{step:08d}"


def path_of(run_dir: str, step: int) -> str:
    """The checkpoint folder of step ``step`` in ``run_dir`` (local path or s3:// URI)."""
    return f"{run_dir.rstrip('/')}/{dir_name(step)}"


def step_of(path: str) -> int:
    """The step of a checkpoint folder (path or name), -1 if it is not one."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if not name.startswith(_PREFIX):
        return -1
    try:
        return int(name[len(_PREFIX) :])
    except ValueError:
        return -1


def list_steps(run_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every checkpoint folder of a run, complete or not, by step."""
    fs, base = open_fs(run_dir)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError:
        return []
    out = [
        (step_of(i.base_name), path_of(run_dir, step_of(i.base_name)))
        for i in infos
        if i.type == pafs.FileType.Directory and step_of(i.base_name) >= 0
    ]
    return sorted(out)


def _read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def read_state(ckpt: str) -> dict[str, Any]:
    """The trainer state of a checkpoint folder (OSError, ValueError when unreadable)."""
    fs, base = open_fs(ckpt)
    return _read_json(fs, f"{base}/{STATE_FILE}")


def write_state(local_dir: str | Path, state: dict[str, Any]) -> None:
    """Write ``trainer_state.json`` into a (local) folder being saved, tagged with FORMAT."""
    (Path(local_dir) / STATE_FILE).write_text(
        json.dumps({**state, "checkpoint_format": FORMAT}, indent=1)
    )


def is_complete(ckpt: str) -> bool:
    """True if ``ckpt`` may be resumed from, evaluated and exported (see the module doc)."""
    fs, base = open_fs(ckpt)
    try:
        if fs.get_file_info(f"{base}/{MARKER}").type == pafs.FileType.File:
            return int(_read_json(fs, f"{base}/{MARKER}")["step"]) == step_of(ckpt)
        state = _read_json(fs, f"{base}/{STATE_FILE}")
        if "checkpoint_format" in state:  # a save in progress, or interrupted
            return False
        ok = _legacy_complete(fs, base, int(state["world_size"]))
    except (OSError, KeyError, ValueError, TypeError):
        return False
    if ok and ckpt not in _warned:
        _warned.add(ckpt)
        log.warning("%s: written before commit markers; complete by the old rule", ckpt)
    return ok


def _legacy_complete(fs: pafs.FileSystem, base: str, world: int) -> bool:
    """The rule before markers: every rank's RNG state and optimizer shard
    (``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt``), and the model states
    (``mp_rank_00_model_states.pt``, or per rank under ZeRO-3)."""
    rng = [f"{base}/rng/rank_{r}.pt" for r in range(world)]
    if any(i.type != pafs.FileType.File for i in fs.get_file_info(rng)):
        return False
    names = {
        i.base_name
        for i in fs.get_file_info(pafs.FileSelector(f"{base}/{DS_TAG}"))
        if i.type == pafs.FileType.File
    }
    for r in range(world):
        tail = f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        if not any(n.endswith(tail) for n in names):
            return False
    per_rank = all(f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" in names for r in range(world))
    return "mp_rank_00_model_states.pt" in names or per_rank


def list_complete(run_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every complete checkpoint of a run, by step."""
    return [(s, c) for s, c in list_steps(run_dir) if is_complete(c)]


def latest_complete(run_dir: str) -> str | None:
    """The newest complete checkpoint folder of a run (newer incomplete ones are skipped)."""
    skipped = []
    for _, c in reversed(list_steps(run_dir)):
        if is_complete(c):
            if skipped:
                log.warning("%s: no %s (a save interrupted): using %s", skipped[0], MARKER, c)
            return c
        skipped.append(c)
    return None


def commit(ckpt: str, step: int, world_size: int) -> None:
    """Write the marker of ``ckpt`` (rank 0, after a barrier that follows every rank's save):
    step, world size, time and the folder's files with their sizes, written to a temporary
    name and moved into place."""
    fs, base = open_fs(ckpt)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    files = {
        i.path[len(base) + 1 :]: i.size
        for i in infos
        if i.type == pafs.FileType.File and i.base_name != MARKER
    }
    body = {"step": step, "world_size": world_size, "time": time.time(), "files": files}
    tmp = f"{base}/.{MARKER}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(body, indent=1, sort_keys=True).encode())
    fs.move(tmp, f"{base}/{MARKER}")


def prune(run_dir: str, keep: int) -> None:
    """Delete every checkpoint folder older than the ``keep``-th newest complete one (for
    storage no one else manages; under Ray Train its CheckpointConfig does this)."""
    complete = list_complete(run_dir)
    if len(complete) < keep:
        return
    oldest_kept = complete[-keep][0]
    for step, c in list_steps(run_dir):
        if step < oldest_kept:
            fs, base = open_fs(c)
            fs.delete_dir(base)


@contextlib.contextmanager
def local_copy(ckpt: str) -> Iterator[Path]:
    """A local folder holding ``ckpt``: the folder itself, or a temporary copy of an s3:// one."""
    if "://" not in ckpt:
        yield Path(open_fs(ckpt)[1])
        return
    tmp = tempfile.mkdtemp(prefix="bitlm-ckpt-")
    try:
        fs, base = open_fs(ckpt)
        pafs.copy_files(
            base, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(ckpt: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Rebuild the model of a complete checkpoint from the fp32 master weights of any ZeRO
    stage, gathered on CPU (``deepspeed.utils.zero_to_fp32``, shards read weights-only);
    returns (BitLM in eval mode, the recipe as a dict, the trainer state)."""
    import yaml
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from .codec import CodeTable
    from .config import ModelConfig
    from .model import BitLM
    from .recipe import from_dict
    from .safeload import weights_only_loads

    if not is_complete(ckpt):
        raise FileNotFoundError(f"{ckpt}: not a complete checkpoint (no {MARKER})")
    with local_copy(ckpt) as local:
        recipe = yaml.safe_load((local / "recipe.yaml").read_text())
        table = CodeTable.from_json((local / "code_table.json").read_text())
        state = json.loads((local / STATE_FILE).read_text())
        with weights_only_loads(ckpt):  # DeepSpeed's shards are pickles: no code runs
            sd = get_fp32_state_dict_from_zero_checkpoint(str(local), tag=DS_TAG)
    model = BitLM(from_dict(ModelConfig, recipe.get("model", {}), "model."), table)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval(), recipe, state


def _write_export(ckpt: str, out: Path) -> None:
    model, _, _ = load_model(ckpt)
    model.save_pretrained(out)
    fs, base = open_fs(ckpt)
    for name in ("tokenizer.json", "recipe.yaml", STATE_FILE):  # state last: the marker
        with fs.open_input_stream(f"{base}/{name}") as f:
            (out / name).write_bytes(f.read())


def export(ckpt: str, out: str | Path) -> Path:
    """Write ``out`` = model.safetensors + config.json + code_table.json (``save_pretrained``)
    + tokenizer.json + recipe.yaml + trainer_state.json."""
    out = Path(out)
    _write_export(ckpt, out)
    return out


def consolidate(ckpt: str, out: Path) -> Path:
    """``export`` into ``out`` atomically, once: a finished folder (its trainer state is
    written last) is reused."""
    if (out / STATE_FILE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_export(ckpt, tmp / "m")
        shutil.rmtree(out, ignore_errors=True)
        (tmp / "m").rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
