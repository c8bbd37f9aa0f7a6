"""Derived random streams: one independent `numpy.random.Generator` per key, such as (run seed,
generation, pass, file, document, stage) for the data pipeline.

Every random choice of the data pipeline (file order, NSP pairing, masking) takes an explicit
generator made here, so a run is reproducible however Ray schedules the work: the stream a buffer
sees depends only on its keys, never on which worker ran it or in what order. `SeedSequence` hashes
the key list into well-separated states, so neighbouring keys (pass 1 vs 2, document 7 vs 8) give
streams that are statistically independent rather than shifted copies of each other.
"""

from __future__ import annotations

import hashlib

import numpy as np

# SeedSequence entropy words are unsigned; 63 bits keep the hash a non-negative Python/NumPy int64.
_HASH_BITS = 63


def stable_hash(text: str) -> int:
    """A non-negative 63-bit integer for `text` that is the same in every process and every run.

    Python's `hash(str)` is salted per process (PYTHONHASHSEED), so two Ray workers would derive
    different streams for the same file; BLAKE2b is stable and fast enough for one call per file.
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - _HASH_BITS)


def derive_rng(*keys: int) -> np.random.Generator:
    """A generator determined by `keys` alone, e.g. `derive_rng(seed, epoch, stable_hash(path), block)`.

    Keys must be non-negative integers (use `stable_hash` for strings); the same keys always give
    the same stream, and changing any key (a new epoch) gives an independent one.
    """
    if not keys:
        raise ValueError("derive_rng needs at least one key (the run seed)")
    for key in keys:
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)) or key < 0:
            raise ValueError(f"derive_rng keys must be non-negative integers, got {key!r}; "
                             "hash strings with stable_hash()")
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


__all__ = ["derive_rng", "stable_hash"]
