"""Property tests (hypothesis) on random tiny Gemma 4 configs, built in MLX (``tiny_mlx.py``).

* Caches: any sequence of update chunks and rollbacks (each rollback drops up to the whole chunk
  just added, as a rejected verify does) leaves the caches exactly where recomputing the committed
  tokens from scratch puts them: same ``.state`` and same logits for the next token.
* MTP: greedy speculative decoding with a random drafter, k in 1..8 or ``"auto"``, emits exactly
  plain greedy decoding's tokens.

Configs vary the sliding window, vocabulary, width, KV sharing, per-layer embeddings, MoE and
``attention_k_eq_v``.  Fixed examples elsewhere: ``test_cache.py``, ``test_mtp.py``.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_mlx import make_pair

from mlx_mtp.cache import trim_cache
from mlx_mtp.sampling import GREEDY
from mlx_mtp.speculative import MAX_DRAFT_TOKENS, generate_tokens

SETTINGS = dict(
    deadline=None,
    max_examples=25,
    derandomize=True,  # the same examples on every run (CI-stable)
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

configs = st.fixed_dictionaries(
    {
        "window": st.sampled_from([3, 4, 8, 16]),
        "vocab": st.sampled_from([32, 64, 96]),
        "hidden": st.sampled_from([16, 32]),
        "kv_shared": st.sampled_from([0, 2]),
        "ple": st.sampled_from([0, 8]),
        "moe": st.booleans(),
        "k_eq_v": st.booleans(),
    }
)


@lru_cache(maxsize=None)
def _pair(seed, window, vocab, hidden, kv_shared, ple, moe, k_eq_v):
    return make_pair(
        seed, window=window, vocab=vocab, hidden=hidden, kv_shared=kv_shared, ple=ple,
        moe=moe, k_eq_v=k_eq_v,
    )  # fmt: skip


def pair_for(seed, cfg):
    return _pair(seed, **cfg)


def _states(cache):
    return [tuple(np.array(a) for a in c.state) for c in cache]


# Each op: ("add", n) appends n tokens; ("add_rollback", n, r) appends n and drops the last r.
ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 12)),
        st.tuples(
            st.just("add_rollback"), st.integers(1, MAX_DRAFT_TOKENS + 1), st.integers(0, 17)
        ),
    ),
    min_size=1,
    max_size=14,
)


@settings(**SETTINGS)
@given(cfg=configs, seed=st.integers(0, 3), schedule=ops, data=st.data())
def test_chunks_and_rollbacks_equal_recomputation(cfg, seed, schedule, data):
    model, _ = pair_for(seed, cfg)
    vocab = cfg["vocab"]
    cache = model.make_cache(slack=MAX_DRAFT_TOKENS + 16)
    committed = []
    for op in schedule:
        n = op[1]
        chunk = data.draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n))
        model(mx.array(chunk)[None], cache)
        committed += chunk
        if op[0] == "add_rollback":
            r = min(op[2], n, len(committed) - 1)  # keep at least one token
            trim_cache(cache, r)
            if r:
                del committed[-r:]
        assert all(c.offset == len(committed) for c in cache)
    nxt = data.draw(st.integers(0, vocab - 1))

    ref = model.make_cache(slack=MAX_DRAFT_TOKENS + 16)
    model(mx.array(committed)[None], ref)
    for (gk, gv), (rk, rv) in zip(_states(cache), _states(ref)):
        assert gk.shape == rk.shape and gv.shape == rv.shape
        np.testing.assert_allclose(gk, rk, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(gv, rv, atol=1e-4, rtol=1e-4)
    got = np.array(model(mx.array([[nxt]]), cache))
    want = np.array(model(mx.array([[nxt]]), ref))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@settings(**SETTINGS)
@given(
    cfg=configs,
    seed=st.integers(0, 3),
    k=st.one_of(st.integers(1, 8), st.just("auto")),
    prompt_len=st.integers(1, 40),
    max_tokens=st.integers(1, 40),
    data=st.data(),
)
def test_greedy_mtp_equals_plain_greedy(cfg, seed, k, prompt_len, max_tokens, data):
    model, drafter = pair_for(seed, cfg)
    prompt = data.draw(
        st.lists(st.integers(0, cfg["vocab"] - 1), min_size=prompt_len, max_size=prompt_len)
    )
    plain = [t for t, _ in generate_tokens(model, prompt, max_tokens=max_tokens, sampler=GREEDY)]
    mtp = [
        t
        for t, _ in generate_tokens(
            model,
            prompt,
            max_tokens=max_tokens,
            sampler=GREEDY,
            draft_model=drafter,
            num_draft_tokens=k,
        )
    ]
    assert len(plain) == max_tokens
    assert mtp == plain
