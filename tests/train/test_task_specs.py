"""Credentials never travel inside Ray task specs (issue 12.5): everything jobs/pretrain.py's
driver hands to Ray (the trainer's arguments, its pickled storage filesystem, the watcher task
the job wires beside the run) is serialised as Ray would (cloudpickle) and searched for the
secrets of the environment; they may only be in runtime_env's env_vars. Ray itself is faked: no
cluster is started."""

from __future__ import annotations

import dataclasses
import importlib.util
import uuid

import pytest
from helpers import ROOT, TINY


class _Captured(Exception):
    pass


def _secrets() -> dict[str, str]:
    tag = uuid.uuid4().hex
    return {
        "AWS_ACCESS_KEY_ID": "AKIA" + tag[:16].upper(),
        "AWS_SECRET_ACCESS_KEY": f"aws-secret-{tag}",
        "AWS_SESSION_TOKEN": f"aws-token-{tag}",
        "MLFLOW_TRACKING_TOKEN": f"mlflow-token-{tag}",
    }


def test_no_secret_in_what_the_driver_hands_to_ray(
    ray_local, tiny_data, tmp_path, mlflow_server, monkeypatch
):
    import ray
    import ray.cloudpickle as cloudpickle
    import ray.train.torch

    from bitlm.train import load_train_recipe
    from bitlm.train.launch import _storage

    secrets = _secrets()
    password = f"mlflow-password-{uuid.uuid4().hex}"
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    uri = mlflow_server.uri.replace("http://", f"http://bitlm:{password}@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # credentials inside the URI, too

    specs: dict[str, object] = {}
    envs: list[dict] = []

    class FakeTrainer:
        def __init__(self, train_loop_per_worker, **kw):
            rc = kw["run_config"]
            envs.append(dict(rc.worker_runtime_env or {}))
            kw["run_config"] = dataclasses.replace(rc, worker_runtime_env=None)
            specs["trainer"] = (train_loop_per_worker, kw)

        def fit(self):
            raise _Captured

    class FakeRemote:
        def __init__(self, fn, **options):
            specs["watcher options"] = options

        def options(self, runtime_env=None, **kw):
            envs.append(dict(runtime_env or {}))
            specs["watcher options+"] = kw
            return self

        def remote(self, *args, **kw):
            specs["watcher args"] = (args, kw)
            return "ref"

    def fake_remote(*args, **options):
        return lambda fn: FakeRemote(fn, **options)

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "remote", fake_remote)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    sets = [*TINY, f"data.path={tiny_data}", f"storage_path={tmp_path / 'runs'}", "eval.auto=true"]
    spec = importlib.util.spec_from_file_location("pretrain_job", ROOT / "jobs" / "pretrain.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    argv = ["--config", str(ROOT / "recipes/pretrain/cpu-tiny.yaml"), "--name", "specs"]
    with pytest.raises(_Captured):
        job.main([*argv, *(x for s in sets for x in ("--set", s))])
    assert {"trainer", "watcher args"} <= set(specs), "the job reached neither Ray call"

    s3 = load_train_recipe(None, [*TINY, f"data.path={tiny_data}", "storage_path=s3://b/runs"])
    _, fs, _ = _storage(s3)  # pickled into the trainer's arguments for S3 storage
    specs["s3 filesystem"] = fs

    for what, obj in specs.items():
        blob = cloudpickle.dumps(obj)
        for name, value in [*secrets.items(), ("password in the tracking URI", password)]:
            assert value.encode() not in blob, f"{name} is inside the {what} Ray would get"
    loop_config = specs["trainer"][1]["train_loop_config"]
    assert loop_config["tracking_uri"] == mlflow_server.uri  # no user:password@

    # The secrets were there to leak: they reach the workers through runtime_env only.
    for env in envs:
        got = env.get("env_vars", {})
        assert got.get("AWS_SECRET_ACCESS_KEY") == secrets["AWS_SECRET_ACCESS_KEY"]
        assert got.get("MLFLOW_TRACKING_PASSWORD") == password
        assert got.get("MLFLOW_TRACKING_USERNAME") == "bitlm"


def test_credentials_in_a_recipe_path_are_an_error(tiny_data):
    from bitlm.recipe import RecipeError
    from bitlm.train import load_train_recipe

    for key, value in (
        ("storage_path", "s3://AKIAX:hunter2@bucket/runs"),
        ("data.path", "https://user:hunter2@example.org/data"),
    ):
        over = [*TINY, f"data.path={tiny_data}", f"{key}={value}"]
        with pytest.raises(RecipeError, match=f"{key}: holds credentials") as e:
            load_train_recipe(None, over)
        assert "hunter2" not in str(e.value)
