"""Small fsspec helpers for run directories: the same URLs (local, s3://, gs://, ...) the corpus uses."""

from __future__ import annotations

import os

import fsspec


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
