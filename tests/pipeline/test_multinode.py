"""Preprocessing on a Ray cluster of separate nodes (issue 15.2): input and output on S3 (moto on
127.0.0.1), the driver on the head, the tasks on two worker nodes; one worker node is killed in
the encode pass; the dataset (after a rerun, if the run itself failed) is byte-identical to a
clean run's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline import run_preprocess, verify

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow, pytest.mark.multinode]

REPO = Path(__file__).resolve().parents[2]


def _tree(fs, prefix: str) -> dict[str, bytes]:
    return {p[len(prefix) + 1 :]: fs.cat_file(p) for p in sorted(fs.find(prefix))}


def test_worker_node_killed_mid_run_then_rerun_is_byte_identical(
    ray_cluster, s3_env, corpus, make_config, pp, tmp_path: Path
) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(use_listings_cache=False, client_kwargs={"endpoint_url": s3_env})
    fs.mkdir("mn-corpus")
    fs.mkdir("mn-datasets")
    for p in sorted(corpus.root.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"mn-corpus/c/{p.relative_to(corpus.root)}")
    inputs = corpus.inputs("s3://mn-corpus/c")
    small = {"unit_bytes": 1000}  # more units: the encode pass is still running at the kill

    t0 = time.monotonic()
    s = run_preprocess(make_config(inputs, "s3://mn-datasets/clean", **small))
    t_clean = time.monotonic() - t0
    assert s["work_done"] and s["units"] >= 6
    want = _tree(fs, "mn-datasets/clean")
    assert any(k.startswith("shards/") for k in want)

    t0 = time.monotonic()
    y = tmp_path / "killed.yaml"
    y.write_text(yaml.safe_dump(pp.recipe(inputs, "s3://mn-datasets/killed", **small)))
    proc = subprocess.Popen(  # a second driver on the head, as `ray job submit` would start
        [sys.executable, "jobs/preprocess.py", "--config", str(y)],
        cwd=REPO,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    units = "mn-datasets/killed/_work/units"
    deadline = time.monotonic() + 180
    while not (fs.exists(units) and fs.ls(units, refresh=True)):
        assert proc.poll() is None and time.monotonic() < deadline, "no unit encoded"
        time.sleep(0.05)
    victim = next(iter(ray_cluster.cluster.worker_nodes))  # mid-encode
    ray_cluster.remove(victim)
    assert not fs.exists("mn-datasets/killed/manifest.json"), "the kill came too late"
    log = proc.communicate(timeout=300)[0].decode(errors="replace")
    first_rc = proc.returncode
    s = run_preprocess(make_config(inputs, "s3://mn-datasets/killed", **small))  # the rerun
    t_killed = time.monotonic() - t0
    assert first_rc == 0 or s["work_done"], log[-3000:]
    got = _tree(fs, "mn-datasets/killed")
    assert got.keys() == want.keys()
    assert got == want
    assert verify("s3://mn-datasets/killed", sample_units=100)["ok"]
    ray_cluster.add_worker()
    print(
        f"\n[multinode] preprocess clean {t_clean:.0f} s, node killed + rerun {t_killed:.0f} s "
        f"(the killed run itself exited {first_rc})"
    )
