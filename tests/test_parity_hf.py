"""fp32 parity of mlx_mtp with HF transformers 5.23 on tiny random-weight checkpoints (tests/hf_ref.py).

API under test::

    model, tok = mlx_mtp.load(path)
    model(mx.array(ids)[None])                                        -> logits [1, S, V]
    out = model.forward(mx.array(ids)[None], cache=None, return_hidden=True)
    out.logits, out.hidden (post final norm), out.shared_kv {type: (K, V)}  K/V [1, nKV, S, hd]
    drafter, _ = mlx_mtp.load(assistant_path)
    drafter.draft_step(token_embedding [1,1,Hb], hidden [1,1,Hb], shared_kv, position) -> (logits [1,1,V], next_hidden [1,1,Hb])

Every comparison is max-abs-error <= 1e-4 in float32. Drafter inputs are HF's own (target embedding, target
post-norm hidden / previous post_projection output, producer K/V), so each step is compared in isolation.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_ref

TOL = 1e-4
S, F = hf_ref.S, hf_ref.F
ALL = hf_ref.VARIANTS


@pytest.fixture(scope="module")
def mlx_load():
    """Cached ``mlx_mtp.load``; importing mlx_mtp is deliberately not guarded (these tests must fail without it)."""
    import mlx_mtp

    loaded = {}

    def get(path):
        key = str(path)
        if key not in loaded:
            loaded[key] = mlx_mtp.load(path)
        return loaded[key]

    return get


def _np(a) -> np.ndarray:
    import mlx.core as mx

    if isinstance(a, mx.array):
        a = a.astype(mx.float32)
        mx.eval(a)
    return np.asarray(a, dtype=np.float32)


def _assert_close(got, want, what: str, tol: float = TOL):
    got = _np(got)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != HF {want.shape}"
    err = float(np.abs(got - want).max()) if want.size else 0.0
    assert err <= tol, (
        f"{what}: max abs err {err:.3g} > {tol} (HF scale {float(np.abs(want).max()):.3g})"
    )


def _ids(variant: str, n: int, seed: int = 11) -> list[int]:
    return hf_ref.random_ids(n, hf_ref.TARGET_TEXT_CONFIGS[variant]["vocab_size"], seed=seed)


# ------------------------------------------------------------------------------------------------ target


@pytest.mark.parametrize("n_tokens", [5, 48])
@pytest.mark.parametrize("variant", ALL)
def test_target_logits(variant, n_tokens, hf_target, mlx_load):
    import mlx.core as mx

    path = hf_target(variant)
    ids = _ids(variant, n_tokens)
    if n_tokens > 40:
        assert n_tokens > 2 * hf_ref.TARGET_TEXT_CONFIGS[variant]["sliding_window"]
    ref = hf_ref.hf_target_forward(path, ids)
    model, _ = mlx_load(path)
    logits = model(mx.array(ids)[None])
    _assert_close(logits, ref["logits"][None], f"{variant} logits")
    assert _np(logits).dtype == np.float32


@pytest.mark.parametrize("variant", ALL)
def test_target_hidden_and_shared_kv(variant, hf_target, mlx_load):
    import mlx.core as mx

    path = hf_target(variant)
    ids = _ids(variant, 48, seed=12)
    ref = hf_ref.hf_target_forward(path, ids)
    model, _ = mlx_load(path)
    out = model.forward(mx.array(ids)[None], cache=None, return_hidden=True)
    _assert_close(out.logits, ref["logits"][None], f"{variant} forward logits")
    _assert_close(out.hidden, ref["hidden"][None], f"{variant} post-norm hidden")
    assert set(out.shared_kv) == {S, F}, f"shared_kv keys {sorted(out.shared_kv)}"
    for t in (S, F):
        K, V = out.shared_kv[t]
        _assert_close(K, ref["shared_kv"][t][0], f"{variant} shared K ({t})")
        _assert_close(V, ref["shared_kv"][t][1], f"{variant} shared V ({t})")


# ------------------------------------------------------------------------------------------------ drafter


@pytest.mark.parametrize("n_tokens", [6, 40])
@pytest.mark.parametrize("variant", ALL)
def test_drafter_step(variant, n_tokens, hf_pair, mlx_load):
    """k=4 drafting steps of round 1 (position p = len(ids)); 40 tokens > W+1 exercises the sliding window."""
    import mlx.core as mx

    tp, ap = hf_pair(variant)
    ids = _ids(variant, n_tokens, seed=13)
    ref = hf_ref.hf_first_round(tp, ap, ids, k=4)
    drafter, _ = mlx_load(ap)
    outer = hf_ref.ASSISTANT_OUTER_CONFIGS[variant]
    shared_kv = {t: (mx.array(K), mx.array(V)) for t, (K, V) in ref["shared_kv"].items()}
    for step, ((emb, hid), logits_ref, post_ref) in enumerate(
        zip(ref["inputs"], ref["logits"], ref["post_projection"])
    ):
        logits, nxt = drafter.draft_step(
            mx.array(emb)[None, None], mx.array(hid)[None, None], shared_kv, ref["position"]
        )
        what = f"{variant} drafter step {step}"
        _assert_close(nxt, post_ref[None, None], f"{what} post_projection")
        got = _np(logits)
        assert got.shape == (1, 1, logits_ref.shape[0]), f"{what}: logits shape {got.shape}"
        got = got[0, 0]
        if outer["use_ordered_embeddings"]:
            # HF writes min(selected) - 1 into every token outside the selected clusters
            sel = logits_ref > logits_ref.min()
            n_sel = (
                outer["centroid_intermediate_top_k"] * logits_ref.shape[0] // outer["num_centroids"]
            )
            assert sel.sum() == n_sel
            err = float(np.abs(got[sel] - logits_ref[sel]).max())
            assert err <= TOL, f"{what}: selected-token logits max abs err {err:.3g}"
        else:
            _assert_close(got, logits_ref, f"{what} logits")
        assert int(np.argmax(got)) == int(np.argmax(logits_ref)) == ref["tokens"][step], (
            f"{what}: argmax"
        )
