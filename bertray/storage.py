"""Small fsspec helpers for run directories: the same URLs (local, s3://, gs://, ...) the corpus uses."""

from __future__ import annotations

import os

import fsspec


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def absolute_url(url: str) -> str:
    """A relative local path made absolute: Ray workers run in a working directory of their own, so
    `runs/x` written by a worker would land somewhere under /tmp/ray instead of beside the driver."""
    fs, path = fsspec.core.url_to_fs(url)
    return os.path.abspath(path) if is_local(fs) and "://" not in url else url


def join_url(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def write_text(url: str, text: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(text)


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)
