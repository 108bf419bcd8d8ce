"""Caches: incremental decoding equals one full forward; rollback is exact at any length."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_mtp.cache import KVCache, SlidingKVCache, trim_cache
from tiny_mlx import make_target

WINDOW = 8


def _ids(n, vocab=64, seed=0):
    return mx.array(np.random.default_rng(seed).integers(4, vocab, size=n), dtype=mx.int32)


@pytest.mark.parametrize("variant", [dict(), dict(moe=True, k_eq_v=True, kv_shared=0, ple=0)])
def test_incremental_equals_full_forward(variant):
    model = make_target(seed=3, window=WINDOW, **variant)
    ids = _ids(6 * WINDOW)  # crosses the window several times
    full = np.array(model(ids[None]))
    cache = model.make_cache()
    rows, i = [], 0
    for n in [5, 1, 1, 3, 1, 9, 1, 1, 2] + [1] * 200:
        if i >= ids.shape[0]:
            break
        rows.append(np.array(model(ids[None, i : i + n], cache)))
        i += n
    inc = np.concatenate(rows, axis=1)
    np.testing.assert_allclose(inc, full, atol=2e-5, rtol=0)


def _cache_states(cache):
    return [tuple(np.array(a) for a in c.state) for c in cache]


@pytest.mark.parametrize("length", [3, WINDOW - 1, WINDOW, WINDOW + 1, 5 * WINDOW + 3, 40 * WINDOW])
@pytest.mark.parametrize("r", [1, 2, 5, 8])
def test_rollback_equals_never_added(length, r):
    model = make_target(seed=1, window=WINDOW)
    ids = _ids(length + r + 1, seed=length)
    # Reference: only `length` tokens ever seen, then the next token.
    ref_cache = model.make_cache()
    model(ids[None, :length], ref_cache)
    ref_next = np.array(model(ids[None, length + r : length + r + 1], ref_cache))
    # Under test: the same prefix, r extra tokens (as one verify-like chunk), rolled back.
    cache = model.make_cache()
    model(ids[None, :length], cache)
    model(ids[None, length : length + r], cache)
    trim_cache(cache, r)
    assert [c.offset for c in cache] == [length] * len(cache)
    got_next = np.array(model(ids[None, length + r : length + r + 1], cache))
    np.testing.assert_array_equal(got_next, ref_next)
    for (gk, gv), (rk, rv) in zip(_cache_states(cache), _cache_states(ref_cache)):
        np.testing.assert_array_equal(gk, rk)
        np.testing.assert_array_equal(gv, rv)


def test_rollback_after_single_token_updates_far_beyond_window():
    """Rejected tokens appended one at a time (as plain steps would) also roll back exactly."""
    cache, ref = SlidingKVCache(WINDOW, slack=8), SlidingKVCache(WINDOW, slack=8)
    rng = np.random.default_rng(0)
    kv = [mx.array(rng.normal(size=(1, 1, 1, 4)).astype(np.float32)) for _ in range(300)]
    for t in range(290):
        cache.update_and_fetch(kv[t], kv[t])
        ref.update_and_fetch(kv[t], kv[t])
    for t in range(290, 296):
        cache.update_and_fetch(kv[t], kv[t])
    cache.trim(6)
    for a, b in zip(cache.state, ref.state):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    keys, _ = cache.committed(WINDOW + 1)
    np.testing.assert_array_equal(
        np.array(keys)[0, 0, :, 0], np.array(mx.concatenate(kv[290 - WINDOW - 1 : 290]))[:, 0, 0, 0]
    )


def test_sliding_memory_is_bounded():
    cache = SlidingKVCache(WINDOW, slack=4)
    x = mx.zeros((1, 1, 1, 4))
    sizes = []
    for t in range(5000):
        cache.update_and_fetch(x, x)
        if t in (100, 4999):
            sizes.append(cache.keys.shape[2])
    assert sizes[0] == sizes[1]
    assert sizes[1] < 4 * WINDOW


def test_rollback_beyond_slack_is_refused():
    cache = SlidingKVCache(WINDOW, slack=2)
    x = mx.zeros((1, 1, 1, 4))
    for _ in range(50):
        cache.update_and_fetch(x, x)
    with pytest.raises(RuntimeError):
        cache.trim(5 * WINDOW)


def test_full_cache_trim_and_committed():
    cache = KVCache()
    x = mx.arange(10, dtype=mx.float32).reshape(1, 1, 10, 1)
    cache.update_and_fetch(x, x)
    cache.trim(3)
    k, _ = cache.committed()
    assert np.array(k).ravel().tolist() == list(range(7))
    k, _ = cache.committed(2)
    assert np.array(k).ravel().tolist() == [5, 6]
