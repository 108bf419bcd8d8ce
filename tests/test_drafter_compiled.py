"""The drafter step runs compiled (``mx.compile``, shapeless over the KV length): it must
compute what the plain layer-by-layer drafter computes, at every KV length, with the
weights the drafter has now.  HF parity of the drafter is in ``test_parity_hf.py``."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_mtp.models.gemma4 import SLIDING, Rope
from tiny_mlx import make_pair

ROPES = [
    ({"rope_theta": 10000.0}, 64),
    ({"rope_theta": 10000.0, "partial_rotary_factor": 0.5}, 32),
    ({"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}, 64),
    ({"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}, 128),
]


@pytest.mark.parametrize("params,head_dim", ROPES)
def test_rope_table_path_matches_fast_rope(params, head_dim):
    """An array offset (the compiled drafter's path) rotates as ``mx.fast.rope`` does."""
    rope = Rope(params, head_dim)
    rope.build_tables()
    x = mx.random.normal((1, 4, 1, head_dim), key=mx.random.key(head_dim))
    for position in (0, 1, 37, 300, 1000):
        want = rope(x, position)
        got = rope(x, mx.array(position))
        # float32 angles of positions near 1000 differ by a few ulps between the two ways
        assert mx.allclose(got, want, atol=2e-4).item(), (params, position)
    compiled = mx.compile(lambda x, p: rope(x, p), shapeless=True)
    assert mx.allclose(compiled(x, mx.array(37)), rope(x, 37), atol=2e-4).item()


def _reference_step(drafter, emb, hidden, kv, position):
    """The drafter step op by op, uncompiled, with ``mx.fast.rope`` (an int position)."""
    window = drafter.args.sliding_window
    x = drafter.pre_projection(mx.concatenate([emb, hidden], axis=-1))
    for layer in drafter.model.layers:
        keys, values = kv[layer.self_attn.layer_type]
        if layer.self_attn.layer_type == SLIDING:
            keys, values = keys[..., -(window + 1) :, :], values[..., -(window + 1) :, :]
        x, _ = layer(x, position, shared_kv=(keys, values), masked=False)
    z = drafter.model.norm(x)
    return drafter.logits(z), drafter.post_projection(z)


def _filled(model, n):
    cache = model.make_cache()
    model(mx.array(list(range(3, 3 + n)))[None], cache)
    return cache


def _kv(model, cache, skip):
    return {lt: cache[i].committed(None, skip) for lt, i in model.args.producers.items()}


@pytest.mark.parametrize("centroids", [0, 16])
def test_compiled_step_matches_the_uncompiled_drafter_at_every_kv_length(centroids):
    model, drafter = make_pair(seed=5, window=8, vocab=256, hidden=64, centroids=centroids)
    cache = _filled(model, 60)
    emb = model.embed(mx.array([[7]]))
    hidden = mx.random.normal((1, 1, 64), key=mx.random.key(1))
    # KV lengths from below the sliding window to well past it, in both orders: one trace
    # serves them all, so a length frozen into it would show here.
    for skip in (55, 3, 40, 0, 52):
        kv, position = _kv(model, cache, skip), 60 - skip
        logits, nxt = drafter.draft_step(emb, hidden, kv, position)
        want_logits, want_nxt = _reference_step(drafter, emb, hidden, kv, position)
        assert mx.allclose(logits, want_logits, atol=1e-5).item(), skip
        assert mx.allclose(nxt, want_nxt, atol=1e-5).item(), skip
        token, _ = drafter.greedy_step(emb, hidden, kv, position)
        assert token.item() == mx.argmax(want_logits[0, -1]).item()


def test_compiled_step_uses_weights_changed_after_its_first_call():
    model, drafter = make_pair(seed=6, window=8, vocab=256, hidden=64)
    _, other = make_pair(seed=7, window=8, vocab=256, hidden=64)
    cache = _filled(model, 20)
    kv, emb = _kv(model, cache, 0), model.embed(mx.array([[9]]))
    hidden = mx.random.normal((1, 1, 64), key=mx.random.key(2))
    before, _ = drafter.draft_step(emb, hidden, kv, 20)
    drafter.update(other.parameters())
    after, _ = drafter.draft_step(emb, hidden, kv, 20)
    want, _ = _reference_step(other, emb, hidden, kv, 20)
    assert not mx.allclose(before, want, atol=1e-3).item()  # the weights do matter
    assert mx.allclose(after, want, atol=1e-5).item()
    # Quantizing swaps modules (and the arrays the step reads) in place, too.
    predicate = lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0  # noqa: E731
    nn.quantize(drafter, group_size=64, bits=4, class_predicate=predicate)
    nn.quantize(other, group_size=64, bits=4, class_predicate=predicate)
    got, _ = drafter.draft_step(emb, hidden, kv, 20)
    want, _ = _reference_step(other, emb, hidden, kv, 20)
    assert mx.allclose(got, want, atol=1e-5).item()
