"""Distributed pre-training: Ray Train drives DeepSpeed ZeRO workers, tracked in MLflow.

Imports Ray, DeepSpeed and MLflow lazily, so `bitlm` itself never needs them."""

from .config import TrainRecipe, load_train_recipe
from .data import DataError, Dataset, Manifest
from .launch import RunResult, TrainingAborted, run

__all__ = [
    "DataError",
    "Dataset",
    "Manifest",
    "RunResult",
    "TrainRecipe",
    "TrainingAborted",
    "load_train_recipe",
    "run",
]
