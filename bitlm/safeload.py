"""Loading DeepSpeed checkpoints without executing code from them.

DeepSpeed saves its ZeRO shards with ``torch.save`` (pickles) and reads them back with
``torch.load(weights_only=False)``: a crafted ``.pt`` file runs arbitrary code when loaded.
``weights_only_loads()`` forces every ``torch.load`` inside it to ``weights_only=True``
(torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, which overrides an explicit ``weights_only=False``),
allowing only tensors, plain containers and the three plain-data DeepSpeed types its shards
hold (an int enum, the loss-scaler record, a (start, numel) dataclass). Anything else is
refused with ``UnsafeCheckpointError`` before any of it runs.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import threading
from collections.abc import Iterator

from .pretrained import CheckpointError

__all__ = ["UnsafeCheckpointError", "weights_only_loads"]

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_LOCK = threading.RLock()


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds more than tensors and plain data: not loaded."""


def _deepspeed_types() -> list[type]:
    out: list[type] = []
    for mod, name in (
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ):
        with contextlib.suppress(ImportError, AttributeError):
            out.append(getattr(__import__(mod, fromlist=[name]), name))
    return out


@contextlib.contextmanager
def weights_only_loads(what: str = "checkpoint") -> Iterator[None]:
    """Inside: every torch.load is weights_only=True (DeepSpeed's included)."""
    import torch

    with _LOCK:
        old = os.environ.get(_FORCE)
        os.environ[_FORCE] = "1"
        try:
            with torch.serialization.safe_globals(_deepspeed_types()):
                yield
        except pickle.UnpicklingError as e:
            g = re.search(r"GLOBAL ([\w.]+?)\.? was not an allowed", str(e))
            m = re.search(r"WeightsUnpickler error: ([^\n]*)", str(e))
            why = f"it calls {g.group(1)}" if g else (m.group(1).strip() if m else "unknown type")
            raise UnsafeCheckpointError(
                f"{what}: refusing to load a file that holds more than tensors "
                f"(weights_only=True): {why[:300]}"
            ) from None
        finally:
            if old is None:
                os.environ.pop(_FORCE, None)
            else:
                os.environ[_FORCE] = old
