"""Writes a tiny dataset directly per docs/dataset-format.md (no dependency on pipeline/)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from bitlm.codec import BitCodec, CodeTable

VOCAB = 64
SEQ_LEN = 32
BLOCK = 4


def _tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eod>", "<unk>"])
    tok.train_from_iterator(["the cat sat on the mat", "a bit of text", "hello world"], trainer)
    return tok.to_str()


def pattern_rows(num_rows: int, seq_len: int = SEQ_LEN, vocab: int = VOCAB) -> np.ndarray:
    """Row i is a run of consecutive ids starting at a row-dependent offset (easy to learn)."""
    start = (np.arange(num_rows) * 7) % vocab
    ids = (start[:, None] + np.arange(seq_len)[None, :]) % vocab
    ids[:, 0] = 0  # eod at each row start
    return ids


def write_dataset(
    root: str | Path,
    *,
    train_rows: int = 64,
    val_rows: int = 8,
    rows_per_shard: int = 24,
    row_group_size: int = 8,
    seq_len: int = SEQ_LEN,
    vocab: int = VOCAB,
    table_kind: str = "frequency",
    filesystem=None,
) -> str:
    """Write a dataset folder (local path, or s3:// with ``filesystem`` a pyarrow FS) and
    return its URI."""
    import pyarrow.fs as pafs

    root = str(root)
    if filesystem is None:
        filesystem, base = pafs.LocalFileSystem(), str(Path(root).absolute())
        Path(base).mkdir(parents=True, exist_ok=True)
    else:
        base = root.split("://", 1)[1]
    if table_kind == "frequency":
        table = CodeTable.frequency(list(range(vocab, 0, -1))[::-1], vocab)  # reversed ids
    else:
        table = CodeTable.binary(vocab)
    codec = BitCodec(vocab, table)
    tok_json = _tokenizer_json(vocab)

    def put(rel: str, data: bytes) -> None:
        filesystem.create_dir(f"{base}/{rel}".rsplit("/", 1)[0], recursive=True)
        with filesystem.open_output_stream(f"{base}/{rel}") as f:
            f.write(data)

    put("tokenizer.json", tok_json.encode())
    put("code_table.json", table.to_json().encode())
    shards = []
    for split, n, seed_off in (("train", train_rows, 0), ("val", val_rows, 1000)):
        ids = pattern_rows(n + seed_off, seq_len, vocab)[seed_off:]
        words = codec.to_codewords(ids).numpy().astype(codec.codeword_dtype)
        for k, lo in enumerate(range(0, n, rows_per_shard)):
            chunk = words[lo : lo + rows_per_shard]
            arr = pa.array(list(chunk), type=pa.list_(pa.from_numpy_dtype(chunk.dtype)))
            starts = pa.array([[0]] * len(chunk), type=pa.list_(pa.int32()))
            tbl = pa.table({"codes": arr, "doc_starts": starts})
            sink = pa.BufferOutputStream()
            pq.write_table(tbl, sink, row_group_size=row_group_size)
            data = sink.getvalue().to_pybytes()
            rel = f"shards/{split}/part-{k:05d}.parquet"
            put(rel, data)
            shards.append(
                {
                    "path": rel,
                    "split": split,
                    "rows": len(chunk),
                    "tokens": len(chunk) * seq_len,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "inputs": [f"synthetic/{split}"],
                }
            )
    manifest = {
        "format_version": 1,
        "seq_len": seq_len,
        "block_size": BLOCK,
        "vocab_size": vocab,
        "num_bits": codec.num_bits,
        "codeword_dtype": str(codec.codeword_dtype),
        "eod_id": 0,
        "tokenizer_hash": hashlib.sha256(tok_json.encode()).hexdigest(),
        "code_table_hash": table.hash,
        "shards": shards,
    }
    put("manifest.json", json.dumps(manifest, indent=1).encode())
    return root if "://" in root else str(Path(root).absolute())


# Overrides of recipes/pretrain/cpu-tiny.yaml that make a Ray Train fit as small as it gets.
TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.head_width=32",
    "model.head_depth=1",
    "model.head_heads=2",
    "model.diffusion_batch_mul=2",
    "global_batch_size=8",
    "micro_batch_size=2",
    "num_workers=2",
    "cpus_per_worker=0.5",
    "optim.lr=0.003",
    "schedule.warmup_steps=1",
    "log_every=1",
    "mlflow.log_every=1",
    "mlflow.system_metrics=false",
    "eval.every_steps=0",
    "checkpoint.every_minutes=0",
]


def local_recipe(data, storage, name: str = "local", *extra: str):
    """A TINY recipe for one in-process worker (world size 1, batch 4) on ``data``."""
    from bitlm.train.config import load_train_recipe

    ov = [o for o in TINY if not o.startswith(("num_workers", "cpus_per"))]
    base = ["num_workers=1", "global_batch_size=4", f"data.path={data}", f"storage_path={storage}"]
    return load_train_recipe(None, [*ov, *base, *extra], name)


ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def train(tiny_data: str, storage: Path | str, name: str, *overrides: str, callbacks=()):
    """Run jobs/pretrain.py's library path with the tiny model; ``callbacks`` (tests/train/
    faults.py's) go to every worker's trainer."""
    from bitlm.train import load_train_recipe, run

    if callbacks:
        import faults
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(faults)  # the workers cannot import tests/
    recipe = load_train_recipe(
        None, [*TINY, f"data.path={tiny_data}", f"storage_path={storage}", *overrides], name
    )
    return run(recipe, callbacks=callbacks)


def metric_history(uri: str, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in hist)


def _wait_http(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(url)


class MlflowServer:
    """A real ``mlflow server`` on loopback (one worker, no job execution: environment.md)."""

    def __init__(self, db: Path, artifacts: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db, self.artifacts = db, artifacts
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.db}",
                "--artifacts-destination",
                str(self.artifacts),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait_http(f"{self.uri}/health")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
            self.proc.wait(30)
        self.proc = None
