"""Local paths and s3:// URIs as one pyarrow filesystem API (a leaf: pyarrow only)."""

from __future__ import annotations

import os

import pyarrow.fs as pafs

__all__ = ["open_fs"]


def open_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """Local path or s3:// URI -> (pyarrow filesystem, path). S3 honours AWS_ENDPOINT_URL."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)
