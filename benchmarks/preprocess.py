"""End-to-end preprocessing throughput vs raw `tokenizers` batch encoding, at 1 and 2 CPUs.

Corpus: the Python standard library's .py files (every machine has them), one document per file,
in sorted path order up to ``--mb`` MB. A tokenizer is trained once on a sample and then given to
every run (``tokenizer.path``), so the pipeline and the baseline do the same tokenisation work.

- pipeline: ``run_preprocess`` into a fresh folder on a local Ray started with ``num_cpus=n``
  (Ray start-up is excluded and reported apart); covers read -> scan -> dedup -> tokenise ->
  encode -> pack -> write -> manifest.
- pipeline with ``near_dedup: {enabled: true}`` (defaults: 128 permutations, 9 bands x 13 rows,
  word 5-grams), reported beside the run without it (``near_dedup``: seconds, slowdown, the scan
  phase's share and the near duplicates it dropped); ``--near-dedup off`` skips it.
- minhash (in this process, one core): ``band_keys`` (numpy shingle hashes + datasketch
  ``MinHash.update_batch``) over the same documents, beside datasketch's own per-shingle SHA-1
  path (``MinHash.update_batch`` on the shingle bytes) for the same shingles.
- raw: ``Tokenizer.encode_batch_fast`` over the same documents already in memory, with
  ``RAYON_NUM_THREADS=n`` (TOKENIZERS_PARALLELISM on for n > 1); no reading, no writing.

Each measurement runs in its own subprocess. JSON on stdout (and ``--out``).

    python benchmarks/preprocess.py [--mb 50] [--cpus 1 2] [--near-dedup both|off] [--out f.json]

``--driver-docs N`` measures instead the driver's dedup resolution (``pipeline.driver._resolve``)
over synthetic index files of N distinct documents (random hashes and band keys, 100 files), with
near_dedup off and on: as this run's documents, and as earlier runs' (an incremental run of one
new file replays them all). Peak RSS growth of a fresh subprocess and seconds, per document.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def corpus_files(mb: float) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for p in sorted(str(p) for p in root.rglob("*.py")):
        if total >= mb * 1e6:
            break
        size = os.path.getsize(p)
        if size == 0:
            continue
        out.append(p)
        total += size
    return out


def recipe(files_dir: str, output: str, tokenizer: str, cpus: int, near: bool = False) -> dict:
    return {
        "name": "bench",
        "inputs": [{"path": files_dir, "glob": "**/*.py", "format": "text", "text_unit": "file"}],
        "output": output,
        # the frequency code table is counted on a 1 MB sample (tokenised once, in the driver)
        "tokenizer": {"path": tokenizer, "sample_bytes": 1_000_000},
        "filters": {"min_chars": 1, "max_chars": 10_000_000},
        "near_dedup": {"enabled": near},
        "code_table": "frequency",
        "seq_len": 1024,
        "block_size": 4,
        "val_fraction": 0.01,
        "unit_bytes": 4_000_000,
        "progress": False,
        "ray": {"num_cpus": cpus},
    }


def run_pipeline(args: argparse.Namespace) -> dict:
    import ray

    cpus = args.cpus[0]
    from bitlm.recipe import from_dict
    from pipeline import run_preprocess
    from pipeline.config import PreprocessConfig

    t0 = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        object_store_memory=256 << 20,
        log_to_driver=False,
    )
    ray_start = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as out:
        r = recipe(args.files_dir, out, args.tokenizer, cpus, args.worker == "pipeline-near")
        cfg = from_dict(PreprocessConfig, r)
        t0 = time.perf_counter()
        s = run_preprocess(cfg)
        secs = time.perf_counter() - t0
    ray.shutdown()
    tokens = s["stages"]["tokenise"]["tokens"]
    return {
        "seconds": secs,
        "phases": s["timings"],
        "ray_start_seconds": ray_start,
        "input_bytes": s["input_bytes"],
        "docs_kept": s["run"]["kept"],
        "duplicates": s["run"]["duplicates"],
        "near_duplicates": s["run"]["dropped"].get("near_duplicate", 0),
        "tokens": tokens,
        "packed_tokens": s["run"]["tokens"],
        "mb_per_s": s["input_bytes"] / 1e6 / secs,
        "tokens_per_s": tokens / secs,
    }


def run_raw(args: argparse.Namespace) -> dict:
    from tokenizers import Tokenizer

    from pipeline.steps import normalise_text

    tok = Tokenizer.from_file(args.tokenizer)
    tok.encode_special_tokens = True
    paths = sorted(str(p) for p in Path(args.files_dir).rglob("*.py"))
    texts = [normalise_text(Path(p).read_bytes().decode("utf-8", "replace")) for p in paths]
    nbytes = sum(os.path.getsize(p) for p in paths)
    t0 = time.perf_counter()
    tokens = 0
    for s in range(0, len(texts), 256):
        for e in tok.encode_batch_fast(texts[s : s + 256], add_special_tokens=False):
            tokens += len(e.ids)
    secs = time.perf_counter() - t0
    return {
        "seconds": secs,
        "input_bytes": nbytes,
        "tokens": tokens,
        "mb_per_s": nbytes / 1e6 / secs,
        "tokens_per_s": tokens / secs,
    }


def minhash_costs(texts: list[str]) -> dict:
    from datasketch import MinHash

    from pipeline.neardedup import Banding, band_keys, words

    b = Banding(num_perm=128, bands=9, rows=13, ngram=5)
    t0 = time.perf_counter()
    for t in texts:
        band_keys(t, b)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    for t in texts:
        w = words(t)
        m = MinHash(128, seed=1)
        m.update_batch({" ".join(w[i : i + 5]).encode() for i in range(max(1, len(w) - 4))})
    sha1 = time.perf_counter() - t0
    nbytes = sum(len(t.encode()) for t in texts)
    return {
        "docs": len(texts),
        "band_keys_seconds": ours,
        "band_keys_mb_per_s": nbytes / 1e6 / ours,
        "us_per_doc": ours / len(texts) * 1e6,
        "datasketch_sha1_seconds": sha1,
    }


def synthetic_index(root: Path, docs: int, near: bool, files: int = 100) -> list[dict]:
    """Index files of ``docs`` distinct documents as the scan pass writes them; their records."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.units import index_table

    rng = np.random.default_rng(0)
    per = max(1, docs // files)
    recs = []
    for i in range(files):
        batch = {
            "index": list(range(per)),
            "reason": [None] * per,
            "hash": [rng.bytes(16) for _ in range(per)],
            "bands": rng.integers(0, 2**63, size=(per, 9), dtype=np.int64).tolist(),
        }
        path, index = f"/corpus/f{i:04d}.jsonl", f"index/u{i:04d}.parquet"
        (root / "index").mkdir(parents=True, exist_ok=True)
        pq.write_table(index_table(path, batch, near), root / index)
        recs.append({"path": path, "index": index})
    return recs


def run_resolve(args: argparse.Namespace) -> dict:
    import resource

    from pipeline.driver import _resolve
    from pipeline.storage import Storage

    near = args.worker == "resolve-near"
    root = Path(args.files_dir)
    recs = json.loads((root / "records.json").read_text())
    _resolve(Storage(), str(root), [], recs[:1], near)  # warm-up: imports, first read
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    prior, new = (recs[:-1], recs[-1:]) if args.prior else ([], recs)
    out = _resolve(Storage(), str(root), prior, new, near)
    secs = time.perf_counter() - t0
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    assert sum(r["kept"] for r in out.values()) == sum(r["docs"] for r in out.values())
    return {"seconds": secs, "peak_rss_growth_bytes": grew}


def driver_memory(docs: int) -> dict:
    result: dict = {"benchmark": "dedup resolution in the driver", "docs": docs, "runs": {}}
    for near in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            recs = synthetic_index(Path(tmp), docs, near)
            (Path(tmp) / "records.json").write_text(json.dumps(recs))
            kind = "resolve-near" if near else "resolve"
            for mode in ("this_run", "earlier_runs"):
                cmd = [sys.executable, __file__, "--worker", kind, "--files-dir", tmp]
                cmd += ["--prior"] if mode == "earlier_runs" else []
                r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=3000)
                if r.returncode != 0:
                    raise RuntimeError(f"{kind} failed:\n{r.stderr[-4000:]}")
                m = json.loads(r.stdout.strip().splitlines()[-1])
                m["bytes_per_doc"] = m["peak_rss_growth_bytes"] / docs
                m["us_per_doc"] = m["seconds"] / docs * 1e6
                result["runs"][f"near_dedup_{'on' if near else 'off'}/{mode}"] = m
                print(kind, mode, json.dumps(m), file=sys.stderr)
    return result


def sub(kind: str, cpus: int, files_dir: str, tokenizer: str) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": str(cpus)}
    env["TOKENIZERS_PARALLELISM"] = "true" if (kind == "raw" and cpus > 1) else "false"
    cmd = [sys.executable, __file__, "--worker", kind, "--cpus", str(cpus)]
    cmd += ["--files-dir", files_dir, "--tokenizer", tokenizer]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=3000)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} at {cpus} CPUs failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=50.0)
    ap.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--near-dedup", choices=["both", "off"], default="both")
    ap.add_argument("--out", default=None)
    ap.add_argument("--driver-docs", type=int, default=None)
    ap.add_argument("--prior", action="store_true")
    workers = ["pipeline", "pipeline-near", "raw", "resolve", "resolve-near"]
    ap.add_argument("--worker", choices=workers, default=None)
    ap.add_argument("--files-dir", default=None)
    ap.add_argument("--tokenizer", default=None)
    a = ap.parse_args()
    if a.worker:
        if a.worker.startswith("resolve"):
            res = run_resolve(a)
        else:
            res = run_raw(a) if a.worker == "raw" else run_pipeline(a)
        print(json.dumps(res))
        return
    if a.driver_docs:
        res = driver_memory(a.driver_docs)
        print(json.dumps(res, indent=1))
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
        return

    from pipeline.steps import normalise_text
    from pipeline.tokenizer import train_bpe

    files = corpus_files(a.mb)
    with tempfile.TemporaryDirectory() as tmp:
        # A private copy, so both sides read exactly the same files.
        src = Path(tmp) / "corpus"
        base = Path(sysconfig.get_paths()["stdlib"])
        for p in files:
            q = src / Path(p).relative_to(base)
            q.parent.mkdir(parents=True, exist_ok=True)
            q.write_bytes(Path(p).read_bytes())
        t0 = time.perf_counter()
        sample = [normalise_text(Path(p).read_bytes().decode("utf-8", "replace")) for p in files]
        sample = sample[:: max(1, len(sample) // 400)]
        tok_path = Path(tmp) / "tokenizer.json"
        tok_path.write_text(train_bpe(sample, a.vocab, 2, "<|eod|>"))
        train_s = time.perf_counter() - t0
        texts = [normalise_text(Path(p).read_bytes().decode("utf-8", "replace")) for p in files]
        result: dict = {
            "benchmark": "preprocess",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "corpus": {
                "source": "python stdlib *.py, sorted paths",
                "files": len(files),
                "bytes": sum(os.path.getsize(p) for p in files),
            },
            "vocab_size": a.vocab,
            "tokenizer_train_seconds": train_s,
            "runs": {},
        }
        if a.near_dedup == "both":
            result["minhash_1cpu"] = minhash_costs(texts)
        for n in a.cpus:
            pipe = sub("pipeline", n, str(src), str(tok_path))
            raw = sub("raw", n, str(src), str(tok_path))
            result["runs"][str(n)] = {
                "pipeline": pipe,
                "raw_tokenizers": raw,
                "ratio_mb_per_s": pipe["mb_per_s"] / raw["mb_per_s"],
                "ratio_tokens_per_s": pipe["tokens_per_s"] / raw["tokens_per_s"],
            }
            if a.near_dedup == "both":
                near = sub("pipeline-near", n, str(src), str(tok_path))
                result["runs"][str(n)]["near_dedup"] = {
                    "pipeline": near,
                    "slowdown": near["seconds"] / pipe["seconds"],
                    "extra_seconds": near["seconds"] - pipe["seconds"],
                    "extra_scan_seconds": near["phases"]["scan"] - pipe["phases"]["scan"],
                    "ratio_mb_per_s": near["mb_per_s"] / raw["mb_per_s"],
                }
            print(f"cpus={n}: {json.dumps(result['runs'][str(n)])}", file=sys.stderr)
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
