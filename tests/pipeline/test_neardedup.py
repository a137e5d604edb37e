"""Near-duplicate removal (issue 14, point 1): shingling and banding, the recipe's validation, and
end-to-end runs on a real local Ray with near copies across files and across runs."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bitlm.recipe import RecipeError, from_dict
from pipeline import decode_dataset, run_preprocess, verify
from pipeline.config import NearDedupConfig, PreprocessConfig
from pipeline.neardedup import Banding, band_keys, near_duplicates, shingle_hashes

BANDING = Banding(num_perm=128, bands=9, rows=13, ngram=5)
VOCAB = [f"w{i}" for i in range(3000)]


def words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def near_copies(doc: list[str]) -> dict[str, list[str]]:
    """A few words changed, inserted or cut."""
    changed = list(doc)
    changed[len(doc) // 3] = "changed"
    changed[2 * len(doc) // 3] = "edited"
    inserted = [*doc[:100], "one", "more", "word", *doc[100:]]
    cut = doc[:50] + doc[53:-2]
    return {"changed": changed, "inserted": inserted, "cut": cut}


def test_shingles() -> None:
    a = shingle_hashes("The quick brown fox jumps over the lazy dog", 5)
    assert a.dtype.name == "uint32" and len(a) == 5  # 9 words -> 5 shingles
    assert (a == shingle_hashes("the QUICK, brown fox -- jumps over the lazy dog!", 5)).all()
    assert len(shingle_hashes("too short", 5)) == 1  # fewer words than ngram: one shingle
    assert len(shingle_hashes("... !!! ...", 5)) == 0
    assert len(shingle_hashes("a b a b a b a b", 2)) == 2  # unique shingles {a b, b a}


def near(docs: list, earlier: list | None = None) -> list[bool]:
    keys = np.array([k for d in docs if d for k in d], np.uint64)
    lens = np.array([len(d) if d else 0 for d in docs], np.int64)
    prior = np.unique(np.asarray(earlier, np.uint64)) if earlier else None
    return near_duplicates(keys, lens, prior).tolist()


def test_band_keys_catch_near_copies_not_distinct_documents() -> None:
    rng = random.Random(0)
    docs = [words(rng, 600) for _ in range(40)]
    keys = [band_keys(" ".join(d), BANDING) for d in docs]
    copies = [
        (kind, band_keys(" ".join(c), BANDING)) for d in docs for kind, c in near_copies(d).items()
    ]
    assert near(keys) == [False] * 40  # distinct: all kept
    got = near([*keys, *(k for _, k in copies)])
    assert got[40:] == [True] * len(copies), [
        kind for (kind, _), g in zip(copies, got[40:], strict=True) if not g
    ]
    # the same against the keys of an earlier run
    prior = [k for ks in keys for k in ks]
    assert near([k for _, k in copies], prior) == [True] * len(copies)
    assert near([band_keys(" ".join(words(rng, 300)), BANDING)], prior) == [False]
    assert keys[0] is not None and len(keys[0]) == 9 and all(0 <= k < 2**64 for k in keys[0])
    assert band_keys("", BANDING) is None and near([None, None]) == [False, False]
    # the keys of a near duplicate count too: a near copy of it is dropped (chains); the earliest
    # holder of a key is never dropped for it, whatever the order of keys within a document
    assert near([[1, 2], [2, 3], [3, 4], [5, 6], None, [6, 5], [7]]) == [0, 1, 1, 0, 0, 1, 0]
    assert near([[9, 1]], [1]) == [True] and near([[2**64 - 1]], [3]) == [False]


def test_band_keys_are_the_same_in_another_process() -> None:
    text = " ".join(words(random.Random(3), 200))
    code = (
        "import json, sys; from pipeline.neardedup import Banding, band_keys; "
        "print(json.dumps(band_keys(sys.stdin.read(), Banding(128, 9, 13, 5))))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], input=text, capture_output=True, text=True, cwd=root
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == band_keys(text, BANDING)


def test_recipe_defaults_and_validation() -> None:
    cfg = from_dict(PreprocessConfig, {"near_dedup": {"enabled": True}})
    assert cfg.near_dedup.banding() == BANDING  # datasketch's MinHashLSH choice at 0.8 / 128
    assert from_dict(PreprocessConfig, {}).near_dedup.banding() is None
    assert NearDedupConfig(enabled=True, threshold=0.5).banding() == Banding(128, 25, 5, 5)
    for bad, key in (
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"num_perm": 1}, "num_perm"),
        ({"ngram": 0}, "ngram"),
        ({"bands": 4}, "bands"),
        ({"bands": 20, "rows": 7}, "bands \\* rows <= num_perm"),
        ({"bands": 0, "rows": 7}, "bands >= 1"),
    ):
        with pytest.raises(RecipeError, match=key):
            from_dict(PreprocessConfig, {"near_dedup": {"enabled": True, **bad}})
    with pytest.raises(RecipeError, match=r"near_dedup\.shingle"):
        from_dict(PreprocessConfig, {"near_dedup": {"shingle": 3}})


# ---- end to end ---------------------------------------------------------------------------------
def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def by_name(m: dict) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in m["inputs"]}


@pytest.mark.ray
def test_near_copies_dropped_across_files_and_runs(
    ray_local, make_config, pp, tmp_path: Path
) -> None:
    rng = random.Random(7)
    originals = [" ".join(words(rng, 500)) for _ in range(6)]
    distinct = [" ".join(words(rng, rng.randint(5, 300))) for _ in range(20)]
    copies = [near_copies(d.split()) for d in originals]
    root = tmp_path / "corpus"
    lines = lambda docs: "".join(d + "\n" for d in docs).encode()
    # a.txt: originals 0-2, a near copy of 0 in the same file, and distinct documents
    pp.write(
        root / "a.txt", lines([*originals[:3], " ".join(copies[0]["changed"]), *distinct[:10]])
    )
    # b.txt (later in sorted order): near copies of a.txt's documents, an exact copy, more distinct
    b_docs = [" ".join(copies[1]["inserted"]), " ".join(copies[2]["cut"]), originals[1]]
    pp.write(root / "b.txt", lines([*b_docs, *originals[3:5], *distinct[10:15]]))
    inputs = [{"path": str(root), "text_unit": "line"}]
    over = {"near_dedup": {"enabled": True}, "unit_bytes": 4000, "val_fraction": 0.1}
    out, again = tmp_path / "ds", tmp_path / "again"
    s = run_preprocess(make_config(inputs, str(out), **over))
    m = manifest(out)
    assert m["recipe"]["near_dedup"] == {
        "enabled": True,
        "threshold": 0.8,
        "num_perm": 128,
        "ngram": 5,
        "bands": 9,
        "rows": 13,
    }
    assert m["near_dedup"]["scheme"].startswith("datasketch-")
    f = by_name(m)
    assert f["a.txt"]["dropped"] == {"near_duplicate": 1} and f["a.txt"]["kept"] == 13
    assert f["b.txt"]["dropped"] == {"near_duplicate": 2} and f["b.txt"]["duplicates"] == 1
    assert s["dropped"] == {"near_duplicate": 3} and m["counts"]["dropped"] == s["dropped"]
    assert s["stages"]["near_dedup"]["dropped.near_duplicate"] == 3
    kept1 = [*originals[:3], *distinct[:10], *originals[3:5], *distinct[10:15]]
    got = decode_dataset(str(out), "train") + decode_dataset(str(out), "val")
    assert sorted(got) == sorted(kept1)
    report = verify(str(out), sample_units=100)
    assert report["ok"], report["errors"]
    # deterministic: a second run into another folder writes the same bytes
    run_preprocess(make_config(inputs, str(again), **over))
    assert pp.tree_bytes(again) == pp.tree_bytes(out)

    # run 2: near copies of run 1's documents are dropped, new distinct documents kept
    c_docs = [" ".join(copies[3]["changed"]), " ".join(copies[0]["cut"]), *distinct[15:]]
    pp.write(root / "c.txt", lines(c_docs))
    s2 = run_preprocess(make_config(inputs, str(out), **over))
    m2 = manifest(out)
    assert s2["files_new"] == 1 and by_name(m2)["c.txt"]["dropped"] == {"near_duplicate": 2}
    assert m2["counts"]["dropped"] == {"near_duplicate": 5}
    assert m2["runs"][1]["dropped"] == {"near_duplicate": 2}
    got = decode_dataset(str(out), "train") + decode_dataset(str(out), "val")
    assert sorted(got) == sorted([*kept1, *distinct[15:]])
    report = verify(str(out), sample_units=100)
    assert report["ok"], report["errors"]
    # rejects name the reason
    reasons = [
        json.loads(x)["reason"]
        for p in (out / "rejects").glob("*.jsonl.gz")
        for x in gzip.decompress(p.read_bytes()).splitlines()
    ]
    assert sorted(reasons) == ["duplicate"] + ["near_duplicate"] * 5

    # verify catches a near_duplicate count that the index does not back
    body = manifest(out)
    body["inputs"][0]["dropped"] = {}
    (out / "manifest.json").write_text(json.dumps(body))
    bad = verify(str(out), sample_units=0)
    assert not bad["ok"] and "near duplicates in the index" in bad["errors"][0]


@pytest.mark.ray
def test_near_dedup_keeps_exact_dedup_and_is_refused_on_a_plain_dataset(
    ray_local, corpus, make_config, tmp_path: Path
) -> None:
    from pipeline.driver import PreprocessError

    first = corpus.docs[str(corpus.root / "lines/l1.txt")]
    corpus.add_docs("json/j3.jsonl", "jsonl", [first[3], first[7], "unique j3 text"])
    plain, near = tmp_path / "plain", tmp_path / "near"
    run_preprocess(make_config(corpus.inputs(), str(plain)))
    run_preprocess(make_config(corpus.inputs(), str(near), near_dedup={"enabled": True}))
    strip = lambda m: [{k: r[k] for k in ("path", "docs", "duplicates")} for r in m["inputs"]]
    assert strip(manifest(near)) == strip(manifest(plain))
    assert manifest(near)["counts"]["duplicates"] == 2
    assert manifest(near)["counts"]["kept"] == manifest(plain)["counts"]["kept"]  # all distinct
    corpus.add_docs("files/new.txt", "file", ["another document here"])
    with pytest.raises(PreprocessError, match="near_dedup"):
        run_preprocess(make_config(corpus.inputs(), str(plain), near_dedup={"enabled": True}))
