"""Corpus preprocessing on Ray tasks: read -> normalise -> filter -> dedup -> tokenise -> bit-encode
-> pack -> Parquet shards + manifest (docs/preprocessing.md, docs/dataset-format.md).

Public API: ``run_preprocess(config) -> summary``, ``verify(dataset) -> report``,
``decode_dataset(dataset, split) -> list[str]``, ``PreprocessConfig`` / ``load_config``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PreprocessConfig", "decode_dataset", "load_config", "run_preprocess", "verify"]


def __getattr__(name: str) -> Any:
    # Lazy, so that Ray workers importing pipeline.units never load the driver (or torch).
    if name in ("PreprocessConfig", "load_config"):
        from pipeline import config

        return getattr(config, name)
    raise AttributeError(name)


def run_preprocess(config: Any) -> dict[str, Any]:
    """Process the inputs of ``config`` (a PreprocessConfig) not yet in its dataset."""
    from pipeline.driver import run_preprocess as run

    return run(config)


def verify(dataset_path: str, sample_units: int = 2) -> dict[str, Any]:
    """Check a dataset against its manifest; ``report["ok"]`` is the verdict."""
    from pipeline.verify import verify as check

    return check(dataset_path, sample_units)


def decode_dataset(dataset_path: str, split: str = "train") -> list[str]:
    """Every document of a split, decoded back to text, in manifest order."""
    from pipeline.verify import decode_dataset as dec

    return dec(dataset_path, split)
