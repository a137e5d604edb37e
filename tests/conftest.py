"""Shared test set-up: the environment the stack needs, Triton's interpreter on CPU machines,
one local Ray instance per session, a multi-node Ray cluster on this machine for `multinode`
tests, a moto S3 server, and skipping `gpu` tests where no CUDA device exists."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_BUILD_OPS", "0")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton kernels run in its numpy interpreter on CPU; must be set before kernels are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _init_local_ray() -> None:
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=512 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
    )


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the whole session (ray.init costs 2.5-4 s)."""
    import ray

    if not ray.is_initialized():
        _init_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def moto_server():
    """A real S3-protocol server (moto) on 127.0.0.1, free port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The moto server as this process's S3 (dummy credentials); yields its endpoint URL."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    return moto_server


# What a node of a real cluster would not have: its own environment holds no credentials and no
# tracking URI, so they reach Ray's workers only as the driver forwards them (runtime_env).
_DRIVER_ONLY_ENV = ("AWS_", "MLFLOW_TRACKING_")


class LocalCluster:
    """A Ray cluster of separate nodes on this machine (``ray.cluster_utils.Cluster``): a head
    with no CPUs (drivers, the GCS, Train's controller, 0-CPU tasks) and worker nodes, each
    with its own raylet, object store and temp dir. ``remove`` kills a node's processes at once
    (a lost host); ``add_worker`` brings capacity back."""

    def __init__(self, cpus_per_node: int = 1) -> None:
        from ray.cluster_utils import Cluster

        self.cpus_per_node = cpus_per_node
        self._dirs: list[str] = []
        with self._node_env():
            self.cluster = Cluster(
                initialize_head=True,
                head_node_args=self._args(num_cpus=0, include_dashboard=False),
            )

    def _args(self, **kw) -> dict:
        d = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths live in it
        self._dirs.append(d)
        return {  # the default node IP: ray.init turns 127.0.0.1 into it anyway
            "object_store_memory": 100 * 1024 * 1024,
            "temp_dir": d,
            **kw,
        }

    @contextlib.contextmanager
    def _node_env(self) -> Iterator[None]:
        """Start node processes without the driver's credentials and tracking URI."""
        saved = {k: v for k, v in os.environ.items() if k.startswith(_DRIVER_ONLY_ENV)}
        for k in saved:
            del os.environ[k]
        try:
            yield
        finally:
            os.environ.update(saved)

    def add_worker(self):
        with self._node_env():
            return self.cluster.add_node(**self._args(num_cpus=self.cpus_per_node))

    def worker(self, node_id: str):
        """The worker node whose Ray node id is ``node_id``."""
        return next(n for n in self.cluster.worker_nodes if n.node_id == node_id)

    def remove(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)

    def shutdown(self) -> None:
        self.cluster.shutdown()
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalCluster]:
    """A head and two worker nodes (1 CPU each) for one module, exported as RAY_ADDRESS: the
    code under test connects this process to it as a job's driver does (``ray.init()``). The
    session's local Ray (``ray_local``) is set aside meanwhile and restored after."""
    import ray

    had_local = ray.is_initialized()
    ray.shutdown()
    c = LocalCluster()
    try:
        for _ in range(2):
            c.add_worker()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_ADDRESS", c.cluster.address)
            yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if had_local:
            _init_local_ray()
