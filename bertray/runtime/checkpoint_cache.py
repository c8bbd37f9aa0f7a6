"""Fetching a checkpoint to the node that uses it (fine-tuning trials, prediction, serving), and the
node-local cache it is kept in. Free of Ray; training, tuning and prediction all use it."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import fsspec

from bertray.errors import CheckpointError
from bertray.storage import is_local

log = logging.getLogger(__name__)

# The files a fine-tuning run or a predictor needs from a checkpoint directory; training state
# (optimizer moments: twice the model) stays behind.
CHECKPOINT_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "vocab.txt", "tokenizer.json",
                    "tokenizer_config.json")


def cache_root(cache_dir: str | None) -> Path:
    """The node-local cache (downloaded checkpoints, featurized task data)."""
    return Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "bertray-cache"


def local_checkpoint(url: str, cache_dir: str | None = None) -> Path:
    """A local directory holding the checkpoint at `url`.

    Local paths are used in place. A remote URL (s3://, gs://, ...) is downloaded once per machine
    into `<cache>/checkpoints/<hash of url>`: into a temporary folder first, then renamed, so
    trials starting together on one node never see a half-written copy (the loser of the race
    uses the winner's folder). Only the model and tokenizer files are fetched.
    """
    fs, root = fsspec.core.url_to_fs(url)
    if is_local(fs):
        path = Path(root)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no config.json here; pass a checkpoint directory in the Hugging Face "
                                  f"layout (on a multi-node cluster a local path must exist on every node; "
                                  f"put checkpoints in object storage, s3://...)")
        return path
    target = cache_root(cache_dir) / "checkpoints" / hashlib.sha1(url.encode()).hexdigest()[:16]
    if (target / "config.json").is_file():
        return target
    try:
        names = {os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
    except FileNotFoundError:
        names = set()
    if "config.json" not in names:
        raise CheckpointError(f"{url}: no config.json there; pass a checkpoint directory in the Hugging Face layout")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        for name in CHECKPOINT_FILES:
            if name in names:
                fs.get(f"{root.rstrip('/')}/{name}", str(staging / name))
        try:
            os.rename(staging, target)
        except OSError:                   # another trial on this machine finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("checkpoint %s -> %s", url, target)
    return target
