"""Randomness keyed by a string (a query id, a dataset name, "seed:id:epoch"): the same key gives the
same draw in every process, on every machine and in every run, so a resumed or re-sharded job repeats
its choices. BLAKE2b from hashlib, not hash(): Python salts str hashes per process."""

from __future__ import annotations

import hashlib

import numpy as np


def key_digest(key: str) -> bytes:
    """8 bytes of BLAKE2b of `key` (UTF-8): a well-spread 64-bit value per key."""
    return hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()


def key_rng(seed: int, key: str) -> np.random.Generator:
    """A NumPy generator seeded by (`seed`, `key`): a different stream per key under one run seed."""
    return np.random.default_rng([seed, int.from_bytes(key_digest(key), "little")])


def key_int(key: str) -> int:
    """`key_digest(key)` as a big-endian integer: a sort key, or the seed of a `random.Random`."""
    return int.from_bytes(key_digest(key), "big")
