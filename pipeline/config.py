"""PreprocessConfig: the typed recipe of `jobs/preprocess.py` (YAML + ``--set`` overrides).

Fields marked *content* decide the bytes of the shards; a dataset refuses a later run whose content
fields differ from the ones it was built with (the check names the key).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bitlm.recipe import RecipeError, load_recipe, to_dict
from pipeline.neardedup import Banding
from pipeline.readers import DEFAULT_MAX_DOC_BYTES, DEFAULT_MAX_DOCS, DEFAULT_MAX_FILE_BYTES

__all__ = [
    "CONTENT_KEYS",
    "FilterConfig",
    "InputSpec",
    "LimitsConfig",
    "NearDedupConfig",
    "PreprocessConfig",
    "RayConfig",
    "TokenizerConfig",
    "load_config",
]


@dataclass
class InputSpec:
    """One input: a local folder, a glob, a single file, or an ``s3://`` prefix."""

    path: str
    glob: str = "**/*"  # pattern under ``path`` when it is a folder/prefix
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns on the path under it
    # auto: by extension (.jsonl/.json -> jsonl, .parquet -> parquet, anything else -> text);
    # .gz/.zst are stripped first and decompressed transparently.
    format: Literal["auto", "text", "jsonl", "parquet", "python_prose"] = "auto"
    text_unit: Literal["file", "line"] = "file"  # text files: one document per file or per line
    text_field: str = "text"  # jsonl key / parquet column

    def __post_init__(self) -> None:
        if not self.path:
            raise RecipeError("inputs[].path must not be empty")


@dataclass
class FilterConfig:
    """Document filters (content)."""

    min_chars: int = 1  # shorter (after normalisation) -> too_short
    max_chars: int = 1_000_000  # longer -> too_long
    max_control_fraction: float = 0.05  # more control bytes/chars (or any NUL) -> binary

    def __post_init__(self) -> None:
        if self.min_chars < 0 or self.max_chars < max(1, self.min_chars):
            raise RecipeError("filters: need 0 <= min_chars <= max_chars and max_chars >= 1")
        if not 0.0 <= self.max_control_fraction <= 1.0:
            raise RecipeError("filters.max_control_fraction must be in [0, 1]")


@dataclass
class NearDedupConfig:
    """Near-duplicate removal: MinHash over word n-gram shingles with LSH bands (content).

    A document that shares a band with an earlier one (processing order, this run or an earlier
    run of the dataset) is dropped as ``near_duplicate`` (docs/preprocessing.md)."""

    enabled: bool = False
    threshold: float = 0.8  # estimated Jaccard similarity at which a document is a near duplicate
    num_perm: int = 128  # MinHash permutations (signature length)
    ngram: int = 5  # words per shingle
    # LSH bands x rows (bands * rows <= num_perm); null: chosen for ``threshold`` as
    # datasketch's MinHashLSH does (9 bands of 13 rows at 0.8 and 128), and recorded
    bands: int | None = None
    rows: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise RecipeError(f"near_dedup.threshold={self.threshold} must be in (0, 1]")
        if not 2 <= self.num_perm <= 4096:
            raise RecipeError(f"near_dedup.num_perm={self.num_perm} must be in [2, 4096]")
        if self.ngram < 1:
            raise RecipeError(f"near_dedup.ngram={self.ngram} must be >= 1")
        if (self.bands is None) != (self.rows is None):
            raise RecipeError("near_dedup.bands and near_dedup.rows: give both or neither")
        if self.bands is not None and self.rows is not None:
            if self.bands < 1 or self.rows < 1 or self.bands * self.rows > self.num_perm:
                raise RecipeError(
                    f"near_dedup: need bands >= 1, rows >= 1 and bands * rows <= num_perm, got "
                    f"bands={self.bands}, rows={self.rows}, num_perm={self.num_perm}"
                )
        elif self.enabled:
            from pipeline.neardedup import lsh_params

            self.bands, self.rows = lsh_params(self.threshold, self.num_perm)

    def banding(self) -> Banding | None:
        """The banding of an enabled config, else None."""
        if not self.enabled:
            return None
        assert self.bands is not None and self.rows is not None
        return Banding(self.num_perm, self.bands, self.rows, self.ngram)


@dataclass
class LimitsConfig:
    """Memory guards against compression bombs and giant documents (not content: they can be
    changed between runs of a dataset; each run records the limits it used)."""

    # decompressed bytes read from one input file; decompression stops here and the rest of the
    # file is one ``file_too_large`` drop (complete lines before the cap are kept)
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    # bytes of one document before decoding; a larger one is dropped as ``doc_too_large``
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES
    # documents (lines, JSON lines, Parquet rows) of one file; the rest is one ``file_too_large``
    # (a file of a billion blank lines is small compressed and would need ~50 GB of lists)
    max_docs_per_file: int = DEFAULT_MAX_DOCS

    def __post_init__(self) -> None:
        if min(self.max_file_bytes, self.max_doc_bytes, self.max_docs_per_file) < 1:
            raise RecipeError(
                "limits.max_file_bytes, limits.max_doc_bytes and limits.max_docs_per_file "
                "must be >= 1"
            )


@dataclass
class TokenizerConfig:
    """A given tokenizer.json (``path``), or a byte-level BPE trained on a sample (content)."""

    path: str | None = None
    vocab_size: int = 4096
    sample_bytes: int = 8_000_000  # training sample, drawn deterministically from the inputs
    min_frequency: int = 2
    eod_token: str = "<|eod|>"  # end-of-document token (id 0 in a trained tokenizer)

    def __post_init__(self) -> None:
        if self.path is None and not 260 <= self.vocab_size <= 1 << 20:
            raise RecipeError("tokenizer.vocab_size must be in [260, 2**20] (256 bytes + specials)")
        if self.sample_bytes < 1:
            raise RecipeError("tokenizer.sample_bytes must be >= 1")


@dataclass
class RayConfig:
    """Where and how wide to run (not content)."""

    address: str | None = None  # None: $RAY_ADDRESS if set (ray job submit), else a local instance
    num_cpus: int | None = None  # for a local instance; None = all cores
    cpus_per_task: float = 1.0  # each unit of work is one Ray task of this many CPUs
    # how the passes run their units: tasks, plain Ray tasks, or data, a Ray Data map (one
    # block per unit). Same results either way; data cost 1-8 s more per 20 MB run on a fresh
    # Ray (two actors and two cold workers, the driver's executor), docs/preprocessing.md
    executor: Literal["data", "tasks"] = "tasks"
    # new input bytes per dedup resolve task (each resolves a range of key prefixes; <= 256)
    dedup_part_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.dedup_part_bytes < 1:
            raise RecipeError("ray.dedup_part_bytes must be >= 1")


@dataclass
class PreprocessConfig:
    """The whole preprocessing recipe."""

    inputs: list[InputSpec] = field(default_factory=list)
    output: str = ""
    name: str = "dataset"
    max_files: int | None = None  # cap on input files (sorted order), e.g. for tiny recipes
    max_bytes: int | None = None  # cap on input bytes (sorted order; the file crossing it is kept)
    filters: FilterConfig = field(default_factory=FilterConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    code_table: Literal["binary", "frequency", "semantic"] = "frequency"
    seq_len: int = 256  # L, tokens per packed row
    block_size: int = 4  # L must be a multiple of it
    val_fraction: float = 0.01  # by document hash
    unit_bytes: int = 16 << 20  # input files are grouped into units of about this many bytes
    row_group_rows: int = 1024  # parquet row group size (streaming granularity)
    rejects: bool = False  # also write dropped documents with their reason to rejects/
    progress: bool = True
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.block_size < 1 or self.seq_len % self.block_size:
            raise RecipeError(
                f"seq_len={self.seq_len} must be >= 2 and a multiple of "
                f"block_size={self.block_size}"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise RecipeError("val_fraction must be in [0, 1)")
        if self.unit_bytes < 1 or self.row_group_rows < 1:
            raise RecipeError("unit_bytes and row_group_rows must be >= 1")
        for k in ("max_files", "max_bytes"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise RecipeError(f"{k} must be >= 1 or null")
        from bitlm.codec import SEMANTIC_MAX_VOCAB  # here: bitlm.codec imports torch

        if self.code_table == "semantic" and self.tokenizer.vocab_size > SEMANTIC_MAX_VOCAB:
            raise RecipeError(
                f"code_table=semantic supports tokenizer.vocab_size <= {SEMANTIC_MAX_VOCAB}"
            )

    def validate_for_run(self) -> None:
        """Checks that only a run (not a verify) needs."""
        if not self.inputs:
            raise RecipeError("inputs: at least one input is required")
        if not self.output:
            raise RecipeError("output: a folder or s3:// prefix is required")

    def content(self) -> dict[str, Any]:
        """The fields that decide shard bytes (compared across runs of one dataset)."""
        d = to_dict(self)
        return {k: d[k] for k in CONTENT_KEYS}

    def recorded(self) -> dict[str, Any]:
        """The recipe as recorded in the manifest: everything except where/how it ran."""
        d = to_dict(self)
        for k in ("output", "progress", "ray"):
            d.pop(k)
        return d


CONTENT_KEYS = (
    "filters",
    "near_dedup",
    "tokenizer",
    "code_table",
    "seq_len",
    "block_size",
    "val_fraction",
    "row_group_rows",
)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PreprocessConfig:
    """Load a recipe (YAML) with ``key=value`` overrides; raises RecipeError on a bad one."""
    cfg = load_recipe(PreprocessConfig, path, overrides)
    assert dataclasses.is_dataclass(cfg)
    return cfg
