"""Small fsspec helpers for run directories: the same URLs (local, s3://, gs://, ...) the corpus uses."""

from __future__ import annotations

import os
import re

from typing import Any

import fsspec

# scheme://user:password@host/... or scheme://key@host/...: the part between :// and the first @
# before any / is userinfo, i.e. a credential.
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)([^/@]+)@")
# storage_options keys that hold secrets (s3fs, gcsfs, adlfs, HTTP auth), at any depth.
CREDENTIAL_KEYS = frozenset({"key", "secret", "token", "password", "passwd", "session_token", "security_token",
                             "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "account_key",
                             "sas_token", "connection_string", "client_secret", "credentials", "auth", "headers"})


def redact_url(url: str) -> str:
    """The URL without its user:password part (`s3://***@bucket/x`), fit to print, log or save."""
    return _USERINFO.sub(r"\1***@", url)


def has_credentials(url: str) -> bool:
    return bool(_USERINFO.match(url))


def credential_keys(options: object, prefix: str = "") -> list[str]:
    """Dotted paths of the keys in a (nested) storage_options mapping that hold credentials."""
    if not isinstance(options, dict):
        return []
    found = []
    for key, value in options.items():
        path = f"{prefix}{key}"
        if str(key).lower() in CREDENTIAL_KEYS:
            found.append(path)
        found.extend(credential_keys(value, path + "."))
    return found


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def is_local_url(url: str) -> bool:
    """A plain path or a file:// URL: known without building a filesystem."""
    return "://" not in url or url.startswith("file://")


def absolute_url(url: str) -> str:
    """A local path or file:// URL as an absolute path; other URLs unchanged. Ray workers and Tune
    trials run in working directories of their own, so `runs/x` written by one would land somewhere
    under /tmp/ray instead of beside the driver."""
    return os.path.abspath(url.removeprefix("file://")) if is_local_url(url) else url


def ray_storage(url: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray's RunConfig from a local path or any fsspec URL:
    a local path as is, anything else through pyarrow's wrapper of the fsspec filesystem."""
    if is_local_url(url):
        return absolute_url(url), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(url)
    return path.rstrip("/"), PyFileSystem(FSSpecHandler(fs))


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
