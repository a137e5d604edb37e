"""Evaluation of training checkpoints into MLflow, and run comparison.

Training-side code (imports MLflow, and Ray for the automatic watcher, lazily); the model
itself stays in bitlm.model. docs/evaluation.md describes the metrics and the commands."""

from .evaluate import EvalError, EvalSettings, evaluate_run, watch

__all__ = ["EvalError", "EvalSettings", "evaluate_run", "watch"]
