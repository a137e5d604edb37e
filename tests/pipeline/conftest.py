"""Fixtures for the pipeline tests: a small mixed-format corpus built in tmp and recipes over it
(the moto S3 server is tests/conftest.py's)."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
    "café",
    "naïve",
    "Zürich",
    "東京",
    "データ",
    "ünïcödé",
]


def make_doc(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    # Decomposed accents (NFD) in the input must come back composed (NFC).
    return unicodedata.normalize("NFD", " ".join(words)) + "."


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as g:
            g.write(data)
        data = buf.getvalue()
    elif path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    os.utime(path, (1_700_000_000, 1_700_000_000))


def write_parquet(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), path)
    os.utime(path, (1_700_000_000, 1_700_000_000))


class Corpus:
    """A corpus on disk plus the documents it holds, in the pipeline's global order."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.docs: dict[str, list[str]] = {}  # path -> raw documents in file order

    def add_docs(self, rel: str, kind: str, docs: list[str]) -> Path:
        p = self.root / rel
        if kind == "file":
            write(p, docs[0].encode())
        elif kind == "line":
            write(p, "".join(d + "\n" for d in docs).encode())
        elif kind == "jsonl":
            write(p, "".join(json.dumps({"text": d, "meta": 1}) + "\n" for d in docs).encode())
        elif kind == "parquet":
            write_parquet(p, docs)
        self.docs[str(p)] = list(docs)
        return p

    def expected(self) -> list[str]:
        """Kept documents: files in sorted path order, NFC, first occurrence wins."""
        seen, out = set(), []
        for path in sorted(self.docs):
            for d in self.docs[path]:
                d = unicodedata.normalize("NFC", d)
                if d in seen:
                    continue
                seen.add(d)
                out.append(d)
        return out

    def inputs(self, prefix: str | None = None) -> list[dict[str, Any]]:
        base = prefix or str(self.root)
        return [
            {"path": f"{base}/files", "text_unit": "file"},
            {"path": f"{base}/lines", "text_unit": "line"},
            {"path": f"{base}/json", "format": "jsonl"},
            {"path": f"{base}/pq", "format": "parquet"},
        ]


def build_corpus(root: Path, seed: int = 0) -> Corpus:
    rng = random.Random(seed)
    c = Corpus(root)
    c.add_docs("files/a.txt", "file", [make_doc(rng, 60)])
    c.add_docs("files/b.txt.gz", "file", [make_doc(rng, 80)])
    c.add_docs("files/c.py", "file", ["def f(x):\n    return x + 1  # <|eod|> stays text\n"])
    c.add_docs("lines/l1.txt", "line", [make_doc(rng, rng.randint(5, 40)) for _ in range(40)])
    c.add_docs("lines/l2.txt.zst", "line", [make_doc(rng, rng.randint(5, 40)) for _ in range(30)])
    c.add_docs("json/j1.jsonl", "jsonl", [make_doc(rng, rng.randint(5, 40)) for _ in range(30)])
    c.add_docs("json/j2.jsonl.gz", "jsonl", [make_doc(rng, rng.randint(5, 40)) for _ in range(30)])
    c.add_docs("pq/p1.parquet", "parquet", [make_doc(rng, rng.randint(5, 40)) for _ in range(30)])
    return c


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    return build_corpus(tmp_path / "corpus")


def recipe(inputs: list[dict[str, Any]], output: str, **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "test",
        "inputs": inputs,
        "output": output,
        "tokenizer": {"vocab_size": 300, "sample_bytes": 20_000, "min_frequency": 2},
        "code_table": "frequency",
        "seq_len": 32,
        "block_size": 4,
        "val_fraction": 0.2,
        "unit_bytes": 3000,
        "row_group_rows": 16,
        "rejects": True,
        "progress": False,
    }
    d.update(over)
    return d


@pytest.fixture
def make_config() -> Callable[..., Any]:
    from bitlm.recipe import from_dict
    from pipeline.config import PreprocessConfig

    def make(inputs: list[dict[str, Any]], output: str, **over: Any) -> PreprocessConfig:
        return from_dict(PreprocessConfig, recipe(inputs, output, **over))

    return make


def split_docs(docs: list[str], val_fraction: float) -> dict[str, list[str]]:
    from pipeline.steps import SplitByHash, doc_hash

    s = SplitByHash(val_fraction)
    out: dict[str, list[str]] = {"train": [], "val": []}
    for d in docs:
        out[s.split_of(doc_hash(d))].append(d)
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def pp() -> Any:
    """Helper functions for test modules (importlib mode: conftest is not importable)."""
    import types

    return types.SimpleNamespace(
        build_corpus=build_corpus,
        make_doc=make_doc,
        write=write,
        write_parquet=write_parquet,
        split_docs=split_docs,
        tree_bytes=tree_bytes,
        recipe=recipe,
    )
