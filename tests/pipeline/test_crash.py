"""Crash safety (issue 3, point 4): SIGKILL the driver (`python jobs/preprocess.py`) at several
points, rerun; the dataset folder must be byte-identical to an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline import run_preprocess, verify
from pipeline.driver import KILL_ENV

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def launch(recipe: dict, tmp: Path, address: str, env: dict[str, str]) -> subprocess.Popen:
    y = tmp / f"recipe-{time.monotonic_ns()}.yaml"
    y.write_text(yaml.safe_dump(recipe))
    cmd = [
        sys.executable,
        "jobs/preprocess.py",
        "--config",
        str(y),
        "--set",
        f"ray.address={address}",
    ]
    return subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def test_sigkill_at_every_stage_then_rerun_is_byte_identical(
    ray_local, corpus, make_config, pp, tmp_path: Path
) -> None:
    ref = tmp_path / "ref"
    run_preprocess(make_config(corpus.inputs(), str(ref)))
    want = pp.tree_bytes(ref)
    assert any(k.startswith("shards/") for k in want)
    address = ray_local.get_runtime_context().gcs_address
    for point in ("after_codec", "after_scan", "after_unit", "before_manifest", "after_manifest"):
        out = tmp_path / point
        proc = launch(pp.recipe(corpus.inputs(), str(out)), tmp_path, address, {KILL_ENV: point})
        log = proc.communicate(timeout=180)[0].decode(errors="replace")
        assert proc.returncode == -signal.SIGKILL, log[-3000:]
        assert (out / "manifest.json").exists() == (point == "after_manifest")
        run_preprocess(make_config(corpus.inputs(), str(out)))
        assert pp.tree_bytes(out) == want, point

    # an external SIGKILL at an arbitrary moment: as soon as the first index file appears
    out = tmp_path / "external"
    proc = launch(pp.recipe(corpus.inputs(), str(out)), tmp_path, address, {})
    deadline = time.monotonic() + 120
    while not list((out / "index").glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    run_preprocess(make_config(corpus.inputs(), str(out)))
    assert pp.tree_bytes(out) == want
    assert verify(str(out))["ok"]


def test_sigkill_during_incremental_run(ray_local, corpus, make_config, pp, tmp_path: Path) -> None:
    ref, out = tmp_path / "ref", tmp_path / "out"
    for d in (ref, out):
        run_preprocess(make_config(corpus.inputs(), str(d)))
    corpus.add_docs("lines/l3.txt", "line", [f"fresh line number {i}" for i in range(50)])
    corpus.add_docs("files/zz.txt", "file", ["one more file for the second run"])
    run_preprocess(make_config(corpus.inputs(), str(ref)))
    address = ray_local.get_runtime_context().gcs_address
    proc = launch(pp.recipe(corpus.inputs(), str(out)), tmp_path, address, {KILL_ENV: "after_unit"})
    proc.communicate(timeout=180)
    assert proc.returncode == -signal.SIGKILL
    run_preprocess(make_config(corpus.inputs(), str(out)))
    assert pp.tree_bytes(out) == pp.tree_bytes(ref)


def test_sigkill_with_near_dedup_then_rerun_is_byte_identical(
    ray_local, corpus, make_config, pp, tmp_path: Path
) -> None:
    first = corpus.docs[str(corpus.root / "lines/l1.txt")]
    words = " ".join(first[:12]).split()
    corpus.add_docs("json/j0.jsonl", "jsonl", [" ".join(words), " ".join(words[:-3])])
    near = {"near_dedup": {"enabled": True}}
    ref = tmp_path / "ref"
    run_preprocess(make_config(corpus.inputs(), str(ref), **near))
    assert "near_duplicate" in (ref / "manifest.json").read_text()
    want = pp.tree_bytes(ref)
    address = ray_local.get_runtime_context().gcs_address
    for point in ("after_scan", "after_unit", "before_manifest"):
        out = tmp_path / point
        recipe = pp.recipe(corpus.inputs(), str(out), **near)
        proc = launch(recipe, tmp_path, address, {KILL_ENV: point})
        log = proc.communicate(timeout=180)[0].decode(errors="replace")
        assert proc.returncode == -signal.SIGKILL, log[-3000:]
        run_preprocess(make_config(corpus.inputs(), str(out), **near))
        assert pp.tree_bytes(out) == want, point
    assert verify(str(out), sample_units=100)["ok"]
