"""Checkpoint evaluation into MLflow child runs (docs/evaluation.md).

    run (MLflow id or name) -> run folder <storage_path>/<name> -> checkpoint_<step> folders
    each selected checkpoint -> consolidated model (<run folder>/eval/<checkpoint>/model)
        -> metrics on the validation split + generated samples
        -> one child run of the training run, tags bitlm_kind=eval, bitlm_eval_step=<step>,
           metrics logged at step=<step>, samples as artifacts

Idempotent: a checkpoint whose step already has a FINISHED child run is skipped, so evaluating
twice, a restarted watcher, or a resumed training run never duplicates an evaluation. MLflow
failures are reported per checkpoint and never stop the evaluation of the others.

What it loads (anyone who can create an MLflow run can log any storage_path param): a run name
resolves in one experiment only (``--experiment``, or the only experiment holding a training
run of that name; a reference run in the evaluated run's own experiment); the run's folder must
lie under a trusted storage root (``storage_roots``); an explicit checkpoint must lie in the
run's folder; DeepSpeed's pickled shards are read with ``weights_only=True``
(``bitlm.safeload``), consolidated models are safetensors. The checkpoint layout and what
makes a checkpoint complete (its commit marker) are ``bitlm.checkpoint``'s; run lookup and the
claims on child runs are ``bitlm.tracking``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import tracking
from ..checkpoint import MARKER, STATE_FILE, consolidate, is_complete, list_complete, read_state
from ..model import BitLM
from ..recipe import from_dict

if TYPE_CHECKING:
    from ..train.launch import Started

log = logging.getLogger("bitlm.eval")

__all__ = [
    "ROOTS_ENV",
    "EvalError",
    "EvalSettings",
    "RunRef",
    "evaluate_checkpoint",
    "evaluate_run",
    "resolve_run",
    "start_auto_eval",
    "storage_roots",
    "watch",
]

ROOTS_ENV = "BITLM_STORAGE_ROOTS"  # comma-separated storage roots evaluation may load from


class EvalError(ValueError):
    """Bad input (no checkpoints, a folder outside the trusted roots, a checkpoint from another
    dataset): one clear line. An unknown run is tracking's RunLookupError."""


@dataclass
class EvalSettings:
    """What one evaluation computes (defaults sized for CPU; all are CLI flags)."""

    max_rows: int = 32  # validation rows for the loss and the teacher-forced metrics
    batch_size: int = 8
    sample_steps: int = 0  # K for sampling; 0: the model's default
    freq_buckets: int = 4
    prompt_tokens: int = 16  # prompts are the first tokens of validation rows
    new_tokens: int = 32
    gen_batch: int = 16  # generation throughput at batch 1 and at this batch; the samples
    ngram_rows: int = 2048  # train rows the reference Kneser-Ney trigram is fitted on (0: none)
    seed: int = 0


@dataclass
class RunRef:
    """A training run as evaluation sees it."""

    run_id: str
    name: str
    experiment_id: str
    run_dir: str  # <storage_path>/<name>, local path or s3:// URI
    data_path: str
    split: str = "val"  # evaluated split
    train_split: str = "train"  # its fingerprint must match the checkpoint's
    status: str = "RUNNING"
    tracking_uri: str = ""


@dataclass
class Outcome:
    step: int
    status: str  # evaluated | skipped | failed | busy
    child_run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""


# ---- runs and checkpoints --------------------------------------------------------------------
def storage_roots(tracking_uri: str | None = None, extra: Any = ()) -> list[str]:
    """The storage roots evaluation loads run folders from: ``extra`` (--storage-root),
    $BITLM_STORAGE_ROOTS (comma-separated), training's default ``./runs``, and the folder of
    an embedded sqlite store (training keeps it beside its runs). Local roots are real paths."""
    items = [*extra, *os.environ.get(ROOTS_ENV, "").split(","), "runs"]
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        items.append(str(Path(tracking_uri[len("sqlite:///") :]).parent))
    out: list[str] = []
    for it in (str(x).strip() for x in items):
        if not it:
            continue
        root = it.rstrip("/") if "://" in it else os.path.realpath(os.path.abspath(it))
        if root not in out:
            out.append(root)
    return out


def is_inside(path: str, roots: list[str]) -> bool:
    """``path`` lies in one of ``roots`` (local: after resolving symlinks and '..'; URIs: a
    prefix match of the normalised URI, '..' refused)."""
    if "://" in path:
        rest = path.split("://", 1)[1]
        if any(seg in ("..", ".") for seg in rest.split("/")):
            return False
        p = path.rstrip("/")
        return any(p == r or p.startswith(r + "/") for r in roots if "://" in r)
    real = os.path.realpath(os.path.abspath(path))
    for r in roots:
        if "://" in r:
            continue
        if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
            return True
    return False


def _check_root(what: str, folder: str, roots: list[str]) -> None:
    if not is_inside(folder, roots):
        raise EvalError(
            f"{what} points at {folder}, outside the storage roots evaluation trusts "
            f"({', '.join(roots)}): not loading from it; if that folder is yours, pass "
            f"--storage-root (or set {ROOTS_ENV})"
        )


def resolve_run(
    run: str,
    tracking_uri: str,
    wait_params_s: float = 0.0,
    *,
    experiment: str | None = None,
    experiment_id: str | None = None,
    roots: Any = (),
) -> RunRef:
    """MLflow id or name -> RunRef (its folder and dataset from the logged recipe params).
    The name must be unambiguous (``tracking.find_run``: a RunLookupError otherwise) and the
    folder under a trusted storage root (``storage_roots(tracking_uri, roots)``: an EvalError
    otherwise), before anything is read."""
    client = tracking.client(tracking_uri)
    r = tracking.find_run(client, run, experiment, experiment_id=experiment_id, unique=True)
    deadline = time.monotonic() + wait_params_s
    while "storage_path" not in r.data.params and time.monotonic() < deadline:
        time.sleep(2.0)  # rank 0 logs the params shortly after the run starts
        r = client.get_run(r.info.run_id)
    p = r.data.params
    if "storage_path" not in p or "data.path" not in p:
        raise EvalError(
            f"run {run!r} ({r.info.run_id}) has no storage_path/data.path params: "
            "not a BitLM training run (or it has not started logging yet)"
        )
    run_dir = f"{p['storage_path'].rstrip('/')}/{r.info.run_name}"
    _check_root(
        f"run {r.info.run_name!r} ({r.info.run_id})", run_dir, storage_roots(tracking_uri, roots)
    )
    return RunRef(
        run_id=r.info.run_id,
        name=r.info.run_name,
        experiment_id=r.info.experiment_id,
        run_dir=run_dir,
        data_path=p["data.path"],
        split=p.get("data.eval_split") or "val",
        train_split=p.get("data.split") or "train",
        status=r.info.status,
        tracking_uri=tracking_uri,
    )


def _read_state(ckpt: str) -> dict[str, Any]:
    try:
        state = read_state(ckpt)
    except (OSError, ValueError) as e:
        raise EvalError(f"{ckpt}: not a training checkpoint ({STATE_FILE}: {e})") from None
    if not is_complete(ckpt):
        raise EvalError(f"{ckpt}: an unfinished checkpoint (no {MARKER}): not evaluated")
    return state


def eval_dir(run_dir: str) -> Path:
    """Where consolidated models and local results of a run's evaluations go (for a run on
    S3, a folder of this user's own: a shared /tmp folder would let another user plant a
    model that is then reused)."""
    if "://" in run_dir:
        key = hashlib.sha256(run_dir.encode()).hexdigest()[:16]
        mine = Path(tempfile.gettempdir()) / f"bitlm-eval-{os.getuid()}"
        mine.mkdir(mode=0o700, exist_ok=True)
        st = mine.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise EvalError(f"{mine}: not a private folder of this user; remove it")
        return mine / key
    return Path(run_dir) / "eval"


def model_dir_of(run_dir: str, ckpt: str) -> Path:
    """The consolidated model folder of a checkpoint of a run."""
    return eval_dir(run_dir) / ckpt.rstrip("/").rsplit("/", 1)[-1] / "model"


def load_model_dir(path: str | Path) -> tuple[BitLM, dict[str, Any], str | None]:
    """A consolidated model folder -> (model, trainer state or {}, tokenizer.json text)."""
    path = Path(path)
    model = BitLM.from_pretrained(path).eval()
    state = json.loads((path / STATE_FILE).read_text()) if (path / STATE_FILE).is_file() else {}
    tok = (path / "tokenizer.json").read_text() if (path / "tokenizer.json").is_file() else None
    return model, state, tok


def load_any_model(
    spec: str,
    tracking_uri: str,
    *,
    experiment: str | None = None,
    experiment_id: str | None = None,
    roots: Any = (),
) -> tuple[BitLM, dict[str, Any], str | None]:
    """A consolidated model folder, a training checkpoint folder, a run folder (given by the
    user: loaded as named) or an MLflow run (its latest checkpoint; resolved as resolve_run
    does, in ``experiment``/``experiment_id``, under trusted roots) -> (model, trainer
    state, tokenizer.json)."""
    p = Path(spec)
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return load_model_dir(p)
    if "://" in spec or p.exists():
        ckpt = spec
        if not (p / STATE_FILE).is_file() and "://" not in spec:
            ckpts = list_complete(str(p.absolute()))
            if not ckpts:
                raise EvalError(f"{spec}: no complete checkpoint in this folder")
            ckpt = ckpts[-1][1]
        else:
            _read_state(ckpt)  # a complete one
        run_dir = ckpt.rstrip("/").rsplit("/", 1)[0]
    else:
        ref = resolve_run(
            spec, tracking_uri, experiment=experiment, experiment_id=experiment_id, roots=roots
        )
        ckpts = list_complete(ref.run_dir)
        if not ckpts:
            raise EvalError(f"run {spec!r} has no complete checkpoint in {ref.run_dir}")
        run_dir, ckpt = ref.run_dir, ckpts[-1][1]
    return load_model_dir(consolidate(ckpt, model_dir_of(run_dir, ckpt)))


# ---- the evaluation itself -------------------------------------------------------------------
def _tokenizer(text: str | None):
    if not text:
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_str(text)
    except Exception:
        return None


@torch.no_grad()
def evaluate_model(
    model: BitLM,
    data_path: str,
    split: str,
    settings: EvalSettings,
    reference: BitLM | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """All metrics of docs/evaluation.md for ``model`` on the first rows of ``split``; returns
    (metrics, samples)."""
    from tqdm import tqdm

    from ..train.data import Dataset
    from .metrics import (
        COND_GAIN_TS,
        TeacherForced,
        distinct_n,
        frequency_buckets,
        generation_throughput,
        ngram_perplexity,
        repetition_rate,
        token_logprobs,
        unigram_entropy,
    )
    from .ngram import KneserNey

    model.eval()
    ds = Dataset(data_path, split, 0)
    n = min(settings.max_rows, ds.num_rows)
    tokens = ds.codec.from_codewords(torch.from_numpy(ds.read_rows(np.arange(n))))
    V = model.config.vocab_size
    buckets = frequency_buckets(tokens, V, settings.freq_buckets)
    tf = TeacherForced(model, buckets, settings.freq_buckets)
    steps = settings.sample_steps or None
    loss_sum = 0.0
    batches = range(0, n, settings.batch_size)
    for i in tqdm(batches, desc="teacher-forced", unit="batch", disable=not progress):
        x = tokens[i : i + settings.batch_size]
        g = torch.Generator().manual_seed(settings.seed * 1_000_003 + i)
        loss_sum += float(model.loss(x, g)) * x.shape[0]
        tf.add(x, model.evaluate(x, steps=steps, generator=g))
    metrics = {"val/loss": loss_sum / n, **tf.metrics(), "val/rows": float(n)}
    if model.is_diffusion:
        g = torch.Generator().manual_seed(settings.seed)
        gains = model.condition_gain(tokens[: settings.batch_size], COND_GAIN_TS, g)
        for t, (true, null) in gains.items():
            metrics[f"head/cond_gain_t{t:g}"] = null - true

    # Generation: prompts are the first tokens of validation rows (KV cache, sampling defaults).
    P, new = min(settings.prompt_tokens, ds.manifest.seq_len), settings.new_tokens
    idx = np.arange(settings.gen_batch) % ds.num_rows
    prompts = ds.codec.from_codewords(torch.from_numpy(ds.read_rows(idx)))[:, :P]
    tps1, _ = generation_throughput(model, prompts[:1], new, settings.seed)
    tpsb, out = generation_throughput(model, prompts, new, settings.seed)
    metrics["gen/tokens_per_s_b1"] = tps1
    metrics["gen/ms_per_token_b1"] = 1000.0 / tps1
    metrics[f"gen/tokens_per_s_b{settings.gen_batch}"] = tpsb
    cont = out[:, P:].tolist()
    for k in (1, 2, 3):
        metrics[f"gen/distinct_{k}"] = distinct_n(cont, k)
    metrics["gen/repetition_rate"] = repetition_rate(cont, 4)
    metrics["gen/unigram_entropy"] = unigram_entropy(cont)
    if settings.ngram_rows > 0:
        train = Dataset(data_path, "train", 0)
        rows = train.read_rows(np.arange(min(settings.ngram_rows, train.num_rows)))
        ngram = KneserNey(3, vocab_size=V).fit(ds.codec.from_codewords(torch.from_numpy(rows)))
        metrics["gen/ngram_perplexity"] = ngram_perplexity(ngram, out.tolist(), P)
        real = ds.codec.from_codewords(torch.from_numpy(ds.read_rows(idx)))[:, : P + new]
        metrics["gen/ngram_perplexity_real"] = ngram_perplexity(ngram, real.tolist(), P)
        metrics["gen/unigram_entropy_real"] = unigram_entropy(real[:, P:].tolist())
    ref_lp = None
    if reference is not None:
        reference.eval()
        g = torch.Generator().manual_seed(settings.seed)
        ref_lp = token_logprobs(reference, out, g)[:, P:]  # score the continuation only
        metrics["gen/ref_perplexity"] = math.exp(-float(ref_lp.mean()))
    tok = _tokenizer(ds.manifest.tokenizer_json())
    samples = []
    for i, row in enumerate(out.tolist()):
        s: dict[str, Any] = {"prompt_ids": row[:P], "ids": row[P:]}
        if tok is not None:
            s["prompt"] = tok.decode(row[:P], skip_special_tokens=False)
            s["text"] = tok.decode(row[P:], skip_special_tokens=False)
        if ref_lp is not None:
            s["ref_nll_nats"] = -float(ref_lp[i].mean())
        samples.append(s)
    return metrics, samples


def _samples_text(samples: list[dict[str, Any]]) -> str:
    parts = []
    for i, s in enumerate(samples):
        head = f"=== sample {i}" + (
            f" (reference nll {s['ref_nll_nats']:.3f} nats/token)" if "ref_nll_nats" in s else ""
        )
        parts.append(f"{head}\n--- prompt\n{s.get('prompt', s['prompt_ids'])}\n--- continuation")
        parts.append(str(s.get("text", s["ids"])) + "\n")
    return "\n".join(parts)


def _check_dataset(parent: RunRef, ckpt: str, state: dict[str, Any]) -> None:
    from ..dataset_format import DataError, Manifest

    try:
        man = Manifest.load(parent.data_path)
    except DataError as e:
        raise EvalError(f"run {parent.name!r}: its dataset is unreadable: {e}") from None
    if parent.split not in man.splits:
        raise EvalError(f"{parent.data_path}: no {parent.split!r} split to evaluate on")
    fp = state.get("fingerprint")  # of the dataset version it was trained on (grown since: ok)
    if (
        fp is not None
        and man.version_of(parent.train_split, fp, state.get("dataset_version")) is None
    ):
        raise EvalError(
            f"checkpoint {ckpt} was trained on another dataset (fingerprint {str(fp)[:12]}), "
            f"run {parent.name!r} uses {parent.data_path} (fingerprint "
            f"{man.fingerprint(parent.train_split)[:12]})"
        )


def evaluate_checkpoint(
    parent: RunRef,
    step: int,
    ckpt: str,
    settings: EvalSettings,
    reference: BitLM | None = None,
    reference_name: str = "",
    progress: bool = False,
) -> Outcome:
    """Evaluate one checkpoint into a child run of ``parent`` (skipped if already done)."""
    state = _read_state(ckpt)
    _check_dataset(parent, ckpt, state)
    client = tracking.client(parent.tracking_uri)
    cid, why = tracking.claim_eval(
        client, parent.experiment_id, parent.run_id, parent.name, step, ckpt
    )
    if cid is None:
        return Outcome(step, why)
    try:
        model_dir = consolidate(ckpt, model_dir_of(parent.run_dir, ckpt))
        model, state, _ = load_model_dir(model_dir)
        t0 = time.perf_counter()
        metrics, samples = evaluate_model(
            model, parent.data_path, parent.split, settings, reference, progress
        )
        metrics["tokens_seen"] = float(state.get("tokens_seen", 0))
        metrics["eval/seconds"] = time.perf_counter() - t0
        params = {f"eval.{k}": v for k, v in dataclasses.asdict(settings).items()}
        params["eval.reference"] = reference_name or "-"
        params["eval.model_dir"] = str(model_dir)
        texts = {
            "samples/samples.txt": _samples_text(samples),
            "samples/samples.jsonl": "\n".join(json.dumps(s) for s in samples) + "\n",
        }
        tracking.finish_eval(client, cid, step, metrics, params, texts)
        return Outcome(step, "evaluated", cid, metrics)
    except BaseException as e:
        with contextlib.suppress(Exception):
            client.set_tag(cid, "error", f"{type(e).__name__}: {e}"[:4000])
            client.set_terminated(cid, "FAILED")
        raise


def _reference(spec: str, tracking_uri: str, parent: RunRef, roots: Any = ()) -> BitLM:
    """The reference model: a folder, or a run of the evaluated run's own experiment."""
    from ..dataset_format import Manifest, tokenizer_hash

    data_path = parent.data_path
    model, _, tok = load_any_model(
        spec, tracking_uri, experiment_id=parent.experiment_id, roots=roots
    )
    man = Manifest.load(data_path)
    if tok is not None and tokenizer_hash(tok) != man.tokenizer_hash:
        raise EvalError(f"reference {spec!r} uses another tokenizer than {data_path}")
    if model.config.vocab_size != man.vocab_size:
        raise EvalError(
            f"reference {spec!r} has vocab_size={model.config.vocab_size}, "
            f"the dataset {man.vocab_size}"
        )
    return model


def _root_of(parent: RunRef) -> str:
    d = parent.run_dir
    return d.rstrip("/") if "://" in d else os.path.realpath(os.path.abspath(d))


def _selected(step: int, every: int, final_step: int | None) -> bool:
    return every <= 0 or step % every == 0 or step == final_step


def evaluate_run(
    run: str | RunRef,
    checkpoint: str = "latest",
    *,
    tracking_uri: str | None = None,
    reference: str = "",
    settings: EvalSettings | None = None,
    progress: bool = False,
    on_outcome: Callable[[Outcome], None] | None = None,
    experiment: str | None = None,
    storage_roots: Any = (),
) -> list[Outcome]:
    """Evaluate ``checkpoint`` ("latest", "all", or a checkpoint folder of the run's own
    folder) of a training run."""
    settings = settings or EvalSettings()
    uri = tracking_uri or tracking.default_tracking_uri()
    roots = storage_roots
    if isinstance(run, RunRef):
        parent = run
    else:
        parent = resolve_run(run, uri, experiment=experiment, roots=roots)
    if checkpoint not in ("latest", "all") and not is_inside(checkpoint, [_root_of(parent)]):
        raise EvalError(
            f"{checkpoint} is not a checkpoint of run {parent.name!r} (its folder is "
            f"{parent.run_dir}): not loading it"
        )
    if checkpoint in ("latest", "all"):
        ckpts = list_complete(parent.run_dir)
        if not ckpts:
            raise EvalError(f"run {parent.name!r} has no complete checkpoint in {parent.run_dir}")
        todo = ckpts if checkpoint == "all" else ckpts[-1:]
    else:
        state = _read_state(checkpoint)
        todo = [(int(state["step"]), checkpoint)]
    ref_model = _reference(reference, uri, parent, roots) if reference else None
    out = []
    for step, ckpt in todo:
        try:
            o = evaluate_checkpoint(parent, step, ckpt, settings, ref_model, reference, progress)
        except EvalError:
            raise
        except Exception as e:  # MLflow or I/O trouble: report, go on with the others
            log.warning("evaluation of %s failed: %s: %s", ckpt, type(e).__name__, e)
            o = Outcome(step, "failed", error=f"{type(e).__name__}: {e}")
        out.append(o)
        if on_outcome is not None:
            on_outcome(o)
    return out


def watch(
    run: str | RunRef,
    *,
    tracking_uri: str | None = None,
    every_steps: int = 0,
    final_step: int | None = None,
    reference: str = "",
    settings: EvalSettings | None = None,
    poll_s: float = 3.0,
    max_attempts: int = 3,
    progress: bool = False,
    on_outcome: Callable[[Outcome], None] | None = None,
    experiment: str | None = None,
    storage_roots: Any = (),
) -> list[Outcome]:
    """Evaluate every selected checkpoint of a training run as it appears, once each, until
    the run is no longer RUNNING and nothing is left. Safe to restart (evaluated steps are
    skipped) and to run beside training (one CPU thread while training runs)."""
    settings = settings or EvalSettings()
    uri = tracking_uri or tracking.default_tracking_uri()
    roots = storage_roots
    if isinstance(run, RunRef):  # built by the training driver from its own recipe
        parent = run
    else:
        parent = resolve_run(run, uri, wait_params_s=120, experiment=experiment, roots=roots)
    client = tracking.client(uri)
    done: set[int] = set()
    attempts: dict[int, int] = {}
    outcomes: list[Outcome] = []
    ref_model = None
    threads = torch.get_num_threads()
    while True:
        try:
            status = client.get_run(parent.run_id).info.status
        except Exception:
            status = "RUNNING"  # MLflow unreachable: keep going
        training = status == "RUNNING"
        torch.set_num_threads(1 if training else threads)
        try:
            done |= tracking.evaluated_steps(client, parent.experiment_id, parent.run_id)
        except Exception as e:
            log.warning("MLflow: cannot list evaluations (%s); retrying", type(e).__name__)
            time.sleep(poll_s)
            continue
        todo = [
            (s, c)
            for s, c in list_complete(parent.run_dir)
            if s not in done
            and attempts.get(s, 0) < max_attempts
            and _selected(s, every_steps, final_step)
        ]
        for _, c in todo:  # consolidate first: keep_last may delete a checkpoint meanwhile
            with contextlib.suppress(Exception):
                consolidate(c, model_dir_of(parent.run_dir, c))
        if todo and reference and ref_model is None:
            try:
                ref_model = _reference(reference, uri, parent, roots)
            except Exception as e:
                log.warning("reference model %r unavailable: %s", reference, e)
                reference = ""
        for s, c in todo:
            try:
                o = evaluate_checkpoint(parent, s, c, settings, ref_model, reference, progress)
            except Exception as e:
                o = Outcome(s, "failed", error=f"{type(e).__name__}: {e}")
                log.warning("evaluation of step %d failed: %s", s, o.error)
            attempts[s] = attempts.get(s, 0) + (o.status != "busy")
            if o.status in ("evaluated", "skipped"):
                done.add(s)
            outcomes.append(o)
            if on_outcome is not None:
                on_outcome(o)
        if not training and not todo:
            return outcomes
        if not any(o.status == "evaluated" for o in outcomes[len(outcomes) - len(todo) :]):
            time.sleep(poll_s)  # nothing new, or only steps another evaluator holds


# ---- automatic evaluation (beside a training run; the job layer wires it) --------------------
class AutoEval:
    """The watcher of one training run, as a Ray task (0 CPUs: it never delays training)."""

    def __init__(self, ref: Any) -> None:
        self._ref = ref

    def wait(self, timeout_s: float | None = None) -> list[Outcome]:
        """Wait for the watcher (after the run's final status is set); never raises."""
        import ray

        try:
            return ray.get(self._ref, timeout=timeout_s)
        except Exception as e:
            log.warning("automatic evaluation did not finish: %s: %s", type(e).__name__, e)
            return []

    def cancel(self) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.cancel(self._ref, force=True)


def _watch_task(
    ref: dict[str, Any], every: int, final: int, reference: str, roots: list[str]
) -> list[Outcome]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    def say(o: Outcome) -> None:
        log.info("eval of %s step %d: %s %s", ref["name"], o.step, o.status, o.error)

    return watch(
        RunRef(**ref),
        tracking_uri=ref["tracking_uri"],
        every_steps=every,
        final_step=final,
        reference=reference,
        on_outcome=say,
        storage_roots=roots,
    )


def start_auto_eval(run: Started) -> AutoEval | None:
    """``eval.auto``: the watcher of a training run as a Ray task, with the workers' environment
    (credentials reach it only there, never its arguments). The job layer hands this to
    ``bitlm.train.run`` as ``on_start``; the driver waits for it at the end."""
    recipe = run.recipe
    if not recipe.eval.auto:
        return None
    import ray

    info = tracking.client(run.tracking_uri).get_run(run.mlflow_run_id).info
    ref = RunRef(
        run_id=run.mlflow_run_id,
        name=recipe.name,
        experiment_id=info.experiment_id,
        run_dir=run.run_dir,
        data_path=recipe.data.path,
        split=recipe.data.eval_split or "val",
        train_split=recipe.data.split,
        tracking_uri=tracking.split_credentials(run.tracking_uri)[0],
    )
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # beside the driver (the head under `ray job submit`), not on a trainer's node; soft: any
    # node if that one is gone
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    task = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(_watch_task)
    if run.env:
        task = task.options(runtime_env={"env_vars": run.env})
    return AutoEval(
        task.remote(
            dataclasses.asdict(ref),
            recipe.eval.auto_every_steps,
            recipe.steps,
            recipe.eval.reference_run,
            [recipe.storage_path],
        )
    )


def settings_from(ns: Any) -> EvalSettings:
    """EvalSettings from an argparse namespace holding its fields."""
    return from_dict(
        EvalSettings, {f.name: getattr(ns, f.name) for f in dataclasses.fields(EvalSettings)}
    )
