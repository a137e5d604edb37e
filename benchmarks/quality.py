"""Quality at equal compute: AR, BitLM-softmax and BitLM variants trained on the same tokens in
the same order with the same optimizer, in one process; curves of every metric vs tokens seen.

    python benchmarks/quality.py [--grid benchmarks/quality_grid.yaml] [--only NAME ...]
                                 [--set train.steps=600] [--device cuda] [--out results.json]

The data is a dataset written by jobs/preprocess.py (default data/stdlib-prose, the English
docstrings and comments of the standard library: it is made on first use from
recipes/preprocess/stdlib-prose.yaml). Every variant is a set of ModelConfig overrides on the
grid's base; metrics are BitLM.evaluate's (greedy and sampled decoding for every model, mean-field
and chain-rule bits/token), the head's condition gain, and the samples' statistics: perplexity
under an interpolated Kneser-Ney trigram fitted on the train split, unigram entropy (against real
text of the same length), distinct-n and repetition. Writes JSON under benchmarks/results/ and a
PNG of the curves beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bitlm import BitLM, ModelConfig  # noqa: E402
from bitlm.codec import CodeTable  # noqa: E402
from bitlm.eval.metrics import (  # noqa: E402
    COND_GAIN_TS,
    TeacherForced,
    distinct_n,
    frequency_buckets,
    ngram_perplexity,
    repetition_rate,
    unigram_entropy,
)
from bitlm.eval.ngram import KneserNey  # noqa: E402
from bitlm.recipe import merge, parse_overrides  # noqa: E402
from bitlm.train.data import Dataset  # noqa: E402

CODE_TABLES = (None, "binary", "frequency", "semantic")


def check_grid(grid: dict[str, Any]) -> None:
    """Every variant's ModelConfig and code table, before any training: a typo in the last
    variant would otherwise surface after the others have trained. SystemExit names the variant."""
    names = [v.get("name") for v in grid.get("variants", [])]
    if not names or None in names or len(set(names)) != len(names):
        raise SystemExit("error: the grid needs variants, each with a unique name")
    for v in grid["variants"]:
        unknown = set(v) - {"name", "model", "code_table", "head_lr_scale"}
        if unknown:
            raise SystemExit(f"error: variant {v['name']}: unknown key {sorted(unknown)[0]}")
        if v.get("code_table") not in CODE_TABLES:
            raise SystemExit(f"error: variant {v['name']}: unknown code_table {v['code_table']!r}")
        scale = v.get("head_lr_scale", 1.0)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
            raise SystemExit(f"error: variant {v['name']}: head_lr_scale must be a number > 0")
        try:  # the dataset's vocabulary is not known yet; any valid size checks the rest
            ModelConfig.from_dict({**grid.get("base", {}), **v.get("model", {}), "vocab_size": 256})
        except ValueError as e:  # RecipeError is one
            raise SystemExit(f"error: variant {v['name']}: {e}") from None


def ensure_dataset(path: Path) -> None:
    """Make the default corpus with the project's own preprocessing when it is missing."""
    if (path / "manifest.json").exists():
        return
    if path.resolve() != (ROOT / "data/stdlib-prose").resolve():
        raise SystemExit(f"error: no dataset at {path} (write one with jobs/preprocess.py)")
    import subprocess

    recipe = ROOT / "recipes/preprocess/stdlib-prose.yaml"
    print(f"making {path} from {recipe.name} ...", file=sys.stderr)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, str(ROOT / "jobs/preprocess.py"), "--config", str(recipe)]
    cmd += ["--set", f"output={path}"]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def lr_at(step: int, tr: dict[str, Any]) -> float:
    warm, total = tr["warmup_steps"], tr["steps"]
    if step < warm:
        return tr["lr"] * (step + 1) / warm
    q = (step - warm) / max(1, total - warm)
    return tr["lr"] * (
        tr["min_lr_ratio"] + (1 - tr["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * q))
    )


class Bench:
    """Shared data, evaluation batch, prompts and reference model for every variant."""

    def __init__(self, grid: dict[str, Any], data: Path, device: torch.device) -> None:
        self.grid, self.tr, self.ev, self.device = grid, grid["train"], grid["eval"], device
        self.train = Dataset(str(data), "train", self.tr["data_seed"])
        val = Dataset(str(data), "val", 0)
        n_val = min(max(self.ev["val_rows"], self.ev["num_samples"]), val.num_rows)
        val_rows = val.codec.from_codewords(torch.from_numpy(val.read_rows(np.arange(n_val))))
        self.val = val_rows[: self.ev["val_rows"]]  # teacher-forced metrics
        self.vocab = self.train.manifest.vocab_size
        self.code_table = self.train.manifest.code_table()
        self._tables: dict[str, CodeTable] = {}
        self.buckets = frequency_buckets(self.val, self.vocab, 4)
        t0 = time.perf_counter()
        self.train_rows = self.train.codec.from_codewords(
            torch.from_numpy(self.train.read_rows(np.arange(self.train.num_rows)))
        )
        self.ref = KneserNey(order=3, vocab_size=self.vocab).fit(self.train_rows.numpy())
        P, new = self.ev["prompt_tokens"], self.ev["new_tokens"]
        prompts = val_rows[: self.ev["num_samples"], : P + new]  # validation prompts only
        self.prompts = prompts[:, :P]
        real = prompts[:, P:].tolist()
        self.real = {
            "ref_perplexity": ngram_perplexity(self.ref, prompts.tolist(), P),
            "unigram_entropy": unigram_entropy(real),
            "distinct_2": distinct_n(real, 2),
            "repetition_rate": repetition_rate(real, 4),
        }
        print(
            f"reference trigram fitted in {time.perf_counter() - t0:.1f} s; real text: {self.real}"
        )

    def table(self, kind: str | None) -> CodeTable:
        """The dataset's code table, or one of another kind built from the train split."""
        if kind is None or kind == self.code_table.kind:
            return self.code_table
        if kind not in self._tables:
            t0 = time.perf_counter()
            if kind == "semantic":
                self._tables[kind] = CodeTable.semantic(self.train_rows.tolist(), self.vocab)
            elif kind == "binary":
                self._tables[kind] = CodeTable.binary(self.vocab)
            else:
                raise SystemExit(f"error: unknown code_table {kind!r}")
            print(f"{kind} code table built in {time.perf_counter() - t0:.1f} s")
        return self._tables[kind]

    def build(self, overrides: dict[str, Any], code_table: str | None = None) -> BitLM:
        kw = {**self.grid.get("base", {}), **overrides, "vocab_size": self.vocab}
        torch.manual_seed(self.tr["init_seed"])
        return BitLM(ModelConfig(**kw), self.table(code_table)).to(self.device)

    @torch.no_grad()
    def evaluate(self, model: BitLM, final: bool) -> dict[str, float]:
        model.eval()
        dev = self.device
        tf = TeacherForced(model, self.buckets, 4)
        g = torch.Generator(device=dev).manual_seed(self.ev["seed"])
        bs = self.ev["batch_size"]
        for i in range(0, len(self.val), bs):
            x = self.val[i : i + bs].to(dev)
            tf.add(x, model.evaluate(x, generator=g))
        out = tf.metrics()
        if model.is_diffusion:
            gains = model.condition_gain(self.val[:bs].to(dev), COND_GAIN_TS, g)
            for t, (true, null) in gains.items():
                out[f"head/cond_gain_t{t:g}"] = null - true
                out[f"head/loss_t{t:g}"] = true
        if final or self.ev.get("samples_every_eval", False):
            out.update(self.sample_stats(model))
        model.train()
        return out

    @torch.no_grad()
    def sample_stats(self, model: BitLM) -> dict[str, float]:
        """Continuations of the validation prompts, sampled (temperature 1: the headline),
        greedy (temperature 0), and every entry of eval.samplers ({name, temperature, cfg_scale,
        steps, commit, eta, shift}; cfg_scale, steps, commit, eta and shift only act on diffusion
        heads, so an entry meant for them alone names `diffusion_only: true`), each scored by the
        reference n-gram; for diffusion heads also the head evaluations each sampled block
        needed."""
        P, new = self.ev["prompt_tokens"], self.ev["new_tokens"]
        samplers = [{"name": "", "temperature": 1.0}, {"name": "_greedy", "temperature": 0.0}]
        samplers += [
            sm
            for sm in self.ev.get("samplers", [])
            if model.is_diffusion or not sm.get("diffusion_only", False)
        ]
        out: dict[str, float] = {}
        for sm in samplers:
            g = torch.Generator(device=self.device).manual_seed(self.ev["seed"])
            keys = ("temperature", "cfg_scale", "steps", "commit", "eta", "shift")
            kw = {k: sm[k] for k in keys if k in sm}
            if model.is_diffusion:
                model.head.sample_evals = 0
            seq = model.generate(self.prompts.to(self.device), new, generator=g, **kw)
            seq = seq.cpu().tolist()
            cont = [s[P:] for s in seq]
            sfx = sm["name"]
            out[f"gen/ref_perplexity{sfx}"] = ngram_perplexity(self.ref, seq, P)
            out[f"gen/unigram_entropy{sfx}"] = unigram_entropy(cont)
            out[f"gen/distinct_2{sfx}"] = distinct_n(cont, 2)
            out[f"gen/repetition_rate{sfx}"] = repetition_rate(cont, 4)
            if model.is_diffusion:  # head evaluations per sampled block (K when fixed)
                m = model.config.block_size  # the first block completes a partial prompt's
                blocks = len(seq) * -(-(P % m + new) // m)
                out[f"gen/head_evals_per_block{sfx}"] = model.head.sample_evals / blocks
        return out

    def run(
        self,
        name: str,
        overrides: dict[str, Any],
        code_table: str | None,
        head_lr_scale: float = 1.0,
    ) -> dict[str, Any]:
        """Train one variant and evaluate it along the way; head_lr_scale multiplies the
        learning rate of the output head's parameters (the rest follow train.lr)."""
        tr = self.tr
        model = self.build(overrides, code_table)
        head = {id(p) for p in model.head.parameters()}
        groups = [
            {"params": list(model.head.parameters()), "scale": float(head_lr_scale)},
            {"params": [p for p in model.parameters() if id(p) not in head], "scale": 1.0},
        ]
        opt = torch.optim.AdamW(
            groups, lr=tr["lr"], betas=(0.9, 0.95), weight_decay=tr["weight_decay"]
        )
        B, L = tr["batch_size"], self.train.manifest.seq_len
        g = torch.Generator(device=self.device).manual_seed(tr["noise_seed"])
        curve, losses, t0 = [], [], time.perf_counter()
        for step in range(tr["steps"]):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, tr) * group["scale"]
            model.set_step(step)
            x = self.train.tokens_at(np.arange(step * B, (step + 1) * B)).to(self.device)
            loss = model.loss(x, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tr["grad_clip"])
            opt.step()
            losses.append(loss.item())
            done = step + 1
            if done % self.ev["every_steps"] == 0 or done == tr["steps"]:
                m = self.evaluate(model, final=done == tr["steps"])
                m.update(
                    step=done, tokens_seen=done * B * L, train_loss=float(np.mean(losses[-20:]))
                )
                m["seconds"] = time.perf_counter() - t0
                curve.append(m)
                print(
                    f"  {name:24s} step {done:5d}  loss {m['train_loss']:.4f}  bpt "
                    f"{m['val/bits_per_token']:.3f} chain {m['val/bits_per_token_chain']:.3f}  "
                    f"acc {m['val/token_accuracy']:.3f}/{m['val/token_accuracy_sampled']:.3f}  "
                    f"slot0 {m['val/token_accuracy_slot0']:.3f} "
                    f"{m['val/bits_per_token_slot0']:.2f}b"
                    + (f"  gain@1 {m['head/cond_gain_t1']:.4f}" if "head/cond_gain_t1" in m else "")
                    + (
                        f"  ref_ppl {m['gen/ref_perplexity']:.0f}"
                        if "gen/ref_perplexity" in m
                        else ""
                    ),
                    flush=True,
                )
        cfg = model.config
        return {
            "name": name,
            "overrides": overrides,
            "head_lr_scale": head_lr_scale,
            "code_table": model.codec.table.kind,
            "params": {p: model.num_params(p) for p in ("all", "backbone", "head")},
            "flops_per_token": model.flops_per_token(L),
            "config": cfg.to_dict(),
            "curve": curve,
            "final": curve[-1],
            "train_seconds": time.perf_counter() - t0,
        }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        "val/bits_per_token",
        "val/bits_per_token_chain",
        "val/token_accuracy",
        "val/token_accuracy_sampled",
        "val/token_accuracy_slot0",
        "head/cond_gain_t0.7",
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    colors = plt.get_cmap("tab20" if len(results["variants"]) > 10 else "tab10")
    for ax, key in zip(axes.flat, keys, strict=True):
        for i, r in enumerate(results["variants"]):  # one colour per variant in every panel
            pts = [(c["tokens_seen"], c[key]) for c in r["curve"] if key in c]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=r["name"], marker=".", color=colors(i % 20))
        ax.set_title(key)
        ax.set_xlabel("tokens seen")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


TABLE_COLS = (
    ("val/bits_per_token", "bits/token", "{:.3f}"),
    ("val/bits_per_token_chain", "chain", "{:.3f}"),
    ("val/token_accuracy", "acc greedy", "{:.3f}"),
    ("val/token_accuracy_sampled", "acc sampled", "{:.3f}"),
    ("val/token_accuracy_slot0", "slot0 acc", "{:.3f}"),
    ("val/bits_per_token_slot0", "slot0 bits", "{:.3f}"),
    ("head/cond_gain_t0.7", "gain t=.7", "{:.4f}"),
    ("gen/ref_perplexity", "samples ppl", "{:.0f}"),
    ("gen/ref_perplexity_greedy", "greedy ppl", "{:.0f}"),
    ("gen/unigram_entropy", "H samples", "{:.2f}"),
)


def markdown_table(paths: list[str]) -> str:
    """The final metrics of every variant in result files, as a markdown table."""
    head = "| variant | " + " | ".join(c[1] for c in TABLE_COLS) + " |"
    lines = [head, "|---" * (len(TABLE_COLS) + 1) + "|"]
    for path in paths:
        res = json.loads(Path(path).read_text())
        for r in res["variants"]:
            f = r["final"]
            cells = [fmt.format(f[k]) if k in f else "" for k, _, fmt in TABLE_COLS]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
        real = res["real_text"]
        lines.append(
            f"| real text | | | | | | | | {real['ref_perplexity']:.0f} | | "
            f"{real['unigram_entropy']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default=str(ROOT / "benchmarks/quality_grid.yaml"))
    p.add_argument("--data", default=str(ROOT / "data/stdlib-prose"))
    p.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--out", default="")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print result files as markdown")
    a = p.parse_args(argv)
    if a.table:
        print(markdown_table(a.table))
        return 0
    grid = yaml.safe_load(Path(a.grid).read_text())
    grid = merge(grid, parse_overrides(a.overrides))
    check_grid(grid)
    if a.threads:
        torch.set_num_threads(a.threads)
    data = Path(a.data)
    ensure_dataset(data)
    device = torch.device(a.device)
    bench = Bench(grid, data, device)
    variants = [v for v in grid["variants"] if not a.only or v["name"] in a.only]
    if not variants:
        raise SystemExit(f"error: no variant named {a.only} in {a.grid}")
    out_path = Path(
        a.out or ROOT / "benchmarks/results" / f"quality-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "benchmark": "quality",
        "grid": grid,
        "data": str(data),
        "vocab_size": bench.vocab,
        "real_text": bench.real,
        "host": {"machine": platform.node(), "torch": torch.__version__, "device": str(device)},
        "variants": [],
    }
    for v in variants:
        print(f"variant {v['name']}: {v.get('model', {})}", flush=True)
        results["variants"].append(
            bench.run(
                v["name"], v.get("model", {}), v.get("code_table"), v.get("head_lr_scale", 1.0)
            )
        )
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out_path)
    plot(results, out_path.with_suffix(".png"))
    cols = ("bpt", "chain", "acc", "acc_s", "ref_ppl", "H")
    print(f"\n{'variant':24s} " + " ".join(f"{c:>7s}" for c in cols))
    for r in results["variants"]:
        f = r["final"]
        print(
            f"{r['name']:24s} {f['val/bits_per_token']:7.3f} {f['val/bits_per_token_chain']:7.3f} "
            f"{f['val/token_accuracy']:7.3f} {f['val/token_accuracy_sampled']:7.3f} "
            f"{f['gen/ref_perplexity']:7.0f} {f['gen/unigram_entropy']:7.2f}"
        )
    real = bench.real
    print(f"real text: ref_ppl {real['ref_perplexity']:.0f}, H {real['unigram_entropy']:.2f}")
    print(f"results: {out_path}\nplot: {out_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
