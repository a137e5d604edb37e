"""Training on a Ray cluster of separate nodes that share nothing but S3 (moto on 127.0.0.1) and
an `mlflow server` on loopback (issue 15): 2 workers SPREAD over 2 nodes, ZeRO-2, checkpoints on
S3; the node of rank 0 is lost mid-run, the run waits until a node joins, resumes from the last
checkpoint and logs the uninterrupted run's losses into the same MLflow run; automatic
evaluation runs on the head node, away from both trainers, reading the checkpoints from S3."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from dataclasses import replace

import pytest
from helpers import MlflowServer, metric_history, train, write_dataset

from bitlm import checkpoint
from bitlm.storage import open_fs

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow, pytest.mark.multinode]

BUCKET = "bitlm"
COMMON = [
    "zero_stage=2",
    "steps=6",
    "cpus_per_worker=1",  # a node (1 CPU) holds one worker: a lost node needs a new one
    "placement_strategy=SPREAD",
    "checkpoint.every_steps=3",
    "failure.max_failures=1",
]


@pytest.fixture
def services(ray_cluster, s3_env, mlflow_template, tmp_path, monkeypatch):
    """The dataset and the run storage on S3, MLflow a real server whose artifacts go to S3."""
    import pyarrow.fs as pafs

    s3 = pafs.S3FileSystem(endpoint_override=s3_env, region="us-east-1", allow_bucket_creation=True)
    s3.create_dir(BUCKET)
    prefix = f"s3://{BUCKET}/{tmp_path.name}"
    data = write_dataset(f"{prefix}/data", filesystem=s3)
    shutil.copy(mlflow_template, tmp_path / "server.db")
    server = MlflowServer(tmp_path / "server.db", f"{prefix}/mlartifacts")  # proxied to S3
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    try:
        yield data, f"{prefix}/runs", server.uri
    finally:
        server.stop()


def _pauses_after_commit(flags: str, step: int):
    """A train loop whose ranks each write ``<flags>/rank<r>-<pid>.json`` (their Ray node id)
    at the start of every attempt, and whose rank 0, once step ``step`` is committed, writes
    ``<flags>/paused.json`` and waits there to lose its node (once: the flag stays)."""

    def loop(info):
        import json
        import os
        import time

        import pyarrow.fs as pafs
        import ray

        from bitlm.storage import open_fs
        from bitlm.train import worker

        fs, base = open_fs(flags)
        node = json.dumps({"node_id": ray.get_runtime_context().get_node_id()}).encode()
        with fs.open_output_stream(
            f"{base}/rank{ray.train.get_context().get_world_rank()}-{os.getpid()}.json"
        ) as f:
            f.write(node)
        commit = worker.RaySession.commit

        def pausing(self, s):
            commit(self, s)
            if s == step and fs.get_file_info(f"{base}/paused.json").type == pafs.FileType.NotFound:
                with fs.open_output_stream(f"{base}/paused.json") as f:
                    f.write(node)
                time.sleep(600)

        worker.RaySession.commit = pausing
        worker.train_worker(info)

    return loop


def _nodes_of_ranks(flags: str) -> dict[str, str]:
    """rank<r>-<pid> -> the Ray node id it ran on (see _pauses_after_commit)."""
    import pyarrow.fs as pafs

    fs, base = open_fs(flags)
    out = {}
    for i in fs.get_file_info(pafs.FileSelector(base)):
        if i.base_name.startswith("rank"):
            with fs.open_input_stream(i.path) as f:
                out[i.base_name.removesuffix(".json")] = json.loads(f.read())["node_id"]
    return out


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


def test_node_lost_mid_run_resumes_when_a_node_joins(services, ray_cluster, tmp_path, monkeypatch):
    import cloudpickle
    import pyarrow.fs as pafs
    import ray
    from mlflow.tracking import MlflowClient

    from bitlm.train import launch

    data, storage, uri = services
    t0 = time.monotonic()
    full = train(data, storage, "full", *COMMON)
    t_full = time.monotonic() - t0

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the loop runs in the workers
    flags = f"{storage}/_test"
    monkeypatch.setattr(launch, "train_worker", _pauses_after_commit(flags, 3))
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = train(data, storage, "lost", *COMMON)
        except BaseException as e:
            out["error"] = e

    t0 = time.monotonic()
    th = threading.Thread(target=run, daemon=True)
    th.start()
    fs, path = open_fs(f"{flags}/paused.json")
    gone = pafs.FileType.NotFound
    _wait(lambda: fs.get_file_info(path).type != gone or not th.is_alive(), 240, "no pause")
    assert th.is_alive(), out
    paused_on = json.loads(fs.open_input_stream(path).read())["node_id"]
    first = _nodes_of_ranks(flags)
    workers = {n.node_id for n in ray_cluster.cluster.worker_nodes}
    assert len(first) == 2 and set(first.values()) == workers, "one worker on each worker node"

    ray_cluster.remove(ray_cluster.worker(paused_on))  # the host of rank 0 is gone
    _wait(lambda: not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == paused_on), 60, "dead")
    time.sleep(8)  # one node with room for one worker: the run waits for capacity
    assert th.is_alive()
    run_dir = f"{storage}/lost"
    assert [s for s, _ in checkpoint.list_complete(run_dir)] == [3]
    joined = ray_cluster.add_worker().node_id
    th.join(300)
    t_lost = time.monotonic() - t0
    assert "result" in out, out
    res = out["result"]
    assert res.checkpoint == checkpoint.path_of(run_dir, 6)
    assert [s for s, _ in checkpoint.list_complete(run_dir)] == [3, 6]
    second = {k: v for k, v in _nodes_of_ranks(flags).items() if k not in first}
    assert sorted(k.split("-")[0] for k in second) == ["rank0", "rank1"]  # restarted once
    survivor = (workers - {paused_on}).pop()
    assert set(second.values()) == {survivor, joined}

    a = metric_history(uri, full.mlflow_run_id)
    b = metric_history(uri, res.mlflow_run_id)
    assert [s for s, _ in a] == [1, 2, 3, 4, 5, 6] == [s for s, _ in b]
    assert a == b, f"losses differ after the node loss:\n{a}\n{b}"
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("bitlm-pretrain")
    runs = c.search_runs([exp.experiment_id], "tags.mlflow.runName = 'lost'")
    assert [r.info.run_id for r in runs] == [res.mlflow_run_id]  # one run, not two
    assert runs[0].info.status == "FINISHED"
    arts = {f.path for f in c.list_artifacts(res.mlflow_run_id)}
    assert {"recipe.yaml", "tokenizer.json", "code_table.json"} <= arts  # proxied to S3
    print(f"\n[multinode] uninterrupted run {t_full:.0f} s, node loss + rejoin {t_lost:.0f} s")


def _records_its_node(flag: str):
    """The automatic evaluation's Ray task, writing its Ray node id to ``flag`` (s3://) first."""

    def watch_task(*args):
        import json

        import ray

        from bitlm.eval import evaluate
        from bitlm.storage import open_fs

        fs, path = open_fs(flag)
        with fs.open_output_stream(path) as f:
            f.write(json.dumps({"node_id": ray.get_runtime_context().get_node_id()}).encode())
        return evaluate._watch_task(*args)

    return watch_task


def test_auto_eval_on_another_node_reads_checkpoints_from_s3(services, tmp_path, monkeypatch):
    """The trainers on the two worker nodes, the watcher (0 CPUs) on the head: it reads every
    checkpoint from S3 and logs an eval child run per step, its samples proxied to S3."""
    import cloudpickle
    from helpers import TINY
    from mlflow.tracking import MlflowClient

    from bitlm.eval import evaluate
    from bitlm.train import launch, load_train_recipe, run

    data, storage, uri = services
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    flags = f"{storage}/_test-eval"
    monkeypatch.setattr(launch, "train_worker", _pauses_after_commit(flags, -1))  # no pause
    monkeypatch.setattr(evaluate, "_watch_task", _records_its_node(f"{flags}/watcher.json"))
    over = [*COMMON, "steps=4", "checkpoint.every_steps=2", "eval.auto=true"]
    recipe = load_train_recipe(None, [*TINY, f"data.path={data}", f"storage_path={storage}", *over])
    t0 = time.monotonic()
    res = run(replace(recipe, name="auto"), on_start=evaluate.start_auto_eval)
    t_eval = time.monotonic() - t0

    trainers = set(_nodes_of_ranks(flags).values())
    fs, path = open_fs(f"{flags}/watcher.json")
    with fs.open_input_stream(path) as f:
        watcher = json.loads(f.read())["node_id"]
    assert len(trainers) == 2 and watcher not in trainers
    c = MlflowClient(uri)
    children = c.search_runs(
        [c.get_run(res.mlflow_run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{res.mlflow_run_id}'",
    )
    by_step = {int(r.data.tags["bitlm_eval_step"]): r for r in children}
    assert sorted(by_step) == [2, 4]
    for step, r in by_step.items():
        assert r.info.status == "FINISHED" and "val/loss" in r.data.metrics
        assert r.data.tags["bitlm_eval_checkpoint"] == checkpoint.path_of(res.run_dir, step)
        assert res.run_dir.startswith("s3://")
        arts = {a.path for a in c.list_artifacts(r.info.run_id, "samples")}
        assert "samples/samples.txt" in arts
    print(f"\n[multinode] training + automatic evaluation on the head {t_eval:.0f} s")


def test_node_local_paths_are_named_on_a_cluster(ray_cluster, tiny_data, tmp_path, caplog):
    """A local storage_path, data.path or sqlite MLflow store is one node's disk: on a cluster
    of several nodes the driver names each (an s3:// run and an mlflow server: nothing)."""
    import ray

    from bitlm.train import launch, load_train_recipe

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS: the cluster
    local = load_train_recipe(None, [f"data.path={tiny_data}", f"storage_path={tmp_path}"])
    found = launch._warn_node_local(local, f"sqlite:///{tmp_path}/mlflow.db")
    assert [f.split("=")[0].split(" ")[0] for f in found] == ["storage_path", "data.path", "MLflow"]
    assert "several nodes" in caplog.text
    remote = load_train_recipe(None, ["data.path=s3://b/d", "storage_path=s3://b/runs"])
    assert launch._warn_node_local(remote, "http://127.0.0.1:5000") == []
