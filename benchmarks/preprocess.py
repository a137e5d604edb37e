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

    python benchmarks/preprocess.py [--mb 50] [--cpus 1 2] [--near-dedup both|off]
        [--repeat N] [--out f.json]

``--repeat N`` runs every kind N times, interleaved (the order flips each repeat), and reports
the best run of each kind beside all of them: on a shared machine the best run is the least
disturbed one, and the spread says how noisy the machine was.

``--driver-docs N [N ...]`` measures instead the driver of a real run (local Ray, 2 CPUs) over
N synthetic one-line documents (~80 bytes, 10k a file), near_dedup off and on, then of an
incremental run of one more file over that dataset: peak RSS growth of the driver process per
document of the dataset, seconds per document, the dedup phase and the state's size on disk.
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


def recipe(
    files_dir: str,
    output: str,
    tokenizer: str,
    cpus: int,
    near: bool,
    executor: str,
    unit_bytes: int = 2_000_000,
) -> dict:
    return {
        "name": "bench",
        "inputs": [{"path": files_dir, "glob": "**/*.py", "format": "text", "text_unit": "file"}],
        "output": output,
        # the frequency code table is counted on a 1 MB sample (by the scan tasks)
        "tokenizer": {"path": tokenizer, "sample_bytes": 1_000_000},
        "filters": {"min_chars": 1, "max_chars": 10_000_000},
        "near_dedup": {"enabled": near},
        "code_table": "frequency",
        "seq_len": 1024,
        "block_size": 4,
        "val_fraction": 0.01,
        # 10 units of 2 MB (plus a small one) for 20 MB: several per CPU, so that the last
        # wave of tasks is short; a recipe setting, the same at any CPU count
        "unit_bytes": unit_bytes,
        "progress": False,
        "ray": {"num_cpus": cpus, "executor": executor},
    }


def run_pipeline(args: argparse.Namespace) -> dict:
    import ray

    cpus = args.cpus[0]
    import bitlm.codec  # noqa: F401  (imports torch: the driver's code table; imports excluded)
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
        near = args.worker == "pipeline-near"
        r = recipe(args.files_dir, out, args.tokenizer, cpus, near, args.executor, args.unit_bytes)
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


def synthetic_corpus(root: Path, docs: int, per_file: int = 10_000, tag: str = "w") -> None:
    """``docs`` distinct one-line documents of 12 random words (~80 bytes), ``per_file`` a file."""
    import numpy as np

    rng = np.random.default_rng(len(tag))
    vocab = np.array([f"{tag}{i}" for i in range(50_000)])
    root.mkdir(parents=True, exist_ok=True)
    for i in range(0, docs, per_file):
        n = min(per_file, docs - i)
        words = vocab[rng.integers(0, vocab.size, size=(n, 12))]
        lines = "".join(f"{i + j} " + " ".join(w) + "\n" for j, w in enumerate(words))
        (root / f"{tag}{i // per_file:06d}.txt").write_text(lines)


def run_driver(args: argparse.Namespace) -> dict:
    """The driver of one real run over the synthetic corpus (``--files-dir``) into
    ``--out-dir`` on a local Ray of 2 CPUs: peak RSS growth of this process (the driver) over its
    state after ``ray.init``, the phase timings and the dedup state's size on disk."""
    import resource

    import ray

    from bitlm.recipe import from_dict
    from pipeline import run_preprocess
    from pipeline.config import PreprocessConfig

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    recipe = {
        "name": "bench",
        "inputs": [{"path": args.files_dir, "glob": "*.txt", "text_unit": "line"}],
        "output": args.out_dir,
        "tokenizer": {"vocab_size": 4096, "sample_bytes": 1_000_000},
        "near_dedup": {"enabled": args.worker == "driver-near"},
        "unit_bytes": 16 << 20,
        "progress": False,
    }
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    s = run_preprocess(from_dict(PreprocessConfig, recipe))
    secs = time.perf_counter() - t0
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    ray.shutdown()
    return {
        "docs": s["run"]["docs"],
        "dataset_docs": s["totals"]["docs"],
        "seconds": secs,
        "phases": s["timings"],
        "driver_peak_rss_growth_bytes": grew,
        "dedup_state_bytes": sum(
            p.stat().st_size for p in (Path(args.out_dir) / "dedup").rglob("*.parquet")
        ),
    }


def driver_memory(sizes: list[int]) -> dict:
    """``run_driver`` at each corpus size, near_dedup off and on: the first run, then an
    incremental run of one new file (10k documents) over that dataset, each in a fresh process."""
    result: dict = {"benchmark": "driver of a real run (local Ray, 2 CPUs)", "runs": {}}
    for n in sizes:
        for kind in ("driver", "driver-near"):
            m = {}
            with tempfile.TemporaryDirectory() as tmp:
                corpus, out = Path(tmp) / "corpus", Path(tmp) / "out"
                synthetic_corpus(corpus, n)
                for mode in ("first_run", "incremental_run"):
                    if mode == "incremental_run":
                        synthetic_corpus(corpus, 10_000, tag="x")
                    cmd = [sys.executable, __file__, "--worker", kind]
                    cmd += ["--files-dir", str(corpus), "--out-dir", str(out)]
                    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=3000)
                    if r.returncode != 0:
                        raise RuntimeError(f"{kind} failed:\n{r.stderr[-4000:]}")
                    v = json.loads(r.stdout.strip().splitlines()[-1])
                    grew = v["driver_peak_rss_growth_bytes"]
                    v["driver_bytes_per_dataset_doc"] = grew / v["dataset_docs"]
                    v["us_per_doc"] = v["seconds"] / v["docs"] * 1e6
                    v["dedup_us_per_doc"] = v["phases"]["dedup"] / v["docs"] * 1e6
                    v["state_bytes_per_dataset_doc"] = v["dedup_state_bytes"] / v["dataset_docs"]
                    m[mode] = v
            key = f"{n}/near_dedup_{'on' if kind == 'driver-near' else 'off'}"
            result["runs"][key] = m
            print(key, json.dumps(m), file=sys.stderr)
    return result


def sub(kind: str, cpus: int, files_dir: str, tokenizer: str, a: argparse.Namespace) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": str(cpus)}
    env["TOKENIZERS_PARALLELISM"] = "true" if (kind == "raw" and cpus > 1) else "false"
    cmd = [sys.executable, __file__, "--worker", kind, "--cpus", str(cpus)]
    cmd += ["--files-dir", files_dir, "--tokenizer", tokenizer, "--executor", a.executor]
    cmd += ["--unit-bytes", str(a.unit_bytes)]
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
    ap.add_argument("--driver-docs", type=int, nargs="+", default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--executor", choices=["data", "tasks"], default="tasks", help="ray.executor")
    ap.add_argument("--unit-bytes", type=int, default=2_000_000, help="the recipe's unit_bytes")
    workers = ["pipeline", "pipeline-near", "raw", "driver", "driver-near"]
    ap.add_argument("--worker", choices=workers, default=None)
    ap.add_argument("--files-dir", default=None)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--tokenizer", default=None)
    a = ap.parse_args()
    if a.worker:
        if a.worker.startswith("driver"):
            res = run_driver(a)
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
            "executor": a.executor,
            "corpus": {
                "source": "python stdlib *.py, sorted paths",
                "files": len(files),
                "bytes": sum(os.path.getsize(p) for p in files),
            },
            "vocab_size": a.vocab,
            "unit_bytes": a.unit_bytes,
            "tokenizer_train_seconds": train_s,
            "runs": {},
        }
        if a.near_dedup == "both":
            result["minhash_1cpu"] = minhash_costs(texts)
        # repeats interleave the kinds (the machine is shared): each pair of runs at one
        # CPU count ran back to back; the ratios use the best (least disturbed) run of each kind
        kinds = ["pipeline", "raw"] + (["pipeline-near"] if a.near_dedup == "both" else [])
        got: dict[str, dict[str, list[dict]]] = {str(n): {k: [] for k in kinds} for n in a.cpus}
        for rep in range(a.repeat):
            for n in a.cpus:
                for k in kinds if rep % 2 == 0 else kinds[::-1]:
                    got[str(n)][k].append(sub(k, n, str(src), str(tok_path), a))
                print(f"repeat {rep} cpus={n}: {json.dumps(got[str(n)])}", file=sys.stderr)
        best = lambda rs: min(rs, key=lambda r: r["seconds"])
        for n in a.cpus:
            g = got[str(n)]
            pipe, raw = best(g["pipeline"]), best(g["raw"])
            result["runs"][str(n)] = {
                "pipeline": pipe,
                "raw_tokenizers": raw,
                "ratio_mb_per_s": pipe["mb_per_s"] / raw["mb_per_s"],
                "ratio_tokens_per_s": pipe["tokens_per_s"] / raw["tokens_per_s"],
                "pipeline_seconds_all": [r["seconds"] for r in g["pipeline"]],
                "raw_seconds_all": [r["seconds"] for r in g["raw"]],
                "ratio_per_repeat": [
                    r["seconds"] / p["seconds"]
                    for p, r in zip(g["pipeline"], g["raw"], strict=True)
                ],
            }
            if a.near_dedup == "both":
                near = best(g["pipeline-near"])
                result["runs"][str(n)]["near_dedup"] = {
                    "pipeline": near,
                    "near_seconds_all": [r["seconds"] for r in g["pipeline-near"]],
                    "slowdown": near["seconds"] / pipe["seconds"],
                    "extra_seconds": near["seconds"] - pipe["seconds"],
                    "extra_scan_seconds": near["phases"]["scan"] - pipe["phases"]["scan"],
                    "ratio_mb_per_s": near["mb_per_s"] / raw["mb_per_s"],
                }
        if len(a.cpus) > 1:
            lo, hi = str(min(a.cpus)), str(max(a.cpus))
            sec = lambda n, k: result["runs"][n][k]["seconds"]
            result["scaling"] = {
                "cpus": [int(lo), int(hi)],
                "pipeline": sec(lo, "pipeline") / sec(hi, "pipeline"),
                "raw_tokenizers": sec(lo, "raw_tokenizers") / sec(hi, "raw_tokenizers"),
            }
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
