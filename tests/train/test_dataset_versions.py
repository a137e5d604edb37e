"""Datasets that grow under a running training (issue 12.2). The dataset is built by the
project's own preprocessing (pipeline.run_preprocess on the session's local Ray) and grown by
rerunning it with more input into the same folder: each run is a version. A training pins the
version it started with; a new run, or ``data.dataset_version=latest``, takes the new shards."""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from faults import IndexLog, KillAt, StopAfter
from helpers import local_recipe, metric_history, train, write_dataset

from bitlm.train.data import DataError, Dataset, Manifest, select_version
from bitlm.train.worker import FATAL_FILE, LocalSession, train_worker


def _write_lines(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6)))

    lines = (" ".join(word() for _ in range(rng.randint(8, 30))) for _ in range(n))
    path.write_text("".join(f"{line}.\n" for line in lines))


class Grown:
    """A corpus folder, the dataset built from its first file (version 1) and ``append``: the
    preprocessing rerun over the folder, which now also holds a second file (version 2)."""

    def __init__(self, base: Path) -> None:
        self.corpus = base / "corpus"
        self.corpus.mkdir()
        _write_lines(self.corpus / "a.txt", 150, 0)
        self.v1 = base / "v1"
        self._preprocess(self.v1)
        _write_lines(self.corpus / "b.txt", 150, 1)  # the nightly job's new input
        self.rows_v1 = Dataset(str(self.v1), "train").num_rows

    def _preprocess(self, out: Path) -> None:
        from bitlm.recipe import from_dict
        from pipeline import run_preprocess
        from pipeline.config import PreprocessConfig

        cfg = {
            "name": "grown",
            "inputs": [{"path": str(self.corpus), "text_unit": "line"}],
            "output": str(out),
            "tokenizer": {"vocab_size": 300, "sample_bytes": 20_000, "min_frequency": 2},
            "seq_len": 32,
            "block_size": 4,
            "val_fraction": 0.1,
            "row_group_rows": 8,
            "progress": False,
        }
        assert run_preprocess(from_dict(PreprocessConfig, cfg))["work_done"]

    def copy_v1(self, dst: Path) -> str:
        shutil.copytree(self.v1, dst)
        return str(dst)

    def append(self, dataset: str) -> None:
        self._preprocess(Path(dataset))
        assert Manifest.load(dataset).version == 2


@pytest.fixture(scope="module")
def grown(ray_local, tmp_path_factory) -> Grown:
    return Grown(tmp_path_factory.mktemp("grown"))


def _rows(index_log: Path) -> dict[int, list[int]]:
    """step -> global rows consumed, from one rank's index log."""
    out: dict[int, list[int]] = {}
    for line in (index_log / "rank_0.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["rows"]
    return out


def _log(tmp_path: Path, name: str) -> IndexLog:
    return IndexLog(tmp_path / name)


def _state(storage: Path, name: str) -> dict:
    ck = sorted((storage / name).glob("checkpoint_0*"))[-1]
    return json.loads((ck / "trainer_state.json").read_text())


# ---- the rule and the reader, no training ----------------------------------------------------
def test_select_version():
    assert select_version("pinned", latest=3, pinned=None) == 3  # a new run: the newest
    assert select_version("pinned", latest=3, pinned=1) == 1  # a resume: its own
    assert select_version("latest", latest=3, pinned=1) == 3  # the explicit switch
    assert select_version(2, latest=3, pinned=1) == 2 == select_version(2, latest=3, pinned=None)
    with pytest.raises(DataError, match=r"dataset_version=4: the dataset has versions 1\.\.3"):
        select_version(4, latest=3, pinned=None)


def test_versions_of_a_manifest(tmp_path):
    """Version v = the shards of runs 1..v; a reader pinned to v is blind to later shards; a
    checkpoint's fingerprint finds its version (recorded or not); evaluation accepts a
    checkpoint of an older version of the dataset and refuses another dataset's."""
    from bitlm.eval.evaluate import EvalError, RunRef, _check_dataset

    data = write_dataset(tmp_path / "ds", train_rows=64, rows_per_shard=24)  # 24 + 24 + 16
    old = Manifest.load(data)
    assert old.version == 1  # no run numbers (a hand-written manifest): one version
    man = json.loads((tmp_path / "ds/manifest.json").read_text())
    man["shards"][2]["run"] = 2  # the third train shard came with a second run
    man["runs"] = [{"run": 1}, {"run": 2}, {"run": 3}]  # the third run added nothing
    (tmp_path / "ds/manifest.json").write_text(json.dumps(man))
    m = Manifest.load(data)
    assert m.version == 3
    assert [s.rows for s in m.at_version(1).split("train")] == [24, 24]
    assert m.at_version(3).shards == m.shards
    assert m.at_version(1).version == 1 and m.at_version(1).split("val") == m.split("val")
    with pytest.raises(DataError, match=r"no dataset version 4 \(versions 1\.\.3\)"):
        m.at_version(4)

    v1 = m.at_version(1).fingerprint("train")
    assert v1 != m.fingerprint("train") == m.at_version(2).fingerprint("train")
    assert m.version_of("train", v1, 1) == 1
    assert m.version_of("train", v1) == 1  # a checkpoint written before versions
    assert m.version_of("train", m.fingerprint("train")) == 3  # the newest that matches
    assert m.version_of("train", v1, 2) is None  # recorded 2, but 2 has other shards
    assert m.version_of("train", old.fingerprint("val"), 1) is None
    assert m.version_of("train", v1, 7) is None

    a, b = Dataset(data, "train", seed=3, version=1), Dataset(data, "train", seed=3)
    assert (a.version, a.num_rows, b.version, b.num_rows) == (1, 48, 3, 64)
    rows = a.rows_at(np.arange(96))
    assert sorted(rows.tolist()) == sorted(list(range(48)) * 2)  # never a row of run 2
    assert np.array_equal(a.read_rows(np.arange(48)), b.read_rows(np.arange(48)))  # a prefix

    def ref(path: str) -> RunRef:
        return RunRef("id", "r", "0", str(tmp_path / "runs" / "r"), path)

    _check_dataset(ref(data), "ck", {"fingerprint": v1, "dataset_version": 1})
    _check_dataset(ref(data), "ck", {"fingerprint": v1})  # before versions
    other = write_dataset(tmp_path / "other", train_rows=40)
    with pytest.raises(EvalError, match="trained on another dataset"):
        _check_dataset(ref(other), "ck", {"fingerprint": v1, "dataset_version": 1})


# ---- in-process trainings (world size 1, real DeepSpeed) on a preprocessed, grown dataset ----
def _local(data: str, storage: Path, name: str, *extra: str):
    return local_recipe(
        data,
        storage,
        name,
        "zero_stage=1",
        "steps=6",
        "checkpoint.every_steps=3",
        "checkpoint.keep_last=1",
        *extra,
    )


def _run_local(recipe, storage: Path, name: str, tracking_uri=None, callbacks=()) -> None:
    info = {"recipe": recipe.to_dict(), "tracking_uri": tracking_uri}
    train_worker(info, LocalSession(str(storage), name, keep=1), callbacks)
    assert not (storage / name / FATAL_FILE).exists(), (storage / name / FATAL_FILE).read_text()


@pytest.mark.ray
def test_new_run_takes_new_shards_and_the_switch_is_explicit(
    dist_world1, grown, tmp_path, mlflow_uri, caplog
):
    from mlflow.tracking import MlflowClient

    caplog.set_level(logging.INFO, logger="bitlm.train")
    data = grown.copy_v1(tmp_path / "ds")
    storage = tmp_path / "runs"
    off = "mlflow.enabled=false"
    for name, track in (("pinned", off), ("switch", "mlflow.enabled=true")):  # stop at 3, v1
        _run_local(_local(data, storage, name, track), storage, name, mlflow_uri, [StopAfter(3)])
    shutil.copytree(storage / "pinned", storage / "legacy")  # a checkpoint from before versions
    legacy = storage / "legacy" / "checkpoint_00000003" / "trainer_state.json"
    state = json.loads(legacy.read_text())
    assert state.pop("dataset_version") == 1
    legacy.write_text(json.dumps(state))

    grown.append(data)
    n1 = grown.rows_v1

    # A new run reads version 2: its permutation covers the new rows.
    _run_local(
        _local(data, storage, "fresh", off), storage, "fresh", None, [_log(tmp_path, "fresh")]
    )
    assert _state(storage, "fresh")["dataset_version"] == 2
    fresh = _rows(tmp_path / "fresh")
    assert any(row >= n1 for rows in fresh.values() for row in rows)

    # Resumed runs stay on version 1 (the legacy checkpoint is matched by its fingerprint).
    for name in ("pinned", "legacy"):
        caplog.clear()
        _run_local(_local(data, storage, name, off), storage, name, None, [_log(tmp_path, name)])
        assert _state(storage, name)["dataset_version"] == 1
        rows = _rows(tmp_path / name)
        assert sorted(rows) == [4, 5, 6] and all(x < n1 for v in rows.values() for x in v)
        assert any("grown to version 2" in m for m in caplog.messages), caplog.messages

    # data.dataset_version=latest moves a resumed run to version 2, and says so.
    caplog.clear()
    r = _local(data, storage, "switch", "data.dataset_version=latest")
    _run_local(r, storage, "switch", mlflow_uri, [_log(tmp_path, "sw")])
    assert _state(storage, "switch")["dataset_version"] == 2
    switched = _rows(tmp_path / "sw")
    assert switched == {s: fresh[s] for s in (4, 5, 6)}  # the order of version 2 from step 3 on
    said = [m for m in caplog.messages if "moves the run to version 2" in m]
    assert len(said) == 1 and "trained on version 1" in said[0], caplog.messages
    c = MlflowClient(mlflow_uri)
    exp = c.get_experiment_by_name("bitlm-pretrain")
    run = c.search_runs([exp.experiment_id], "tags.mlflow.runName = 'switch'")[0]
    assert run.data.tags["dataset_version"] == "2"
    assert run.data.tags["dataset_switch.step_3"] == "1 -> 2"
    assert run.data.tags["data_fingerprint"] == Manifest.load(data).fingerprint("train")

    # A version the dataset does not have stops the run with a clear message.
    r = _local(data, storage, "pinned", off, "data.dataset_version=3")
    train_worker({"recipe": r.to_dict()}, LocalSession(str(storage), "pinned", keep=1))
    fatal = json.loads((storage / "pinned" / FATAL_FILE).read_text())
    assert "data.dataset_version=3: the dataset has versions 1..2" in fatal["error"]


# ---- the test through Ray Train (2 workers): train, kill, append, resume -------------
@pytest.mark.ray
@pytest.mark.slow
def test_killed_run_resumes_on_its_version_after_an_append(grown, tmp_path, mlflow_uri):
    """The first launch of ``split`` checkpoints at step 3 and is SIGKILLed at step 5 (no retry:
    the launch fails, as a killed job does); the dataset grows; the relaunch resumes on version
    1 and every step's loss equals an uninterrupted run's on version 1."""
    from ray.train import TrainingFailedError

    data = grown.copy_v1(tmp_path / "ds")
    storage = tmp_path / "runs"
    common = ["zero_stage=1", "steps=6", "checkpoint.every_steps=3"]
    full = train(str(grown.v1), storage, "full", *common)
    with pytest.raises(TrainingFailedError):
        train(
            data,
            storage,
            "split",
            *common,
            "failure.max_failures=0",
            callbacks=[KillAt(rank=0, step=5)],
        )
    grown.append(data)
    rest = train(data, storage, "split", *common)
    assert rest.checkpoint.endswith("checkpoint_00000006")
    assert _state(storage, "split")["dataset_version"] == 1

    want = dict(metric_history(mlflow_uri, full.mlflow_run_id))
    got: dict[int, list[float]] = defaultdict(list)  # step 4 was logged by both launches
    for s, loss in metric_history(mlflow_uri, rest.mlflow_run_id):
        got[s].append(loss)
    assert sorted(want) == sorted(got) == [1, 2, 3, 4, 5, 6]
    assert all(v == [want[s]] * len(v) for s, v in got.items()), (want, dict(got))
