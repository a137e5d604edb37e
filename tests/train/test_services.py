"""Real services on loopback: an `mlflow server` stopped mid-run (point 6; ZeRO-2), checkpoints
on S3 through a moto server with a ZeRO-3 export (point 7), and the cluster path
`ray start --head` + `ray job submit` (point 5), with the automatic evaluation jobs/pretrain.py
wires beside the run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import ROOT, MlflowServer, free_port, metric_history, train, write_dataset

pytestmark = [pytest.mark.ray, pytest.mark.slow]
BIN = Path(sys.executable).parent


def test_mlflow_server_outage_does_not_stop_training(
    ray_local, tiny_data, tmp_path, mlflow_template, monkeypatch
):
    db = tmp_path / "server.db"
    shutil.copy(mlflow_template, db)
    server = MlflowServer(db, tmp_path / "artifacts")
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    window: dict[str, float] = {}

    def outage() -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.uri)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # wait until training logs step 2, then cut
            try:
                exp = client.get_experiment_by_name("bitlm-pretrain")
                runs = client.search_runs([exp.experiment_id]) if exp else []
                if runs and runs[0].data.metrics.get("tokens_seen", 0) >= 2 * 8 * 32:
                    break
            except Exception:
                pass
            time.sleep(0.2)
        window["down"] = time.time()
        server.stop()
        time.sleep(6)
        window["up"] = time.time()
        server.start()

    t = threading.Thread(target=outage, daemon=True)
    t.start()
    try:
        res = train(
            tiny_data,
            tmp_path / "runs",
            "outage",
            "zero_stage=2",
            "steps=14",
            "checkpoint.every_steps=0",
            "mlflow.flush_timeout_s=60",
        )
        t.join(120)
        assert "up" in window, "the server was never stopped"
        from mlflow.tracking import MlflowClient

        hist = MlflowClient(server.uri).get_metric_history(res.mlflow_run_id, "loss")
        steps = sorted(m.step for m in hist)
        assert steps == list(range(1, 15))  # everything caught up after the outage
        logged_while_down = [
            m for m in hist if window["down"] * 1000 <= m.timestamp <= window["up"] * 1000
        ]
        assert logged_while_down, "training made progress while the server was down"
        losses = [v for _, v in metric_history(server.uri, res.mlflow_run_id)]
        assert losses[-1] < losses[0] - 0.05  # ZeRO-2 trains
        run = MlflowClient(server.uri).get_run(res.mlflow_run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == "outage"
    finally:
        server.stop()


@pytest.mark.s3
def test_s3_checkpoints_and_zero3_export(ray_local, tmp_path, mlflow_uri, monkeypatch):
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        url = f"http://{host}:{port}"
        for k, v in {
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(k, v)
        s3 = pafs.S3FileSystem(
            endpoint_override=url,
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            allow_bucket_creation=True,
        )
        s3.create_dir("bitlm")
        data = write_dataset("s3://bitlm/data/tiny", filesystem=s3)
        res = train(
            data,
            "s3://bitlm/runs",
            "z3",
            "zero_stage=3",
            "steps=6",
            "checkpoint.every_steps=3",
            "checkpoint.keep_last=1",
        )
        assert res.checkpoint == "s3://bitlm/runs/z3/checkpoint_00000006"
        files = {
            i.path for i in s3.get_file_info(pafs.FileSelector("bitlm/runs/z3", recursive=True))
        }
        ck = "bitlm/runs/z3/checkpoint_00000006"
        for name in (
            "trainer_state.json",
            "recipe.yaml",
            "tokenizer.json",
            "code_table.json",
            "rng/rank_0.pt",
            "rng/rank_1.pt",
        ):
            assert f"{ck}/{name}" in files, name
        assert sum("zero_pp_rank" in f and f.startswith(ck) for f in files) >= 2  # both shards
        losses = [v for _, v in metric_history(mlflow_uri, res.mlflow_run_id)]
        assert losses[-1] < losses[0] - 0.05  # ZeRO-3 trains

        import torch

        from bitlm.model import BitLM
        from bitlm.train.callbacks import probe_loss
        from bitlm.train.data import Dataset
        from bitlm.train.export import export_checkpoint

        out = export_checkpoint("z3", tmp_path / "export", storage_path="s3://bitlm/runs")
        model = BitLM.from_pretrained(out)
        state = json.loads((out / "trainer_state.json").read_text())
        recipe_probe = probe_loss(model, Dataset(data, "train"), type("R", (), {"seed": 0})())
        # the exported model reproduces the trained (ZeRO-3 sharded) model's output
        assert recipe_probe == pytest.approx(state["probe_loss"], rel=1e-6, abs=1e-7)
        assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
        # and the CLI does the same
        p = subprocess.run(
            [
                sys.executable,
                str(ROOT / "jobs/pretrain.py"),
                "export",
                "--run",
                res.checkpoint,
                "--out",
                str(tmp_path / "cli-export"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr[-2000:]
        m2 = BitLM.from_pretrained(tmp_path / "cli-export")
        for (k, a), (_, b) in zip(model.state_dict().items(), m2.state_dict().items(), strict=True):
            assert torch.equal(a, b), k
    finally:
        moto.stop()


def _kill_tree_with(marker: str) -> None:
    """End the processes whose command line names our own temp dir (those we started), by id;
    `ray stop` would also stop the session's local Ray and other users' clusters."""
    import psutil

    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and marker in " ".join(p.info["cmdline"] or []):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def test_cluster_path_ray_job_submit(tiny_data, tmp_path, mlflow_uri):
    temp = tempfile.mkdtemp(prefix="bitlm-ray-", dir="/tmp")
    dash = free_port()
    env = dict(
        os.environ,
        PATH=f"{BIN}:{os.environ['PATH']}",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.pop("RAY_ADDRESS", None)
    start = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--num-cpus=2",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--object-store-memory={512 * 1024 * 1024}",
        f"--temp-dir={temp}",
        "--min-worker-port=30000",
        "--max-worker-port=30999",
        "--disable-usage-stats",
    ]
    try:
        p = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
        runtime_env = {
            "env_vars": {
                "MLFLOW_TRACKING_URI": mlflow_uri,
                "RAY_AUTH_MODE": "disabled",
                "DS_ACCELERATOR": "cpu",
                "DS_BUILD_OPS": "0",
            },
            "excludes": [".git", ".venv", "runs", "data", "*.db"],
        }
        storage = tmp_path / "runs"
        p = subprocess.run(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                "--address",
                f"http://127.0.0.1:{dash}",
                "--working-dir",
                str(ROOT),
                "--runtime-env-json",
                json.dumps(runtime_env),
                "--",
                "python",
                "jobs/pretrain.py",
                "--config",
                "recipes/pretrain/cpu-tiny.yaml",
                "--set",
                f"data.path={tiny_data}",
                "--set",
                f"storage_path={storage}",
                "--set",
                "steps=4",
                "--set",
                "num_workers=2",
                "--set",
                "cpus_per_worker=0.5",
                "--set",
                "global_batch_size=8",
                "--set",
                "micro_batch_size=2",
                "--set",
                "mlflow.log_every=1",
                "--set",
                "eval.every_steps=4",
                "--set",
                "eval.auto=true",
                "--name",
                "cluster-run",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
        assert "run cluster-run finished" in p.stdout
        from mlflow.tracking import MlflowClient

        c = MlflowClient(mlflow_uri)
        exp = c.get_experiment_by_name("bitlm-pretrain")
        run = c.search_runs([exp.experiment_id], "tags.mlflow.runName = 'cluster-run'")[0]
        assert run.info.status == "FINISHED"
        assert len(metric_history(mlflow_uri, run.info.run_id)) == 4
        assert "eval/loss" in run.data.metrics
        arts = [f.path for f in c.list_artifacts(run.info.run_id, "samples")]
        assert arts == ["samples/step_00000004.txt"]
        kids = c.search_runs(
            [exp.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
        )  # the watcher the job started beside training, on the cluster
        assert [(k.data.tags["bitlm_eval_step"], k.info.status) for k in kids] == [
            ("4", "FINISHED")
        ]
        assert "val/bits_per_token" in kids[0].data.metrics
        assert (storage / "cluster-run" / "checkpoint_00000004" / "trainer_state.json").is_file()
    finally:
        subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", f"http://127.0.0.1:{dash}"],
            env=env,
            capture_output=True,
            timeout=30,
        )
        _kill_tree_with(temp)
        shutil.rmtree(temp, ignore_errors=True)
