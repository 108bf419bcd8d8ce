"""Per-layer KV caches that live outside the model and roll back exactly.

Both cache types keep their entries in temporal order, so a drafter can read
the most recent committed keys by slicing, and both support ``trim(n)``
(drop the last ``n`` tokens) at any sequence length.  The sliding cache keeps
``window - 1`` entries plus a fixed slack, so its memory never grows with the
sequence while rejected drafts can still be removed after the window filled.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import mlx.core as mx

_STEP = 256


class KVCache:
    """Append-only cache of a full-attention layer."""

    def __init__(self) -> None:
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0  # absolute number of tokens seen (= entries stored)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Append ``[B, H, S, D]`` keys/values; return every cached entry."""
        prev, n = self.offset, keys.shape[2]
        if self.keys is None or prev + n > self.keys.shape[2]:
            grow = ((n + _STEP - 1) // _STEP) * _STEP
            self.keys = _grow(self.keys, keys, prev, grow)
            self.values = _grow(self.values, values, prev, grow)
        self.keys[..., prev : prev + n, :] = keys
        self.values[..., prev : prev + n, :] = values
        self.offset += n
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def trim(self, n: int) -> int:
        """Forget the last ``n`` tokens; returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    def committed(
        self, max_entries: Optional[int] = None, skip: int = 0
    ) -> Tuple[mx.array, mx.array]:
        """The most recent ``max_entries`` (default all) entries before the last ``skip``,
        oldest first."""
        end = self.offset - skip
        start = 0 if max_entries is None else max(0, end - max_entries)
        return self.keys[..., start:end, :], self.values[..., start:end, :]

    @property
    def state(self) -> Tuple[mx.array, mx.array]:
        return self.committed()

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class SlidingKVCache:
    """Bounded cache of a sliding-window layer with exact rollback.

    Attention of a token at position ``q`` sees positions ``q - window + 1 .. q``.
    The buffer keeps at least ``window - 1 + slack`` most recent entries (when
    that many exist), so trimming up to ``slack`` tokens always leaves a full
    window behind, no matter how long the sequence already is.
    """

    def __init__(self, window: int, slack: int = 64) -> None:
        self.window = window
        self.slack = slack
        self.retain = window - 1 + slack
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0  # absolute number of tokens seen
        self.length = 0  # entries in the buffer (the last `length` positions)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Append new entries; return the last ``window - 1 + S`` in temporal order."""
        n = keys.shape[2]
        if self.keys is None or self.length + n > self.keys.shape[2]:
            self._compact(keys, values, n)
        self.keys[..., self.length : self.length + n, :] = keys
        self.values[..., self.length : self.length + n, :] = values
        self.length += n
        self.offset += n
        start = max(0, self.length - (self.window - 1 + n))
        return self.keys[..., start : self.length, :], self.values[..., start : self.length, :]

    def _compact(self, keys: mx.array, values: mx.array, incoming: int) -> None:
        """Move the retained tail to the front of a buffer with room for ``incoming``."""
        keep = min(self.length, self.retain)
        # Room for a few rounds before the next compaction (a copy of `keep` entries).
        size = keep + max(incoming, self.slack) + max(8, self.window // 8)
        self.keys = _shift(self.keys, keys, self.length, keep, size)
        self.values = _shift(self.values, values, self.length, keep, size)
        self.length = keep

    def trim(self, n: int) -> int:
        """Forget the last ``n`` tokens exactly (up to ``slack`` beyond a full window)."""
        n = min(self.offset, n)
        if self.length - n < min(self.offset - n, self.window - 1):
            raise RuntimeError(
                f"cannot roll back {n} tokens: only {self.length} entries retained "
                f"(window {self.window}, slack {self.slack})"
            )
        self.length -= n
        self.offset -= n
        return n

    def committed(
        self, max_entries: Optional[int] = None, skip: int = 0
    ) -> Tuple[mx.array, mx.array]:
        """The most recent ``max_entries`` (default: a window) entries before the last
        ``skip``, oldest first."""
        want = self.window if max_entries is None else max_entries
        end = self.length - skip
        start = max(0, end - want)
        return self.keys[..., start:end, :], self.values[..., start:end, :]

    @property
    def state(self) -> Tuple[mx.array, mx.array]:
        """The last ``window - 1`` entries: everything future tokens can attend to."""
        return self.committed(self.window - 1)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def _grow(buf: Optional[mx.array], like: mx.array, used: int, extra: int) -> mx.array:
    shape = list(like.shape)
    shape[2] = used + extra
    new = mx.zeros(shape, dtype=like.dtype)
    if buf is not None and used:
        new[..., :used, :] = buf[..., :used, :]
    return new


def _shift(buf: Optional[mx.array], like: mx.array, length: int, keep: int, size: int) -> mx.array:
    shape = list(like.shape)
    shape[2] = size
    new = mx.zeros(shape, dtype=like.dtype)
    if keep:
        new[..., :keep, :] = buf[..., length - keep : length, :]
    return new


Cache = List[object]


def trim_cache(cache: Cache, n: int) -> None:
    """Roll every layer cache back by ``n`` tokens."""
    if n > 0:
        for c in cache:
            c.trim(n)


def cache_offset(cache: Cache) -> int:
    """Number of tokens the caches hold (all layers agree)."""
    return cache[0].offset if cache else 0
