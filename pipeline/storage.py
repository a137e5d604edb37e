"""Local folders and ``s3://`` prefixes through fsspec (s3fs), with atomic writes.

Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_PROFILE; AWS_ENDPOINT_URL and the region are not secret). A unit of work
carries only the non-secret ``storage_options``; the driver forwards the credential variables to
its tasks through Ray's runtime_env (``credential_env``) and each worker reads them from its own
environment (``with_env_credentials``), so no secret is ever part of a task's arguments.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec

__all__ = [
    "InputFile",
    "Storage",
    "StorageError",
    "credential_env",
    "s3_options_from_env",
    "with_env_credentials",
    "without_credentials",
]


class StorageError(RuntimeError):
    """A one-line, user-facing storage problem (missing bucket, credentials, path)."""


def s3_options_from_env() -> dict[str, Any]:
    """s3fs options from the environment (explicit, so they survive pickling to workers)."""
    opts: dict[str, Any] = {"use_listings_cache": False}
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        opts["key"], opts["secret"] = key, secret
        if os.environ.get("AWS_SESSION_TOKEN"):
            opts["token"] = os.environ["AWS_SESSION_TOKEN"]
    elif os.environ.get("AWS_PROFILE"):
        opts["profile"] = os.environ["AWS_PROFILE"]
    client: dict[str, Any] = {}
    if os.environ.get("AWS_ENDPOINT_URL"):
        client["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    if os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"):
        client["region_name"] = os.environ.get("AWS_REGION") or os.environ["AWS_DEFAULT_REGION"]
    if client:
        opts["client_kwargs"] = client
    return opts


_CREDENTIAL_OPTIONS = ("key", "secret", "token", "profile")
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def without_credentials(opts: dict[str, Any]) -> dict[str, Any]:
    """The s3fs options a task spec may carry: everything but the credentials."""
    return {k: v for k, v in opts.items() if k not in _CREDENTIAL_OPTIONS}


def with_env_credentials(opts: dict[str, Any]) -> dict[str, Any]:
    """A task's s3fs options plus the credentials of the environment it runs in."""
    env = s3_options_from_env()
    return {**opts, **{k: env[k] for k in _CREDENTIAL_OPTIONS if k in env}}


def credential_env() -> dict[str, str]:
    """The credential variables of this process, for a task's runtime_env."""
    return {k: os.environ[k] for k in _CREDENTIAL_ENV if os.environ.get(k)}


def is_s3(url: str) -> bool:
    return url.startswith(("s3://", "s3a://"))


@dataclass(frozen=True)
class InputFile:
    """An input file as recorded in the manifest."""

    path: str  # absolute local path or s3://bucket/key
    size: int
    mtime: float


class Storage:
    """A filesystem rooted at nothing: every method takes a full path or URL."""

    def __init__(self, s3_options: dict[str, Any] | None = None) -> None:
        self.s3_options = dict(s3_options or {})

    def fs(self, url: str) -> fsspec.AbstractFileSystem:
        if is_s3(url):
            return fsspec.filesystem("s3", **self.s3_options)
        return fsspec.filesystem("file")

    def _strip(self, url: str) -> str:
        if is_s3(url):
            return url.split("://", 1)[1]
        return os.path.abspath(url)

    # ---- reads ---------------------------------------------------------------------------------
    def read_bytes(self, url: str) -> bytes:
        with self._errors(url):
            return self.fs(url).cat_file(self._strip(url))

    def open_input(self, url: str) -> Any:
        """A binary file object for streaming reads (local file, or s3fs's buffered file)."""
        if is_s3(url):
            return self.fs(url).open(self._strip(url), "rb", block_size=8 << 20)
        return open(self._strip(url), "rb")  # the caller closes it

    def size(self, url: str) -> int:
        with self._errors(url):
            return int(self.fs(url).size(self._strip(url)))

    def exists(self, url: str) -> bool:
        with self._errors(url):
            return self.fs(url).exists(self._strip(url))

    def list_files(
        self, root: str, pattern: str, problems: list[tuple[str, str]] | None = None
    ) -> list[InputFile]:
        """Files under a folder/prefix matching ``pattern``, or a glob, or one file; sorted.
        An entry that cannot be inspected (a broken symlink, a file removed while listing) is
        left out and, when ``problems`` is given, appended to it as (path, why)."""
        fs, p = self.fs(root), self._strip(root)
        with self._errors(root):
            if any(c in root for c in "*?["):
                paths = fs.glob(p)
            elif fs.isdir(p):
                paths = fs.glob(p.rstrip("/") + "/" + pattern.lstrip("/"))
            elif fs.exists(p):
                paths = [p]
            else:
                raise StorageError(f"input not found: {root}")
            files = []
            for q in sorted(set(paths)):
                try:
                    info = fs.info(q)
                except (OSError, ValueError) as e:
                    if problems is not None:
                        problems.append((self._url(root, q), f"unreadable: {type(e).__name__}"))
                    continue
                if info.get("type") != "file":  # folders, FIFOs, sockets
                    continue
                files.append(InputFile(self._url(root, q), int(info["size"]), _mtime(info)))
        return sorted(files, key=lambda f: f.path)

    def _url(self, root: str, stripped: str) -> str:
        return "s3://" + stripped if is_s3(root) else stripped

    # ---- writes --------------------------------------------------------------------------------
    def write_atomic(self, url: str, data: bytes) -> None:
        """Whole-object write that readers see entirely or not at all (S3 PUT; local rename)."""
        with self._errors(url):
            if is_s3(url):
                self.fs(url).pipe_file(self._strip(url), data)
                return
            path = self._strip(url)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    def remove_tree(self, url: str) -> None:
        with self._errors(url):
            fs, p = self.fs(url), self._strip(url)
            if fs.exists(p):
                fs.rm(p, recursive=True)

    def list_names(self, url: str) -> list[str]:
        """Base names directly inside a folder/prefix (empty if it does not exist)."""
        fs, p = self.fs(url), self._strip(url)
        with self._errors(url):
            try:
                return sorted(os.path.basename(x.rstrip("/")) for x in fs.ls(p, detail=False))
            except FileNotFoundError:
                return []

    def check_writable_root(self, url: str) -> None:
        """Fail early, in one line, on a missing bucket or missing credentials."""
        if not is_s3(url):
            return
        bucket = self._strip(url).split("/", 1)[0]
        with self._errors(url):
            fs = self.fs(url)
            try:
                fs.ls(bucket, detail=False, refresh=True)
            except FileNotFoundError:
                raise StorageError(f"S3 bucket {bucket!r} does not exist ({url})") from None

    # ---- errors --------------------------------------------------------------------------------
    def _errors(self, url: str) -> _ErrorMapper:
        return _ErrorMapper(url)


class _ErrorMapper:
    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, StorageError):
            return False
        name = type(exc).__name__
        text = str(exc)
        if name in ("NoCredentialsError", "PartialCredentialsError") or "credentials" in text:
            raise StorageError(
                f"S3 credentials missing or invalid for {self.url}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            ) from None
        if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
            raise StorageError(f"S3 bucket does not exist: {self.url}") from None
        if name in ("PermissionError",) or "AccessDenied" in text or "InvalidAccessKeyId" in text:
            raise StorageError(f"S3 access denied for {self.url}: {text}") from None
        return False


def _mtime(info: dict[str, Any]) -> float:
    if "mtime" in info:
        return float(info["mtime"])
    lm = info.get("LastModified") or info.get("last_modified")
    if lm is None:
        return 0.0
    return float(lm.timestamp()) if hasattr(lm, "timestamp") else float(lm)
