"""Dedup state sharded by key prefix (issue 14.2): resolved by per-part tasks against the
dataset's ``dedup/`` files, the same result for any number of parts, an incremental run that
needs no earlier index file, and datasets made before the state existed seeded once. The driver
runs its tasks in this process (no Ray), as in test_hostile."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from pipeline import decode_dataset, verify


@pytest.fixture
def local_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import driver, units

    def local_map(cfg, specs, desc, on_result=None):
        out = []
        for s in specs:
            out.append(json.loads(units.run_spec(json.dumps(s))))
            if on_result is not None:
                on_result(out[-1])
        return out

    monkeypatch.setattr(driver, "_ray_map", local_map)
    monkeypatch.setattr(driver, "_ensure_ray", lambda cfg: False)


def _lines(path: Path, docs: list[str], pp) -> None:
    pp.write(path, "".join(f"{d}\n" for d in docs).encode())


def _corpus(root: Path, pp) -> list[str]:
    """Three files with exact and near copies across them; returns the distinct documents."""
    rng = random.Random(3)
    words = [f"w{i}" for i in range(400)]
    docs = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(60)]
    near = lambda d: " ".join([*d.split()[:-2], "changed", "words"])
    _lines(root / "a.txt", [*docs[:20], docs[3]], pp)
    _lines(root / "b.txt", [*docs[20:40], docs[5], near(docs[7]), near(docs[25])], pp)
    _lines(root / "c.txt", [*docs[40:50], docs[41], near(docs[30])], pp)
    return docs


def _run(make_config, root: Path, out: Path, **over):
    from pipeline.driver import run_preprocess

    over.setdefault("near_dedup", {"enabled": True})
    cfg = make_config([{"path": str(root), "text_unit": "line"}], str(out), unit_bytes=1, **over)
    return run_preprocess(cfg)


def _manifest(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    for r in m["runs"]:
        r.pop("dedup")
    return m


def _shards(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in (out / "shards").rglob("*.parquet")}


def test_any_number_of_parts_gives_the_same_dataset(
    local_driver, make_config, pp, tmp_path: Path
) -> None:
    root = tmp_path / "c"
    docs = _corpus(root, pp)
    one, many = tmp_path / "one", tmp_path / "many"
    _run(make_config, root, one)
    _run(make_config, root, many, ray={"dedup_part_bytes": 200})
    parts = json.loads((many / "manifest.json").read_text())["runs"][0]["dedup"]["parts"]
    assert parts > 10 and len(list((many / "dedup").rglob("*.parquet"))) == parts
    m = _manifest(one)
    assert m == _manifest(many) and _shards(one) == _shards(many)
    assert m["counts"]["duplicates"] == 3 and m["counts"]["dropped"] == {"near_duplicate": 3}
    assert len(decode_dataset(str(one)) + decode_dataset(str(one), "val")) == 50
    # run 2: copies of run 1's documents (exact and near) are found in the state
    _lines(root / "d.txt", [docs[0], " ".join(docs[44].split()[:-1]), docs[55]], pp)
    for out, over in ((one, {}), (many, {"ray": {"dedup_part_bytes": 30}})):
        s = _run(make_config, root, out, **over)
        assert s["run"]["duplicates"] == 1 and s["dropped"] == {"near_duplicate": 1}
    assert _manifest(one) == _manifest(many) and _shards(one) == _shards(many)
    assert verify(str(many), sample_units=100)["ok"]


def test_an_incremental_run_needs_only_the_state(
    local_driver, make_config, pp, tmp_path: Path
) -> None:
    """Run 2 resolves against ``dedup/`` alone: with run 1's index files gone, its copies of
    run 1's documents are still dropped."""
    root = tmp_path / "c"
    docs = _corpus(root, pp)
    ref, out = tmp_path / "ref", tmp_path / "out"
    for d in (ref, out):
        _run(make_config, root, d)
    shutil.rmtree(out / "index")
    _lines(root / "d.txt", [docs[0], " ".join(docs[44].split()[:-1]), docs[55]], pp)
    for d in (ref, out):
        s = _run(make_config, root, d)
        assert s["run"]["duplicates"] == 1 and s["dropped"] == {"near_duplicate": 1}
    assert _shards(out) == _shards(ref)


def test_a_dataset_without_state_is_seeded_from_its_index_files(
    local_driver, make_config, pp, tmp_path: Path
) -> None:
    """A dataset made before the state existed (no ``runs[].dedup``, no ``dedup/``): the next
    run seeds the state from the earlier index files once, with the same result."""
    root = tmp_path / "c"
    docs = _corpus(root, pp)
    ref, old = tmp_path / "ref", tmp_path / "old"
    for d in (ref, old):
        _run(make_config, root, d)
    m = json.loads((old / "manifest.json").read_text())
    for r in m["runs"]:
        del r["dedup"]
    (old / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(old / "dedup")
    _lines(root / "d.txt", [docs[0], " ".join(docs[44].split()[:-1]), docs[55]], pp)
    for d in (ref, old):
        s = _run(make_config, root, d)
        assert s["run"]["duplicates"] == 1 and s["dropped"] == {"near_duplicate": 1}
    assert _shards(old) == _shards(ref)
    assert "dedup" in json.loads((old / "manifest.json").read_text())["runs"][-1]
    # run 3 reads the seeded state: run 1's documents are still known
    _lines(root / "e.txt", [docs[1], docs[58]], pp)
    for d in (ref, old):
        assert _run(make_config, root, d)["run"]["duplicates"] == 1
    assert _shards(old) == _shards(ref)


def test_state_files_of_an_uncommitted_attempt_are_ignored_and_removed(
    local_driver, make_config, pp, tmp_path: Path
) -> None:
    """A killed attempt may leave state files with keys of documents that never reached the
    manifest: a later run must not count them, and the commit removes them."""
    root, other = tmp_path / "c", tmp_path / "other"
    docs = _corpus(root, pp)
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    _run(make_config, root, out)
    _lines(other / "d.txt", [docs[55], docs[56]], pp)
    _run(make_config, other, elsewhere)
    (state,) = list((elsewhere / "dedup").iterdir())  # holds the keys of docs 55 and 56
    stale = out / "dedup" / "000002-0000000000000000"
    shutil.copytree(state, stale)
    assert _run(make_config, other, elsewhere)["work_done"] is False
    _lines(root / "d.txt", [docs[55], docs[56]], pp)
    s = _run(make_config, root, out)
    assert s["run"]["kept"] == 2 and s["run"]["duplicates"] == 0
    assert not stale.exists() and len(list((out / "dedup").iterdir())) == 2
