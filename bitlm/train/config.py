"""The pre-training recipe: one typed tree, loaded from YAML with ``--set a.b=c`` overrides
(bitlm.recipe). ``TrainRecipe.validate`` names the first bad field; the resolved recipe is saved
in every checkpoint and logged to MLflow as params."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import ModelConfig
from ..recipe import RecipeError, load_recipe, to_dict

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "EvalConfig",
    "FailureConfig",
    "MlflowConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainRecipe",
    "load_train_recipe",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CREDENTIALS = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@]*@")  # scheme://user[:secret]@


@dataclass
class DataConfig:
    path: str = ""  # dataset folder (local or s3://), see docs/dataset-format.md
    split: str = "train"
    eval_split: str = "val"  # used for eval loss when present; "" disables
    seed: int = 1234  # seeds the global sample permutation (one per epoch)
    allow_fingerprint_change: bool = False  # resume on changed data (explicit override)
    # Which version of a growing dataset (one per preprocessing run) to train on: "pinned" keeps
    # the version the run started with across resumes (a new run takes the newest), "latest"
    # moves a resumed run to the newest, an integer N trains on version N.
    dataset_version: Literal["pinned", "latest"] | int = "pinned"
    row_group_cache: int = 64  # row groups kept in memory per worker
    vocab_from_manifest: bool = True  # set model.vocab_size from the dataset's manifest


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # 0 disables the step policy
    every_minutes: float = 30.0  # 0 disables the time policy
    keep_last: int = 3
    at_end: bool = True


@dataclass
class MlflowConfig:
    enabled: bool = True
    experiment: str = "bitlm-pretrain"
    log_every: int = 10  # steps between metric logs
    system_metrics: bool = True
    flush_timeout_s: float = 30.0  # at the end, how long to wait for an unreachable server


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0 disables; eval loss on eval_split + generated samples
    batches: int = 2
    num_samples: int = 2
    prompt_tokens: int = 8
    new_tokens: int = 16
    # Automatic evaluation of saved checkpoints (bitlm.eval, docs/evaluation.md): a watcher task
    # started by the driver evaluates each selected checkpoint once, into an MLflow child run.
    auto: bool = False
    auto_every_steps: int = 0  # checkpoints whose step is a multiple (final always); 0: all
    reference_run: str = ""  # run (name/id/folder) whose model scores the generated samples


@dataclass
class FailureConfig:
    max_failures: int = 3  # worker/node failures recovered from the last checkpoint
    # Non-retryable guards: the run stops at once with a clear error.
    spike_ratio: float = 0.0  # loss > spike_ratio * EMA(loss) stops the run; 0 disables
    spike_warmup_steps: int = 50  # steps before the spike guard arms
    spike_ema: float = 0.9
    # Steps whose loss or gradients are NaN/inf: DeepSpeed skips their update (the weights stay
    # finite); each is counted and logged (metric nonfinite_steps). This many in a row stop the
    # run (no retry); 0: never stop. A single bad batch is skipped, a diverged run stops.
    max_nonfinite_steps: int = 10


@dataclass
class TrainRecipe:
    """Everything a pre-training run needs. Batch sizes are in sequences; the global batch is
    fixed, so the sample order does not depend on the number of workers."""

    name: str = ""  # run name = Ray Train run = checkpoint folder = MLflow run; "" -> generated
    storage_path: str = "runs"  # local folder or s3://bucket/prefix (RunConfig.storage_path)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    steps: int = 1000  # optimizer steps
    global_batch_size: int = 32  # sequences per optimizer step, all workers together
    micro_batch_size: int = 4  # sequences per forward/backward on one worker
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # How Ray places the workers (ScalingConfig.placement_strategy): PACK fills a node first,
    # SPREAD puts them on different nodes when it can (one node lost costs fewer workers),
    # STRICT_SPREAD always (a relaunch waits until that many nodes have room).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"] = "PACK"
    zero_stage: int = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    seed: int = 0  # model init and the per-step noise of the objective
    log_every: int = 1  # steps between console lines
    peak_tflops_per_device: float = 0.0  # for MFU; 0: 989 (H100 bf16) on GPU, 0.1 on CPU

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived -----------------------------------------------------------------------------
    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)

    @property
    def dtype(self) -> str:
        if self.precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.precision

    @property
    def peak_flops(self) -> float:
        tf = self.peak_tflops_per_device or (989.0 if self.use_gpu else 0.1)
        return tf * 1e12

    def validate(self) -> None:
        """Raise RecipeError naming the first bad field."""

        def bad(key: str, why: str) -> RecipeError:
            return RecipeError(f"{key}={_get(self, key)!r}: {why}")

        if self.name and not _NAME.match(self.name):
            raise bad("name", "use letters, digits, '.', '_' or '-' (at most 128)")
        for key in ("steps", "global_batch_size", "micro_batch_size", "num_workers", "log_every"):
            if _get(self, key) < 1:
                raise bad(key, "must be >= 1")
        if self.zero_stage not in (1, 2, 3):
            raise bad("zero_stage", "must be 1, 2 or 3")
        if self.global_batch_size % (self.micro_batch_size * self.num_workers):
            raise bad(
                "global_batch_size",
                f"must be a multiple of micro_batch_size * num_workers "
                f"({self.micro_batch_size} * {self.num_workers})",
            )
        if self.cpus_per_worker <= 0:
            raise bad("cpus_per_worker", "must be > 0")
        o = self.optim
        if o.lr <= 0:
            raise bad("optim.lr", "must be > 0")
        if not 0 <= o.min_lr_ratio <= 1:
            raise bad("optim.min_lr_ratio", "must be in [0, 1]")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise bad("optim.betas", "must be two numbers in [0, 1)")
        if o.eps <= 0 or o.weight_decay < 0 or o.grad_clip < 0:
            raise bad("optim", "eps must be > 0, weight_decay and grad_clip >= 0")
        s = self.schedule
        if s.warmup_steps < 0 or s.warmup_steps > self.steps:
            raise bad("schedule.warmup_steps", f"must be in [0, steps={self.steps}]")
        if not 0 < s.decay_fraction <= 1:
            raise bad("schedule.decay_fraction", "must be in (0, 1]")
        c = self.checkpoint
        if c.every_steps < 0 or c.every_minutes < 0:
            raise bad("checkpoint", "every_steps and every_minutes must be >= 0")
        if c.keep_last < 1:
            raise bad("checkpoint.keep_last", "must be >= 1")
        if self.mlflow.log_every < 1:
            raise bad("mlflow.log_every", "must be >= 1")
        v = self.data.dataset_version
        if isinstance(v, int) and v < 1:
            raise bad("data.dataset_version", "must be pinned, latest or a version >= 1")
        if self.failure.max_failures < -1:
            raise bad("failure.max_failures", "must be >= -1 (-1: unlimited)")
        if self.failure.spike_ratio < 0:
            raise bad("failure.spike_ratio", "must be >= 0 (0 disables)")
        if not 0 < self.failure.spike_ema < 1:
            raise bad("failure.spike_ema", "must be in (0, 1)")
        if self.failure.max_nonfinite_steps < 0:
            raise bad("failure.max_nonfinite_steps", "must be >= 0 (0: never stop)")
        e = self.eval
        if e.every_steps < 0 or e.batches < 1 or e.num_samples < 0:
            raise bad("eval", "every_steps >= 0, batches >= 1, num_samples >= 0")
        if e.prompt_tokens < 0 or e.new_tokens < 1:
            raise bad("eval", "prompt_tokens >= 0 and new_tokens >= 1")
        if e.auto_every_steps < 0:
            raise bad("eval.auto_every_steps", "must be >= 0 (0: every checkpoint)")
        if not self.storage_path:
            raise bad("storage_path", "must be a folder or s3:// URI")
        for key in ("storage_path", "data.path"):
            if _CREDENTIALS.match(_get(self, key)):
                raise RecipeError(
                    f"{key}: holds credentials (scheme://user:secret@...): give them through "
                    "the environment (AWS_*); a recipe is logged to MLflow and sent to every "
                    "worker"
                )

    # ---- I/O ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat_params(self) -> dict[str, str]:
        """Dotted key -> string, for MLflow params."""
        out: dict[str, str] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(f"{prefix}{k}.", v)
            else:
                out[prefix.rstrip(".")] = str(node)

        walk("", self.to_dict())
        return out


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def load_train_recipe(
    path: str | Path | None, overrides: list[str] | None = None, name: str | None = None
) -> TrainRecipe:
    """YAML recipe + ``--set`` overrides (+ ``--name``) -> a validated TrainRecipe."""
    extra = list(overrides or [])
    if name:
        extra.append(f"name={name}")
    return load_recipe(TrainRecipe, path, extra)
